//! The admin page at `/admin/`: driven in headless Chromium through the DevTools protocol
//! (login, an allocation of a real TURN client seen and deleted, a source blacklisted and
//! turned into a whitelist entry, the API checked after each step, screenshots saved), and
//! over plain HTTP: the session cookie's attributes, CSRF protection of every change, wrong
//! logins, logout.
//!
//! Chromium is driven over `--remote-debugging-pipe` (the DevTools protocol as NUL-terminated
//! JSON on file descriptors 3 and 4), so the test needs no WebSocket client and no debugging
//! port: nothing but this test can reach the browser.

use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use base64::Engine;
use portico_testkit::http::{get_from, http_from, HttpResponse};
use portico_testkit::net::bindings;
use portico_testkit::process::require;
use portico_testkit::turn::{
    TurnClient, PASSWORD, PASSWORD2, PREVIOUS_SECRET, SHARED_SECRET, USER,
};
use portico_testkit::{free_port, wait_until, Portico, TempDir};
use serde_json::{json, Value};

/// Longest wait for one DevTools answer or one condition on the page.
const WAIT: Duration = Duration::from_secs(15);

/// A headless Chromium on a fresh profile, spoken to over the DevTools pipe; killed (its whole
/// process group) on drop.
struct Chromium {
    child: Child,
    to: std::io::PipeWriter,
    from: Receiver<Value>,
    next_id: u64,
    /// Events received so far (console entries, exceptions).
    events: Vec<Value>,
    log: PathBuf,
    _profile: TempDir,
}

impl Chromium {
    fn start() -> Chromium {
        let bin = require("chromium", "chromium");
        let profile = TempDir::new("chromium-profile");
        let log = profile.join("chromium.log");
        let (chrome_reads, to) = std::io::pipe().expect("pipe");
        let (from, chrome_writes) = std::io::pipe().expect("pipe");
        let (r, w) = (chrome_reads.as_raw_fd(), chrome_writes.as_raw_fd());
        let out = std::fs::File::create(&log).expect("chromium log");
        let mut cmd = Command::new(bin);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--remote-debugging-pipe",
            "--window-size=1280,1000",
        ])
        .arg(format!(
            "--user-data-dir={}",
            profile.join("data").display()
        ))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("log"))
        .stderr(out)
        .process_group(0);
        // SAFETY: between fork and exec only async-signal-safe calls (fcntl, dup2) on file
        // descriptors this process owns; the pipe ends are moved out of the way first (above
        // 10), so placing one on 3 cannot overwrite the other.
        unsafe {
            cmd.pre_exec(move || {
                let r2 = libc::fcntl(r, libc::F_DUPFD, 10);
                let w2 = libc::fcntl(w, libc::F_DUPFD, 10);
                if r2 < 0 || w2 < 0 || libc::dup2(r2, 3) < 0 || libc::dup2(w2, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("starting chromium");
        drop((chrome_reads, chrome_writes));
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(from);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(0, &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                if buf.last() == Some(&0) {
                    buf.pop();
                }
                let Ok(v) = serde_json::from_slice::<Value>(&buf) else {
                    continue;
                };
                if tx.send(v).is_err() {
                    return;
                }
            }
        });
        Chromium {
            child,
            to,
            from: rx,
            next_id: 0,
            events: Vec::new(),
            log,
            _profile: profile,
        }
    }

    /// One DevTools command (on the page session `session`, or the browser); its result.
    fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).expect("json");
        bytes.push(0);
        if let Err(e) = self.to.write_all(&bytes) {
            panic!("{method}: writing to chromium: {e}; log:\n{}", self.log());
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.from.recv_timeout(left) {
                Ok(v) if v["id"] == json!(id) => {
                    if let Some(err) = v.get("error") {
                        panic!("{method}: {err}");
                    }
                    return v["result"].clone();
                }
                Ok(v) => {
                    if v.get("method").is_some() {
                        self.events.push(v);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "{method}: no answer from chromium within {WAIT:?}; log:\n{}",
                        self.log()
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("{method}: chromium closed the pipe; log:\n{}", self.log())
                }
            }
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        // The browser and its renderer, GPU and utility processes share its process group.
        let pgid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) on the process group this test created for chromium.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// A page (tab) of [`Chromium`].
struct Page {
    browser: Chromium,
    session: String,
}

impl Page {
    fn open(mut browser: Chromium) -> Page {
        let target = browser.call(None, "Target.createTarget", json!({ "url": "about:blank" }));
        let target_id = target["targetId"].as_str().expect("targetId").to_string();
        let attached = browser.call(
            None,
            "Target.attachToTarget",
            json!({ "targetId": target_id, "flatten": true }),
        );
        let session = attached["sessionId"]
            .as_str()
            .expect("sessionId")
            .to_string();
        let mut p = Page { browser, session };
        for domain in ["Page.enable", "Runtime.enable", "Log.enable"] {
            p.call(domain, json!({}));
        }
        p.viewport(1280, 1000, false);
        p
    }

    fn call(&mut self, method: &str, params: Value) -> Value {
        let s = self.session.clone();
        self.browser.call(Some(&s), method, params)
    }

    fn viewport(&mut self, width: u32, height: u32, mobile: bool) {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile }),
        );
    }

    /// The value of a JavaScript expression in the page (awaited when it is a promise).
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({ "expression": expr, "returnByValue": true, "awaitPromise": true }),
        );
        if let Some(e) = r.get("exceptionDetails") {
            panic!("{expr}: {e}");
        }
        r["result"]["value"].clone()
    }

    /// Waits (bounded) until `expr` is true in the page.
    #[track_caller]
    fn wait_for(&mut self, what: &str, expr: &str) {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if self.eval(expr) == json!(true) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let text = self.eval("document.body.innerText");
        panic!("{what}: not within {WAIT:?} ({expr}); the page shows:\n{text}");
    }

    /// A real mouse click in the middle of the element `selector`.
    #[track_caller]
    fn click(&mut self, selector: &str) {
        let sel = serde_json::to_string(selector).expect("json");
        let at = self.eval(&format!(
            "(() => {{ const e = document.querySelector({sel}); if (!e) return null; \
             e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect(); \
             return [r.x + r.width / 2, r.y + r.height / 2]; }})()"
        ));
        let (Some(x), Some(y)) = (at[0].as_f64(), at[1].as_f64()) else {
            panic!("no element {selector} to click");
        };
        for kind in ["mouseMoved", "mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({ "type": kind, "x": x, "y": y, "button": "left", "clickCount": 1 }),
            );
        }
    }

    /// Types `text` into the input `selector` as keyboard input.
    fn type_into(&mut self, selector: &str, text: &str) {
        let sel = serde_json::to_string(selector).expect("json");
        self.eval(&format!("document.querySelector({sel}).focus()"));
        self.call("Input.insertText", json!({ "text": text }));
    }

    fn screenshot(&mut self, path: &Path) {
        let shot = self.call(
            "Page.captureScreenshot",
            json!({ "format": "png", "captureBeyondViewport": true }),
        );
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .expect("base64");
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::create_dir_all(path.parent().expect("dir")).expect("artifact dir");
        std::fs::write(path, &png).expect("writing the screenshot");
        println!("screenshot: {} ({} bytes)", path.display(), png.len());
    }

    /// Errors the page raised: uncaught exceptions, and console entries of JavaScript and
    /// security (Content-Security-Policy violations). Failed loads (a 401 before the login)
    /// are the API answering, not a fault of the page.
    fn faults(&self) -> Vec<String> {
        self.browser
            .events
            .iter()
            .filter_map(|e| match e["method"].as_str() {
                Some("Runtime.exceptionThrown") => Some(e["params"].to_string()),
                Some("Log.entryAdded")
                    if e["params"]["entry"]["level"] == "error"
                        && e["params"]["entry"]["source"] != "network" =>
                {
                    Some(e["params"]["entry"].to_string())
                }
                _ => None,
            })
            .collect()
    }
}

/// Where test artifacts go: `target/test-artifacts/`.
fn artifact(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("test-artifacts").join(name)
}

fn site(tag: &str) -> Portico {
    // A proxy service, so the page has one to list.
    Portico::start(tag, crate::spec().turn_users().http_proxy_to(free_port()))
}

fn entries(site: &Portico) -> Vec<Value> {
    site.json("GET", "/api/v1/fraud/entries", "", 200)["entries"]
        .as_array()
        .expect("entries")
        .clone()
}

fn entry_kind(site: &Portico, ip: &str) -> Option<String> {
    entries(site)
        .iter()
        .find(|e| {
            e["source"]
                .as_str()
                .is_some_and(|s| s.split('/').next() == Some(ip))
        })
        .map(|e| e["kind"].as_str().unwrap_or("").to_string())
}

fn allocation_ids(site: &Portico) -> Vec<u64> {
    site.json("GET", "/api/v1/turn/allocations", "", 200)["allocations"]
        .as_array()
        .expect("allocations")
        .iter()
        .filter_map(|a| a["id"].as_u64())
        .collect()
}

#[test]
fn the_admin_page_in_chromium_manages_allocations_and_the_fraud_lists() {
    let site = site("admin-chromium");
    let mut client = TurnClient::new(site.udp4(), USER, PASSWORD);
    client.allocate();
    let local = client.local().to_string();
    let allocs = site.json("GET", "/api/v1/turn/allocations", "", 200);
    let alloc = allocs["allocations"]
        .as_array()
        .and_then(|l| l.iter().find(|a| a["client"] == json!(local)))
        .unwrap_or_else(|| panic!("no allocation of {local} in {allocs}"))["id"]
        .as_u64()
        .expect("id");

    let mut page = Page::open(Chromium::start());
    let url = format!("http://{}/admin/", site.api);
    page.call("Page.navigate", json!({ "url": url }));
    page.wait_for(
        "the login form",
        "document.readyState === 'complete' && !document.querySelector('#login-view').hidden",
    );

    // A wrong token is refused on the page.
    page.type_into("#token", "not-the-token");
    page.click("#login button[type=submit]");
    page.wait_for(
        "the wrong token's error",
        "document.querySelector('#login-error').textContent.includes('wrong token')",
    );
    assert_eq!(
        page.eval("document.querySelector('#app').hidden"),
        json!(true)
    );

    // The right one opens the page; the session cookie is out of the script's reach.
    page.eval("document.querySelector('#token').value = ''");
    page.type_into("#token", &site.token());
    page.click("#login button[type=submit]");
    page.wait_for(
        "the page after login",
        "!document.querySelector('#app').hidden",
    );
    assert_eq!(
        page.eval("document.cookie.includes('portico_session')"),
        json!(false),
        "the session cookie is HttpOnly"
    );

    // Status from /api/v1/status, the service from the configuration, redacted secrets.
    let status = site.status();
    let driver = status["driver"].as_str().expect("driver").to_string();
    page.wait_for(
        "the status",
        &format!(
            "document.querySelector('#status-list').innerText.includes('running (pid {})') && \
             document.querySelector('#status-list').innerText.includes({})",
            status["dataplane"]["pid"],
            json!(driver)
        ),
    );
    page.wait_for(
        "the service and the configuration",
        "document.querySelector('#service-rows').innerText.includes('app.test') && \
         document.querySelector('#config-text').textContent.includes('<redacted>')",
    );
    let config = page.eval("document.querySelector('#config-text').textContent");
    let config = config.as_str().unwrap_or("");
    for secret in [PASSWORD, PASSWORD2, SHARED_SECRET, PREVIOUS_SECRET] {
        assert!(
            !config.contains(&format!("\"{secret}\"")),
            "the secret {secret:?} on the page:\n{config}"
        );
    }

    // The test client's allocation is listed; Delete ends it, and the API agrees.
    page.wait_for(
        "the allocation",
        &format!(
            "(document.querySelector('[data-alloc-row=\"{alloc}\"]') || {{}}).innerText?.includes('{local}') === true"
        ),
    );
    page.click(&format!("[data-delete-alloc=\"{alloc}\"]"));
    assert!(
        wait_until(WAIT, || !allocation_ids(&site).contains(&alloc)),
        "the API still lists allocation {alloc}"
    );
    page.wait_for(
        "the allocation's row to go",
        &format!("document.querySelector('[data-alloc-row=\"{alloc}\"]') === null"),
    );

    // A source blacklisted from the form, then turned into a whitelist entry.
    let ip = "127.0.0.66";
    page.type_into("#fraud-ip", ip);
    page.type_into("#fraud-note", "seen in the admin page test");
    page.click("#fraud-add button[type=submit]");
    assert!(
        wait_until(WAIT, || entry_kind(&site, ip).as_deref() == Some("black")),
        "the API does not list {ip} as black: {:?}",
        entries(&site)
    );
    let note = entries(&site)
        .into_iter()
        .find(|e| e["source"].as_str().is_some_and(|s| s.starts_with(ip)))
        .map(|e| e["note"].clone());
    assert_eq!(note, Some(json!("seen in the admin page test")));
    page.wait_for(
        "the blacklist entry",
        &format!("document.querySelector('[data-entry^=\"{ip}\"][data-kind=\"black\"] [data-whitelist]') !== null"),
    );
    page.click(&format!("[data-entry^=\"{ip}\"] [data-whitelist]"));
    assert!(
        wait_until(WAIT, || entry_kind(&site, ip).as_deref() == Some("white")),
        "the API does not list {ip} as white: {:?}",
        entries(&site)
    );
    page.wait_for(
        "the whitelist entry",
        &format!("document.querySelector('[data-entry^=\"{ip}\"][data-kind=\"white\"]') !== null"),
    );

    // Some traffic for the charts: STUN requests, requests through the proxy (its target
    // does not answer: 502), an allocation that stays, and a blacklisted source.
    let mut stays = TurnClient::new(site.udp4(), USER, PASSWORD);
    stays.allocate();
    site.json(
        "POST",
        "/api/v1/fraud/entries",
        r#"{"ip": "198.51.100.23", "kind": "black", "note": "REGISTER brute force"}"#,
        201,
    );
    let proxy = site.proxy();
    for i in 0..16u64 {
        bindings(site.udp4(), 5 + 2 * i);
        if i % 3 == 0 {
            get_from(IpAddr::from([127, 0, 0, 90]), proxy, "/");
        }
        std::thread::sleep(Duration::from_millis(400));
    }
    // The charts follow the counters of /metrics (three samples make the first rate).
    page.wait_for(
        "the traffic charts",
        "document.querySelectorAll('figure.chart polyline').length === 4 && \
         Number(document.querySelector('figure[data-chart=packets]').dataset.max) > 0 && \
         Number(document.querySelector('figure[data-chart=requests]').dataset.max) > 0 && \
         Number(document.querySelector('figure[data-chart=allocations]').dataset.max) >= 1",
    );
    page.wait_for(
        "the second allocation and the blacklist entry",
        "document.querySelectorAll('[data-alloc-row]').length === 1 && \
         document.querySelector('[data-entry^=\"198.51.100.23\"] [data-whitelist]') !== null",
    );
    page.screenshot(&artifact("admin-page.png"));

    // A phone's screen: nothing wider than the screen (tables scroll inside their box).
    page.viewport(390, 844, true);
    page.wait_for(
        "the page at phone width",
        "document.documentElement.scrollWidth <= window.innerWidth + 1",
    );
    page.screenshot(&artifact("admin-page-phone.png"));

    // Logging out ends the session: the page asks for the token again, the API refuses it.
    page.viewport(1280, 1000, false);
    page.click("#logout");
    page.wait_for(
        "the login form after logout",
        "!document.querySelector('#login-view').hidden",
    );
    let after =
        page.eval("fetch('/api/v1/status', {credentials: 'same-origin'}).then(r => r.status)");
    assert_eq!(after, json!(401));

    let faults = page.faults();
    assert!(faults.is_empty(), "the page raised errors: {faults:#?}");
}

// --- over plain HTTP ---------------------------------------------------------------------------

/// A request from the loopback source `src` (each case its own source, so the API's limit on
/// failed authentications does not end the test early).
fn req(
    site: &Portico,
    src: u8,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> HttpResponse {
    let h: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let from = IpAddr::from([127, 0, 0, src]);
    http_from(from, site.api, method, path, &h, body.as_bytes())
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// Logs in from `src`: (cookie header value, CSRF token, the Set-Cookie line).
fn login(site: &Portico, src: u8, extra: &[(&str, &str)]) -> (String, String, String) {
    let body = json!({ "token": site.token() }).to_string();
    let mut h = vec![("Content-Type", "application/json")];
    h.extend_from_slice(extra);
    let r = req(site, src, "POST", "/admin/login", &h, &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let set = r.header("set-cookie").expect("Set-Cookie").to_string();
    let pair = set.split(';').next().expect("cookie").to_string();
    let csrf = r.json()["csrf_token"]
        .as_str()
        .expect("csrf_token")
        .to_string();
    (pair, csrf, set)
}

/// Every kind of change the API offers, as (method, path, body).
fn changes() -> Vec<(&'static str, &'static str, &'static str)> {
    vec![
        (
            "POST",
            "/api/v1/fraud/entries",
            r#"{"ip": "127.0.0.77", "kind": "black"}"#,
        ),
        ("DELETE", "/api/v1/fraud/entries/127.0.0.1", ""),
        ("POST", "/api/v1/fraud/entries/127.0.0.1/whitelist", ""),
        ("DELETE", "/api/v1/turn/allocations/1", ""),
        ("PATCH", "/api/v1/config", r#"{"log_level": "debug"}"#),
        ("PUT", "/api/v1/config", "{}"),
        (
            "POST",
            "/api/v1/turn/users",
            r#"{"name": "eve", "password": "x"}"#,
        ),
        ("DELETE", "/api/v1/turn/users/alice", ""),
        ("POST", "/api/v1/turn/credentials", r#"{"user": "eve"}"#),
        ("POST", "/admin/logout", ""),
    ]
}

#[test]
fn changes_need_the_token_or_a_session_with_its_csrf_token() {
    let site = site("admin-csrf");
    let before = (entries(&site), site.file_config());
    let json_ct = ("Content-Type", "application/json");

    // No token and no cookie: 401 (each from its own source: 10 failures would mean 429).
    for (i, (method, path, body)) in changes().into_iter().enumerate() {
        let r = req(&site, 10 + i as u8, method, path, &[json_ct], body);
        assert_eq!(
            r.status,
            401,
            "{method} {path} without anything: {}",
            r.text()
        );
    }
    // A cookie naming no session: 401 as well.
    let r = req(
        &site,
        30,
        "GET",
        "/api/v1/status",
        &[("Cookie", "portico_session=00ff")],
        "",
    );
    assert_eq!(r.status, 401);

    // A session, but the CSRF token missing, forged, or another session's: 403.
    let (cookie, csrf, _) = login(&site, 40, &[]);
    let (_, other_csrf, _) = login(&site, 41, &[]);
    let forged = "0".repeat(csrf.len());
    for (method, path, body) in changes() {
        for token in [
            None,
            Some(forged.as_str()),
            Some(other_csrf.as_str()),
            Some(""),
        ] {
            let mut h = vec![json_ct, ("Cookie", cookie.as_str())];
            if let Some(t) = token {
                h.push(("X-CSRF-Token", t));
            }
            let r = req(&site, 42, method, path, &h, body);
            assert_eq!(
                r.status,
                403,
                "{method} {path} with CSRF {token:?}: {}",
                r.text()
            );
            assert!(r.json()["error"]
                .as_str()
                .unwrap_or("")
                .contains("X-CSRF-Token"));
        }
    }
    // Nothing changed.
    assert_eq!((entries(&site), site.file_config()), before);

    // Reading with the cookie alone works; changing with the CSRF token too.
    let r = req(
        &site,
        42,
        "GET",
        "/api/v1/status",
        &[("Cookie", &cookie)],
        "",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = req(
        &site,
        42,
        "POST",
        "/api/v1/fraud/entries",
        &[json_ct, ("Cookie", &cookie), ("X-CSRF-Token", &csrf)],
        r#"{"ip": "127.0.0.77", "kind": "black"}"#,
    );
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(entry_kind(&site, "127.0.0.77").as_deref(), Some("black"));
    // The bearer token works as before, without any CSRF token.
    site.json("DELETE", "/api/v1/fraud/entries/127.0.0.77", "", 204);
    assert_eq!(entry_kind(&site, "127.0.0.77"), None);
}

#[test]
fn login_cookie_and_logout() {
    let site = site("admin-login");

    // The page and its assets, under a strict Content-Security-Policy.
    for (path, ctype) in [
        ("/admin/", "text/html"),
        ("/admin/admin.js", "text/javascript"),
        ("/admin/admin.css", "text/css"),
    ] {
        let r = req(&site, 1, "GET", path, &[], "");
        assert_eq!(r.status, 200, "{path}");
        assert!(
            r.header("content-type").unwrap_or("").starts_with(ctype),
            "{path}"
        );
        let csp = r.header("content-security-policy").unwrap_or("");
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(csp.contains(directive), "{path}: {csp}");
        }
        assert!(!csp.contains("unsafe"), "{path}: {csp}");
        assert_eq!(r.header("x-frame-options"), Some("DENY"));
    }
    let r = req(&site, 1, "GET", "/admin", &[], "");
    assert_eq!((r.status, r.header("location")), (301, Some("/admin/")));
    // No session yet: the page learns it from /admin/session, which is no failed login.
    let r = req(&site, 1, "GET", "/admin/session", &[], "");
    assert_eq!(r.status, 401);

    // Wrong tokens and malformed logins: no cookie.
    let json_ct = ("Content-Type", "application/json");
    for (i, (headers, body, status)) in [
        (vec![json_ct], r#"{"token": "wrong"}"#.to_string(), 401),
        (
            vec![json_ct],
            json!({ "token": format!("{}x", site.token()) }).to_string(),
            401,
        ),
        (vec![json_ct], "{}".to_string(), 400),
        (
            vec![("Content-Type", "application/x-www-form-urlencoded")],
            format!("token={}", site.token()),
            415,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let r = req(&site, 50 + i as u8, "POST", "/admin/login", &headers, &body);
        assert_eq!(r.status, status, "{body}: {}", r.text());
        assert_eq!(r.header("set-cookie"), None);
    }

    // The cookie: random, HttpOnly, SameSite=Strict, whole site; Secure behind TLS.
    let (cookie, csrf, set) = login(&site, 60, &[]);
    let attrs: Vec<&str> = set.split(';').map(str::trim).collect();
    let value = cookie
        .strip_prefix("portico_session=")
        .expect("cookie name");
    assert_eq!(value.len(), 64, "{set}");
    assert!(value.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_ne!(value, csrf);
    for a in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(attrs.contains(&a), "{a} missing: {set}");
    }
    assert!(!attrs.contains(&"Secure"), "plain HTTP: {set}");
    assert!(attrs.iter().any(|a| a.starts_with("Max-Age=")), "{set}");
    let (other, _, set_tls) = login(&site, 61, &[("X-Forwarded-Proto", "https")]);
    assert!(
        set_tls.split(';').any(|a| a.trim() == "Secure"),
        "{set_tls}"
    );
    assert_ne!(other, cookie, "every login gets its own session");

    // The session answers with its CSRF token; logout needs that token, then ends it.
    let r = req(
        &site,
        60,
        "GET",
        "/admin/session",
        &[("Cookie", &cookie)],
        "",
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["csrf_token"], json!(csrf));
    let r = req(
        &site,
        60,
        "POST",
        "/admin/logout",
        &[("Cookie", &cookie)],
        "",
    );
    assert_eq!(r.status, 403, "logout without the CSRF token");
    let r = req(
        &site,
        60,
        "POST",
        "/admin/logout",
        &[("Cookie", &cookie), ("X-CSRF-Token", &csrf)],
        "",
    );
    assert_eq!(r.status, 204, "{}", r.text());
    let cleared = r.header("set-cookie").unwrap_or("");
    assert!(
        cleared.starts_with("portico_session=;") && cleared.contains("Max-Age=0"),
        "{cleared}"
    );
    for path in ["/api/v1/status", "/admin/session"] {
        let r = req(&site, 62, "GET", path, &[("Cookie", &cookie)], "");
        assert_eq!(r.status, 401, "{path} after logout");
    }
    // The other session is still open.
    let r = req(
        &site,
        61,
        "GET",
        "/api/v1/status",
        &[("Cookie", &other)],
        "",
    );
    assert_eq!(r.status, 200);
    assert!(site.log().contains("admin page login failed: wrong token"));

    // Wrong logins count like wrong bearer tokens: after 10 from one source, 429 for the
    // login and the API alike, even with the right token.
    for _ in 0..10 {
        let r = req(
            &site,
            70,
            "POST",
            "/admin/login",
            &[json_ct],
            r#"{"token": "guess"}"#,
        );
        assert_eq!(r.status, 401);
    }
    let body = json!({ "token": site.token() }).to_string();
    let r = req(&site, 70, "POST", "/admin/login", &[json_ct], &body);
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(r.header("retry-after").is_some());
    assert_eq!(r.header("set-cookie"), None);
    let bearer = format!("Bearer {}", site.token());
    let r = req(
        &site,
        70,
        "GET",
        "/api/v1/status",
        &[("Authorization", &bearer)],
        "",
    );
    assert_eq!(r.status, 429);
    let r = req(&site, 71, "POST", "/admin/login", &[json_ct], &body);
    assert_eq!(r.status, 200, "another source is not affected");
}
