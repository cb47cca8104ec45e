//! NAT behaviour discovery over UDP (RFC 5780 §4.3 and §4.4), where the server answers with
//! OTHER-ADDRESS: mapping (does the NAT keep one mapping for every destination?) and
//! filtering (whom does it let back in?).

use std::net::SocketAddr;
use std::time::Duration;

use portico_dataplane::stun::{attr, method};
use serde::Serialize;

use super::client::{Client, Failure, Request};
use super::conn::Conn;

/// RFC 5780 §4.3 / §4.4 behaviours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Behaviour {
    EndpointIndependent,
    AddressDependent,
    AddressAndPortDependent,
}

impl Behaviour {
    pub fn text(self) -> &'static str {
        match self {
            Behaviour::EndpointIndependent => "endpoint-independent",
            Behaviour::AddressDependent => "address-dependent",
            Behaviour::AddressAndPortDependent => "address-and-port-dependent",
        }
    }
}

/// What the classification found.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Nat {
    /// The tests ran.
    Classified {
        /// The mapped address equals the local one: no NAT on the way.
        no_nat: bool,
        mapping: Behaviour,
        filtering: Behaviour,
        other_address: SocketAddr,
    },
    /// The server sent no OTHER-ADDRESS.
    NotSupported,
    /// A test could not run (UDP blocked, ...).
    Failed { error: String },
    /// UDP was not probed.
    NotRun,
}

impl Nat {
    pub fn text(&self) -> String {
        match self {
            Nat::Classified {
                no_nat,
                mapping,
                filtering,
                ..
            } => {
                let m = if *no_nat {
                    "no NAT (the mapped address is the local address)".to_string()
                } else {
                    format!("NAT with {} mapping", mapping.text())
                };
                format!("{m}; {} filtering", filtering.text())
            }
            Nat::NotSupported => {
                "not supported by server (no OTHER-ADDRESS in its Binding response)".into()
            }
            Nat::Failed { error } => format!("not classified: {error}"),
            Nat::NotRun => "not run (UDP not probed)".into(),
        }
    }
}

fn binding(c: &mut Client, to: SocketAddr, change: Option<u8>) -> Result<SocketAddr, Failure> {
    let mut req = Request::new(method::BINDING);
    if let Some(flags) = change {
        req = req.raw(attr::CHANGE_REQUEST, &[0, 0, 0, flags]);
    }
    let resp = c.transact_to(&req, false, to)?;
    resp.xor_address(attr::XOR_MAPPED_ADDRESS)?
        .or(resp.address(attr::MAPPED_ADDRESS)?)
        .ok_or_else(|| Failure::Protocol("Binding response without a mapped address".into()))
}

/// A filtering test: `Ok(true)` when the answer (from the changed address) came in.
fn answered(c: &mut Client, to: SocketAddr, flags: u8) -> Result<bool, Failure> {
    match binding(c, to, Some(flags)) {
        Ok(_) => Ok(true),
        Err(Failure::Timeout { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// CHANGE-REQUEST flags.
const CHANGE_IP: u8 = 0x04;
const CHANGE_PORT: u8 = 0x02;

/// Runs the RFC 5780 tests against `server` from fresh UDP sockets: one for the mapping
/// tests, another for the filtering tests.
pub fn classify(server: SocketAddr, timeout: Duration) -> Nat {
    match run(server, timeout) {
        Ok(n) => n,
        Err(e) => Nat::Failed {
            error: e.to_string(),
        },
    }
}

fn run(server: SocketAddr, timeout: Duration) -> Result<Nat, Failure> {
    let conn = Conn::udp(server).map_err(|e| Failure::wire(e, "Binding", 0.0))?;
    let local = conn.local;
    let mut c = Client::new(conn, timeout);
    // Test I.
    let resp = c.transact_to(&Request::new(method::BINDING), false, server)?;
    let x1 = resp
        .xor_address(attr::XOR_MAPPED_ADDRESS)?
        .ok_or_else(|| Failure::Protocol("Binding response without XOR-MAPPED-ADDRESS".into()))?;
    let Some(other) = resp.address(attr::OTHER_ADDRESS)? else {
        return Ok(Nat::NotSupported);
    };
    if other.ip() == server.ip() || other.port() == server.port() {
        return Err(Failure::Protocol(format!(
            "OTHER-ADDRESS {other} must differ from {server} in address and port"
        )));
    }
    let no_nat = x1 == local;
    let mapping = if no_nat {
        Behaviour::EndpointIndependent
    } else {
        // Test II: the alternate address, primary port.
        let x2 = binding(&mut c, SocketAddr::new(other.ip(), server.port()), None)?;
        if x2 == x1 {
            Behaviour::EndpointIndependent
        } else {
            // Test III: the alternate address and port.
            let x3 = binding(&mut c, other, None)?;
            if x3 == x2 {
                Behaviour::AddressDependent
            } else {
                Behaviour::AddressAndPortDependent
            }
        }
    };
    // The filtering tests need a mapping that has talked to the primary address only
    // (RFC 5780 §4.4): the one above has sent to the alternate address, which opened the
    // NAT's filter for it, so they run on a fresh socket after its own Test I.
    let conn = Conn::udp(server).map_err(|e| Failure::wire(e, "Binding", 0.0))?;
    let mut f = Client::new(conn, timeout);
    binding(&mut f, server, None)?;
    let filtering = if answered(&mut f, server, CHANGE_IP | CHANGE_PORT)? {
        Behaviour::EndpointIndependent
    } else if answered(&mut f, server, CHANGE_PORT)? {
        Behaviour::AddressDependent
    } else {
        Behaviour::AddressAndPortDependent
    };
    Ok(Nat::Classified {
        no_nat,
        mapping,
        filtering,
        other_address: other,
    })
}
