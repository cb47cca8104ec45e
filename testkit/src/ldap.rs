//! A plain LDAP client over one TCP connection (from a chosen loopback source address), for
//! the proxy's LDAP side.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use ldap3_proto::proto::{LdapBindCred, LdapBindRequest, LdapMsg, LdapOp, LdapResultCode};

use crate::net::tcp_from;
use crate::LOCAL4;

pub struct LdapClient {
    pub s: TcpStream,
    buf: bytes::BytesMut,
}

impl LdapClient {
    /// A connection from 127.0.0.1 to 127.0.0.1:`port`.
    pub fn connect(port: u16) -> LdapClient {
        let to = SocketAddr::new(LOCAL4, port);
        LdapClient::from(tcp_from(LOCAL4, to).unwrap_or_else(|e| panic!("connect {to}: {e}")))
    }

    pub fn from(s: TcpStream) -> LdapClient {
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap_or_else(|e| panic!("{e}"));
        LdapClient {
            s,
            buf: bytes::BytesMut::new(),
        }
    }

    /// Sends one message; false when the connection is gone.
    pub fn send(&mut self, m: LdapMsg) -> bool {
        use tokio_util::codec::Encoder;
        let mut out = bytes::BytesMut::new();
        ldap3_proto::LdapCodec::default()
            .encode(m, &mut out)
            .unwrap_or_else(|e| panic!("encoding an LDAP message: {e:?}"));
        self.s.write_all(&out).is_ok()
    }

    /// The next message; `None` at EOF, on an error or after the read timeout.
    pub fn recv(&mut self) -> Option<LdapMsg> {
        use tokio_util::codec::Decoder;
        let mut codec = ldap3_proto::LdapCodec::default();
        loop {
            if let Some(m) = codec
                .decode(&mut self.buf)
                .unwrap_or_else(|e| panic!("LDAP from the proxy: {e:?}"))
            {
                return Some(m);
            }
            let mut b = [0u8; 4096];
            match self.s.read(&mut b) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&b[..n]),
            }
        }
    }

    pub fn bind_request(id: i32, dn: &str, password: &str) -> LdapMsg {
        LdapMsg::new(
            id,
            LdapOp::BindRequest(LdapBindRequest {
                dn: dn.into(),
                cred: LdapBindCred::Simple(password.into()),
            }),
        )
    }

    /// A simple bind: its result code and message, `None` when no answer came.
    pub fn bind(&mut self, id: i32, dn: &str, password: &str) -> Option<(LdapResultCode, String)> {
        if !self.send(LdapClient::bind_request(id, dn, password)) {
            return None;
        }
        match self.recv()? {
            LdapMsg {
                msgid,
                op: LdapOp::BindResponse(r),
                ..
            } if msgid == id => Some((r.res.code, r.res.message)),
            other => panic!("not the answer to bind {id}: {other:?}"),
        }
    }
}
