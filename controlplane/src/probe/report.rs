//! The probe's findings: per transport, one result per step; the NAT classification; a
//! table for people, JSON for scripts, and the one-line conclusion.

use serde::Serialize;

use super::nat::Nat;

/// The steps, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// The local address (a TCP/TLS connection made).
    Host,
    /// Binding: XOR-MAPPED-ADDRESS.
    ServerReflexive,
    /// Allocate: XOR-RELAYED-ADDRESS.
    Relayed,
    /// CreatePermission, ChannelBind, packets through the relay and back.
    RoundTrip,
}

impl Step {
    pub const ALL: [Step; 4] = [
        Step::Host,
        Step::ServerReflexive,
        Step::Relayed,
        Step::RoundTrip,
    ];

    pub fn text(self) -> &'static str {
        match self {
            Step::Host => "host",
            Step::ServerReflexive => "server-reflexive",
            Step::Relayed => "relayed",
            Step::RoundTrip => "round trip",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Fail,
    /// Not run because an earlier step failed.
    Skipped,
}

/// One step over one transport.
#[derive(Debug, Clone, Serialize)]
pub struct StepResult {
    pub step: Step,
    pub status: Status,
    /// The candidate, the measurement, or the error.
    pub detail: String,
    /// For failures: timeout, connection, error_response, protocol, unable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<&'static str>,
    /// For error responses: the STUN error code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_code: Option<u16>,
}

/// Round-trip measurements.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Rtt {
    pub sent: u32,
    pub received: u32,
    pub loss_percent: f64,
    pub min_ms: Option<f64>,
    pub avg_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

/// Everything about one transport.
#[derive(Debug, Clone, Serialize)]
pub struct TransportReport {
    pub transport: &'static str,
    pub server: String,
    pub steps: Vec<StepResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_reflexive: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relayed: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub round_trip: Option<Rtt>,
}

impl TransportReport {
    /// No step failed (steps are skipped only after a failure, or without credentials).
    pub fn ok(&self) -> bool {
        !self.steps.is_empty() && self.steps.iter().all(|s| s.status != Status::Fail)
    }

    /// The first failed step.
    pub fn failure(&self) -> Option<&StepResult> {
        self.steps.iter().find(|s| s.status == Status::Fail)
    }

    pub fn name(&self) -> String {
        self.transport.to_uppercase()
    }
}

/// The whole probe.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub server: String,
    /// Whether a relay was tried (credentials given or not needed).
    pub relay_tested: bool,
    pub transports: Vec<TransportReport>,
    pub nat: Nat,
    pub success: bool,
    pub conclusion: String,
}

impl Report {
    pub fn new(
        server: String,
        relay_tested: bool,
        transports: Vec<TransportReport>,
        nat: Nat,
    ) -> Report {
        let success = !transports.is_empty() && transports.iter().all(TransportReport::ok);
        let conclusion = conclusion(&transports, relay_tested);
        Report {
            server,
            relay_tested,
            transports,
            nat,
            success,
            conclusion,
        }
    }

    /// The table and the conclusion, as printed.
    pub fn table(&self) -> String {
        let mut rows: Vec<[String; 4]> = vec![[
            "transport".into(),
            "step".into(),
            "result".into(),
            "detail".into(),
        ]];
        for t in &self.transports {
            for s in &t.steps {
                let status = match s.status {
                    Status::Ok => "OK",
                    Status::Fail => "FAIL",
                    Status::Skipped => "-",
                };
                rows.push([
                    t.name(),
                    s.step.text().to_string(),
                    status.to_string(),
                    s.detail.clone(),
                ]);
            }
        }
        let w0 = rows.iter().map(|r| r[0].len()).max().unwrap_or(0);
        let w1 = rows.iter().map(|r| r[1].len()).max().unwrap_or(0);
        let w2 = rows.iter().map(|r| r[2].len()).max().unwrap_or(0);
        let mut out = format!("Probe of {}\n\n", self.server);
        for r in &rows {
            out.push_str(format!("{:w0$}  {:w1$}  {:w2$}  {}", r[0], r[1], r[2], r[3]).trim_end());
            out.push('\n');
        }
        out.push_str(&format!("\nNAT (RFC 5780, UDP): {}\n", self.nat.text()));
        out.push_str(&format!("\n{}\n", self.conclusion));
        out
    }
}

/// "UDP", "UDP and TCP", "UDP, TCP and TLS".
fn list(names: &[String]) -> String {
    match names {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// The one-line verdict, as the reference's test tool gives it.
fn conclusion(transports: &[TransportReport], relay_tested: bool) -> String {
    let working: Vec<String> = transports
        .iter()
        .filter(|t| t.ok())
        .map(TransportReport::name)
        .collect();
    let what = if relay_tested {
        "media will flow through the relay over"
    } else {
        "the server answers STUN over"
    };
    if transports.iter().all(TransportReport::ok) && !transports.is_empty() {
        let mut s = format!("Conclusion SUCCESS: {what} {}", list(&working));
        if !relay_tested {
            s.push_str(" (relay not tested: no credentials)");
        }
        return s;
    }
    // Transports failing the same way are named together.
    let mut problems: Vec<(Vec<String>, String)> = Vec::new();
    for t in transports {
        let Some(f) = t.failure() else { continue };
        let blocked = matches!(f.error_kind, Some("timeout") | Some("connection"))
            && matches!(f.step, Step::Host | Step::ServerReflexive);
        let what = if blocked {
            format!("blocked ({})", f.detail)
        } else {
            format!("at {}: {}", f.step.text(), f.detail)
        };
        match problems.iter_mut().find(|(_, w)| *w == what) {
            Some((names, _)) => names.push(t.name()),
            None => problems.push((vec![t.name()], what)),
        }
    }
    let problems: Vec<String> = problems
        .into_iter()
        .map(|(names, what)| match what.strip_prefix("at ") {
            Some(rest) => {
                let verb = if names.len() == 1 { "fails" } else { "fail" };
                format!("{} {verb} at {rest}", list(&names))
            }
            None => format!("{} {what}", list(&names)),
        })
        .collect();
    let mut s = format!("Conclusion FAILURE: {}", problems.join("; "));
    if working.is_empty() {
        s.push_str("; no transport works");
    } else if relay_tested {
        s.push_str(&format!("; relay over {} works", list(&working)));
    } else {
        s.push_str(&format!("; STUN over {} works", list(&working)));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transport(
        name: &'static str,
        statuses: &[(Status, &str, Option<&'static str>)],
    ) -> TransportReport {
        TransportReport {
            transport: name,
            server: "192.0.2.1:3478".into(),
            steps: Step::ALL
                .iter()
                .zip(statuses)
                .map(|(step, (status, detail, kind))| StepResult {
                    step: *step,
                    status: *status,
                    detail: detail.to_string(),
                    error_kind: *kind,
                    error_code: None,
                })
                .collect(),
            host: None,
            server_reflexive: None,
            relayed: None,
            round_trip: None,
        }
    }

    const OK: (Status, &str, Option<&str>) = (Status::Ok, "x", None);
    const SKIP: (Status, &str, Option<&str>) = (Status::Skipped, "not run", None);

    #[test]
    fn verdicts() {
        let all_ok = |n| transport(n, &[OK, OK, OK, OK]);
        let r = Report::new(
            "s".into(),
            true,
            vec![all_ok("udp"), all_ok("tcp"), all_ok("tls")],
            Nat::NotRun,
        );
        assert!(r.success);
        assert_eq!(
            r.conclusion,
            "Conclusion SUCCESS: media will flow through the relay over UDP, TCP and TLS"
        );

        // Without credentials only STUN is checked, and says so.
        let r = Report::new(
            "s".into(),
            false,
            vec![transport("tcp", &[OK, OK, SKIP, SKIP])],
            Nat::NotRun,
        );
        assert!(r.success);
        assert_eq!(
            r.conclusion,
            "Conclusion SUCCESS: the server answers STUN over TCP (relay not tested: no credentials)"
        );

        // Blocked UDP, and two transports failing alike named together.
        let udp = transport(
            "udp",
            &[
                OK,
                (
                    Status::Fail,
                    "timeout: no answer to Binding within 2 s",
                    Some("timeout"),
                ),
                SKIP,
                SKIP,
            ],
        );
        let bad = (
            Status::Fail,
            "401 Unauthorized: wrong user or password",
            Some("error_response"),
        );
        let r = Report::new(
            "s".into(),
            true,
            vec![
                udp,
                transport("tcp", &[OK, OK, bad, SKIP]),
                transport("tls", &[OK, OK, bad, SKIP]),
            ],
            Nat::NotRun,
        );
        assert!(!r.success);
        assert_eq!(
            r.conclusion,
            "Conclusion FAILURE: UDP blocked (timeout: no answer to Binding within 2 s); TCP and \
             TLS fail at relayed: 401 Unauthorized: wrong user or password; no transport works"
        );
        let table = r.table();
        assert!(
            table.contains(
                "UDP        server-reflexive  FAIL    timeout: no answer to Binding within 2 s\n"
            ),
            "{table}"
        );
        assert!(table.ends_with(&format!("{}\n", r.conclusion)));

        // A certificate problem is not "blocked"; what works is named.
        let tls = transport(
            "tls",
            &[
                (
                    Status::Fail,
                    "TLS handshake: invalid peer certificate: UnknownIssuer",
                    Some("tls"),
                ),
                SKIP,
                SKIP,
                SKIP,
            ],
        );
        let r = Report::new("s".into(), true, vec![all_ok("udp"), tls], Nat::NotRun);
        assert_eq!(
            r.conclusion,
            "Conclusion FAILURE: TLS fails at host: TLS handshake: invalid peer certificate: \
             UnknownIssuer; relay over UDP works"
        );
    }
}
