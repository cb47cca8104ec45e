//! A proxy-only box: `turn.listen = []` switches STUN/TURN off. Portico then serves HTTP
//! through its reverse proxy while neither of its processes holds a UDP socket (checked by
//! matching the socket inodes in `/proc/<pid>/fd` against `/proc/<pid>/net/udp{,6}`); the
//! dataplane still runs, is reported, and is restarted by the supervisor when it dies.

use std::collections::HashSet;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use nix::sys::signal::Signal;
use portico_testkit::process::signal;
use portico_testkit::{free_port, wait_until, Portico, Spec};

/// Inodes of the sockets process `pid` holds open.
fn socket_inodes(pid: u32) -> HashSet<u64> {
    let mut out = HashSet::new();
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return out;
    };
    for fd in fds.flatten() {
        if let Ok(target) = fs::read_link(fd.path()) {
            let t = target.to_string_lossy();
            if let Some(n) = t
                .strip_prefix("socket:[")
                .and_then(|r| r.strip_suffix(']'))
                .and_then(|n| n.parse().ok())
            {
                out.insert(n);
            }
        }
    }
    out
}

/// The UDP sockets (IPv4 and IPv6) process `pid` holds, as `local address` fields.
fn udp_sockets_of(pid: u32) -> Vec<String> {
    let mine = socket_inodes(pid);
    let mut found = Vec::new();
    for table in ["udp", "udp6"] {
        let text = fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let Some(inode) = cols.get(9).and_then(|i| i.parse::<u64>().ok()) else {
                continue;
            };
            if mine.contains(&inode) {
                found.push(format!("{table} {}", cols.get(1).unwrap_or(&"?")));
            }
        }
    }
    found
}

/// A backend that answers every request with one fixed HTTP response, for at most a minute.
fn backend() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        for s in l.incoming() {
            if std::time::Instant::now() > deadline {
                break;
            }
            let Ok(mut s) = s else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut head = Vec::new();
            let mut b = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut b) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&b[..n]),
                }
            }
            let body = b"served by the backend";
            let _ = s.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                )
                .as_bytes(),
            );
            let _ = s.write_all(body);
        }
    });
    port
}

/// GET / with `Host: pbx.test` through the proxy; the whole answer.
fn get_through(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: pbx.test\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    Some(String::from_utf8_lossy(&out).into_owned())
}

#[test]
fn proxy_only_box_serves_http_without_any_udp_socket() {
    // The check can see a UDP socket: this process's own.
    let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = probe.local_addr().unwrap().port();
    assert!(
        udp_sockets_of(std::process::id())
            .iter()
            .any(|s| s.ends_with(&format!(":{port:04X}"))),
        "the /proc check does not see a bound UDP socket"
    );
    drop(probe);

    let http_port = free_port();
    let backend_port = backend();
    let spec = Spec::new()
        .no_stun()
        .whitelist("127.0.0.0/8")
        .proxy(&format!(
            "[proxy.listen]\nhttp = \"127.0.0.1:{http_port}\"\n\n\
             [[proxy.services]]\nname = \"pbx.test\"\nhost = \"127.0.0.1\"\nhttp = {backend_port}\n"
        ))
        .ready_port(http_port);
    let site = Portico::new("proxy-only", spec);
    let cp = site.launch();
    assert!(
        site.log().contains("STUN/TURN off"),
        "the start line says STUN/TURN is off:\n{}",
        site.log()
    );

    let mut answer = None;
    assert!(
        wait_until(Duration::from_secs(10), || {
            answer = get_through(http_port).filter(|a| a.contains("served by the backend"));
            answer.is_some()
        }),
        "no answer through the proxy; log:\n{}",
        site.log()
    );
    assert!(answer.unwrap().starts_with("HTTP/1.1 200"));

    let st = site.status();
    assert_eq!(st["dataplane"]["running"], true, "{st}");
    assert_eq!(st["workers"], 0, "{st}");
    let dp = st["dataplane"]["pid"].as_u64().unwrap() as u32;
    assert_eq!(site.dataplane_pids(), vec![dp]);
    for (what, pid) in [("portico", cp.pid()), ("dataplane", dp)] {
        let udp = udp_sockets_of(pid);
        assert!(
            udp.is_empty(),
            "{what} (pid {pid}) holds UDP sockets: {udp:?}"
        );
    }
    // A configuration change is applied by the dataplane as usual.
    let a = site.json(
        "PATCH",
        "/api/v1/config",
        r#"{"turn": {"realm": "proxy-only"}}"#,
        200,
    );
    assert_eq!(a["dataplane_applied"], true, "{a}");

    // Supervision works as usual: a killed dataplane is restarted, still without sockets.
    signal(dp, Signal::SIGKILL);
    let mut new_pid = 0;
    assert!(
        wait_until(Duration::from_secs(10), || {
            let st = site.status();
            new_pid = st["dataplane"]["pid"].as_u64().unwrap_or(0) as u32;
            new_pid != dp && new_pid != 0 && st["dataplane"]["running"] == true
        }),
        "the dataplane was not restarted; log:\n{}",
        site.log()
    );
    assert!(udp_sockets_of(new_pid).is_empty());
    assert!(udp_sockets_of(cp.pid()).is_empty());
    assert_eq!(site.get("/healthz", false).unwrap().status, 200);
}
