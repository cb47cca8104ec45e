//! Helpers of the H.323 proxy tests: H.225.0 messages from pycrate (`h225gen.py` beside this
//! file; `seeds.txt` holds some of its messages for the decoder's unit tests and the
//! benchmark), fake PBX targets (plain and TLS) that record what reaches them, and tshark as
//! a decoder.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portico_testkit::process::{require, run};
use portico_testkit::TempDir;

/// An H.225.0 message from pycrate (tests/proxy/h225gen.py), as TPKT bytes.
pub fn msg(args: &[&str]) -> Vec<u8> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/proxy/h225gen.py");
    let out = Command::new("python3")
        .arg(&script)
        .args(args)
        .output()
        .expect("python3 (Debian package python3)");
    assert!(
        out.status.success(),
        "h225gen.py {args:?} failed (pip package pycrate missing?): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hex = String::from_utf8(out.stdout).unwrap();
    let hex = hex.trim();
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

/// A fake PBX: accepts connections and records, per connection, every byte received; it
/// answers each connection's first bytes with `answer` when given.
pub struct FakePbx {
    pub port: u16,
    pub conns: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl FakePbx {
    pub fn start(answer: Option<Vec<u8>>) -> FakePbx {
        FakePbx::start_with(answer, None)
    }

    /// Like [`FakePbx::start`]; with `tls`, a TLS server with that configuration.
    pub fn start_with(answer: Option<Vec<u8>>, tls: Option<Arc<rustls::ServerConfig>>) -> FakePbx {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let conns = Arc::new(Mutex::new(Vec::new()));
        let c = Arc::clone(&conns);
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let i = {
                    let mut g = c.lock().unwrap();
                    g.push(Vec::new());
                    g.len() - 1
                };
                let c = Arc::clone(&c);
                let answer = answer.clone();
                let tls = tls.clone();
                std::thread::spawn(move || {
                    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                    let mut conn;
                    let mut tls_stream;
                    let s: &mut dyn ReadWrite = match tls {
                        Some(cfg) => {
                            conn = rustls::ServerConnection::new(cfg).unwrap();
                            tls_stream = rustls::Stream::new(&mut conn, &mut s);
                            &mut tls_stream
                        }
                        None => &mut s,
                    };
                    let mut buf = [0u8; 65536];
                    let mut answered = false;
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        c.lock().unwrap()[i].extend_from_slice(&buf[..n]);
                        if let (Some(a), false) = (&answer, answered) {
                            let _ = s.write_all(a);
                            answered = true;
                        }
                    }
                });
            }
        });
        FakePbx { port, conns }
    }

    /// Waits until `n` connections arrived and the last holds at least `bytes` bytes.
    pub fn wait(&self, n: usize, bytes: usize) -> Vec<Vec<u8>> {
        let t0 = Instant::now();
        loop {
            let g = self.conns.lock().unwrap().clone();
            if g.len() >= n && g.last().is_some_and(|c| c.len() >= bytes) {
                return g;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "the target got {} connections ({:?} bytes), expected {n} with {bytes} bytes",
                g.len(),
                g.iter().map(Vec::len).collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn all(&self) -> Vec<Vec<u8>> {
        self.conns.lock().unwrap().clone()
    }
}

/// How long text2pcap and tshark may take.
const TOOL_LIMIT: Duration = Duration::from_secs(30);

/// Decodes `payloads` (one TCP segment each, to port 1720) with tshark; returns its verbose
/// text after checking that it reports no malformed packet or error.
pub fn tshark_decode(dir: &TempDir, name: &str, payloads: &[Vec<u8>]) -> String {
    let tshark = require("tshark", "tshark");
    let text2pcap = require("text2pcap", "tshark");
    let mut dump = String::new();
    for p in payloads {
        for (i, chunk) in p.chunks(16).enumerate() {
            dump.push_str(&format!("{:06x}", i * 16));
            for b in chunk {
                dump.push_str(&format!(" {b:02x}"));
            }
            dump.push('\n');
        }
        dump.push('\n');
    }
    let txt = dir.join(format!("{name}.txt"));
    let pcap = dir.join(format!("{name}.pcap"));
    std::fs::write(&txt, dump).unwrap();
    let o = run(
        &text2pcap,
        &[
            "-q",
            "-T",
            "40000,1720",
            txt.to_str().unwrap(),
            pcap.to_str().unwrap(),
        ],
        &[],
        TOOL_LIMIT,
    );
    assert!(o.success(), "text2pcap: {}", o.text);
    let o = run(
        &tshark,
        &["-r", pcap.to_str().unwrap(), "-V"],
        &[],
        TOOL_LIMIT,
    );
    assert!(o.success(), "tshark: {}", o.text);
    let out = o.text;
    assert!(
        !out.contains("Malformed") && !out.contains("Expert Info (Error"),
        "tshark found errors in what the target received:\n{out}"
    );
    out
}

pub trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}
