//! A minimal Redis client (RESP2 over TCP) for the few commands the fleet needs: HSET, HDEL,
//! HGETALL, PUBLISH and SUBSCRIBE. A crate such as `redis` would bring a connection manager,
//! URL parsing, TLS and cluster support we do not use, and its dependency tree to every build;
//! this is ~150 lines, with every read bounded in size and nesting, and tested against a real
//! `redis-server` (controlplane/tests/fraud/fleet.rs).

use std::io;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// Largest bulk string accepted (an entry or a user is well under a kilobyte).
const MAX_BULK: usize = 1 << 20;
/// Largest array accepted (HGETALL of the biggest list: field and value per entry).
const MAX_ARRAY: usize = 1 << 20;
const MAX_DEPTH: usize = 3;
/// How long a command waits for its answer.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Value>>),
}

fn bad(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

pub struct Conn {
    r: BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
}

impl Conn {
    pub async fn connect(host: &str, port: u16) -> io::Result<Conn> {
        let s = tokio::time::timeout(COMMAND_TIMEOUT, TcpStream::connect((host, port)))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        s.set_nodelay(true)?;
        let (r, w) = s.into_split();
        Ok(Conn {
            r: BufReader::new(r),
            w,
        })
    }

    pub async fn send(&mut self, args: &[&[u8]]) -> io::Result<()> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a);
            out.extend_from_slice(b"\r\n");
        }
        self.w.write_all(&out).await
    }

    /// One command and its answer; a Redis error answer is an `Err`.
    pub async fn cmd(&mut self, args: &[&[u8]]) -> io::Result<Value> {
        let v = tokio::time::timeout(COMMAND_TIMEOUT, async {
            self.send(args).await?;
            self.read().await
        })
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "redis did not answer"))??;
        match v {
            Value::Error(e) => Err(io::Error::other(format!("redis: {e}"))),
            v => Ok(v),
        }
    }

    /// The next value the server sends (a command's answer, a pushed message).
    pub async fn read(&mut self) -> io::Result<Value> {
        self.read_value(0).await
    }

    async fn line(&mut self) -> io::Result<String> {
        let mut buf = Vec::new();
        let n = (&mut self.r)
            .take(64 * 1024)
            .read_until(b'\n', &mut buf)
            .await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "redis closed the connection",
            ));
        }
        if !buf.ends_with(b"\r\n") {
            return Err(bad("a RESP line without CRLF"));
        }
        buf.truncate(buf.len() - 2);
        String::from_utf8(buf).map_err(|_| bad("a RESP line that is not UTF-8"))
    }

    fn read_value(
        &mut self,
        depth: usize,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = io::Result<Value>> + Send + '_>> {
        Box::pin(async move {
            let line = self.line().await?;
            let (kind, rest) = line
                .split_at_checked(1)
                .ok_or_else(|| bad("empty RESP line"))?;
            let num = || {
                rest.parse::<i64>()
                    .map_err(|_| bad(format!("bad length {rest:?}")))
            };
            match kind {
                "+" => Ok(Value::Simple(rest.to_string())),
                "-" => Ok(Value::Error(rest.to_string())),
                ":" => Ok(Value::Int(num()?)),
                "$" => {
                    let n = num()?;
                    if n < 0 {
                        return Ok(Value::Bulk(None));
                    }
                    let n = usize::try_from(n).map_err(|_| bad("bad length"))?;
                    if n > MAX_BULK {
                        return Err(bad(format!("bulk string of {n} bytes")));
                    }
                    let mut buf = vec![0u8; n + 2];
                    self.r.read_exact(&mut buf).await?;
                    if !buf.ends_with(b"\r\n") {
                        return Err(bad("bulk string without CRLF"));
                    }
                    buf.truncate(n);
                    Ok(Value::Bulk(Some(buf)))
                }
                "*" => {
                    let n = num()?;
                    if n < 0 {
                        return Ok(Value::Array(None));
                    }
                    let n = usize::try_from(n).map_err(|_| bad("bad length"))?;
                    if n > MAX_ARRAY || depth >= MAX_DEPTH {
                        return Err(bad(format!("array of {n} at depth {depth}")));
                    }
                    let mut v = Vec::with_capacity(n.min(1024));
                    for _ in 0..n {
                        v.push(self.read_value(depth + 1).await?);
                    }
                    Ok(Value::Array(Some(v)))
                }
                _ => Err(bad(format!("unknown RESP type {kind:?}"))),
            }
        })
    }
}

impl Value {
    pub fn bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Bulk(Some(b)) => Some(b),
            Value::Simple(s) => Some(s.as_bytes()),
            _ => None,
        }
    }

    /// HGETALL's answer as (field, value) pairs.
    pub fn pairs(self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let Value::Array(Some(items)) = self else {
            return Vec::new();
        };
        items
            .chunks_exact(2)
            .filter_map(|p| Some((p[0].bytes()?.to_vec(), p[1].bytes()?.to_vec())))
            .collect()
    }
}
