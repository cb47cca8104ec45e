//! `[media]` (RTP media relay sessions) and `[nat]` (static UDP NAT maps): their typed model
//! and the checks serde cannot make. Both bind on `turn.relay_ip`.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::config::{check_duration, ConfigError, Duration, PortRange};

/// Media relay sessions, created through the API. Without `ports` the relay is off.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MediaConfig {
    /// RTP/RTCP port pairs on `turn.relay_ip`: RTP on the even port, RTCP on the next one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ports: Option<PortRange>,
    /// Latching: a leg follows a new source only this long after its first packet; after
    /// that, packets from any other source are dropped (RTP-bleed protection).
    pub learn_window: Duration,
    /// A session with no packet on any leg this long is deleted.
    pub idle_timeout: Duration,
    /// Sessions on the whole box (at most [`crate::shm::MEDIA_RECORDS`]).
    pub max_sessions: usize,
}

impl Default for MediaConfig {
    fn default() -> MediaConfig {
        MediaConfig {
            ports: None,
            learn_window: Duration::from_secs(3),
            idle_timeout: Duration::from_secs(60),
            max_sessions: 1000,
        }
    }
}

/// Static UDP NAT maps.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatConfig {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub maps: Vec<NatMap>,
}

/// Public ports on `turn.relay_ip` forwarded 1:1 onto an internal host's ports (full cone).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatMap {
    pub public_ports: PortRange,
    /// The internal host and its first port; public port `low + k` goes to `port + k`.
    pub internal: SocketAddr,
    /// External sources holding a binding at once; a new source beyond it is dropped.
    #[serde(default = "default_max_bindings")]
    pub max_bindings: usize,
    /// A binding with no packet either way this long is removed.
    #[serde(default = "default_binding_idle")]
    pub idle_timeout: Duration,
}

fn default_max_bindings() -> usize {
    1024
}

fn default_binding_idle() -> Duration {
    Duration::from_secs(120)
}

fn err(key: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.to_string(),
        problem: problem.into(),
    }
}

fn overlap(a: PortRange, b: PortRange) -> bool {
    a.low() <= b.high() && b.low() <= a.high()
}

impl NatMap {
    /// Checks one map (key is `nat.maps[i]`).
    pub fn validate(&self, key: &str) -> Result<(), ConfigError> {
        let ip = self.internal.ip();
        if ip.is_unspecified() || ip.is_multicast() || self.internal.port() == 0 {
            return Err(err(
                &format!("{key}.internal"),
                format!("{} is not a unicast address with a port", self.internal),
            ));
        }
        if usize::from(self.internal.port()) + self.public_ports.len() - 1 > 65535 {
            return Err(err(
                &format!("{key}.internal"),
                format!(
                    "{} + {} ports runs past port 65535",
                    self.internal,
                    self.public_ports.len()
                ),
            ));
        }
        if self.public_ports.len() > 1024 {
            return Err(err(
                &format!("{key}.public_ports"),
                format!("{} is more than 1024 ports", self.public_ports),
            ));
        }
        if self.max_bindings == 0 || self.max_bindings > 65536 {
            return Err(err(
                &format!("{key}.max_bindings"),
                format!("{} is not between 1 and 65536", self.max_bindings),
            ));
        }
        check_duration(&format!("{key}.idle_timeout"), self.idle_timeout, 1, 86_400)
    }
}

/// Checks `[media]` and `[nat]` against each other and `turn.relay_ports`.
pub fn validate(media: &MediaConfig, nat: &NatConfig, relay: PortRange) -> Result<(), ConfigError> {
    if let Some(p) = media.ports {
        if p.len() < 2 || (p.low() % 2 == 1 && p.len() < 3) {
            return Err(err(
                "media.ports",
                format!("\"{p}\" holds no even/odd port pair (RTP even, RTCP = RTP + 1)"),
            ));
        }
        if overlap(p, relay) {
            return Err(err(
                "media.ports",
                format!("\"{p}\" overlaps turn.relay_ports (\"{relay}\")"),
            ));
        }
    }
    check_duration("media.learn_window", media.learn_window, 0, 300)?;
    check_duration("media.idle_timeout", media.idle_timeout, 1, 86_400)?;
    if media.max_sessions == 0 || media.max_sessions > crate::shm::MEDIA_RECORDS {
        return Err(err(
            "media.max_sessions",
            format!(
                "{} is not between 1 and {}",
                media.max_sessions,
                crate::shm::MEDIA_RECORDS
            ),
        ));
    }
    if nat.maps.len() > MAX_NAT_MAPS {
        return Err(err(
            "nat.maps",
            format!("{} maps is more than {MAX_NAT_MAPS}", nat.maps.len()),
        ));
    }
    for (i, m) in nat.maps.iter().enumerate() {
        let key = format!("nat.maps[{i}]");
        m.validate(&key)?;
        let pk = format!("{key}.public_ports");
        if let Some(j) = nat.maps[..i]
            .iter()
            .position(|o| overlap(o.public_ports, m.public_ports))
        {
            return Err(err(
                &pk,
                format!(
                    "\"{}\" overlaps nat.maps[{j}] (\"{}\")",
                    m.public_ports, nat.maps[j].public_ports
                ),
            ));
        }
        if overlap(m.public_ports, relay) {
            return Err(err(
                &pk,
                format!("\"{}\" overlaps turn.relay_ports", m.public_ports),
            ));
        }
        if let Some(p) = media.ports.filter(|p| overlap(*p, m.public_ports)) {
            return Err(err(
                &pk,
                format!("\"{}\" overlaps media.ports (\"{p}\")", m.public_ports),
            ));
        }
    }
    Ok(())
}

/// Most `[[nat.maps]]` entries.
pub const MAX_NAT_MAPS: usize = 256;

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn load(extra: &str) -> Result<Config, String> {
        Config::from_toml(extra).map_err(|e| e.to_string())
    }

    #[test]
    fn media_and_nat_load_and_bad_values_name_their_key() {
        let c = load(
            "[media]\nports = \"40000-40999\"\nlearn_window = \"3s\"\n\
             [[nat.maps]]\npublic_ports = \"5004-5005\"\ninternal = \"10.0.2.10:5004\"\n",
        )
        .unwrap();
        assert_eq!(c.media.ports.unwrap().low(), 40000);
        assert_eq!(c.nat.maps[0].max_bindings, 1024);
        let text = c.to_toml();
        assert_eq!(Config::from_toml(&text).unwrap(), c);
        for (bad, key) in [
            ("[media]\nports = \"40000\"\n", "media.ports:"),
            ("[media]\nports = \"40001-40001\"\n", "media.ports:"),
            ("[media]\nports = \"20000-20100\"\n", "media.ports:"),
            ("[media]\nlearn_window = \"1h\"\n", "media.learn_window:"),
            ("[media]\nidle_timeout = \"0s\"\n", "media.idle_timeout:"),
            ("[media]\nmax_sessions = 0\n", "media.max_sessions:"),
            (
                "[[nat.maps]]\npublic_ports = \"5004-5005\"\ninternal = \"0.0.0.0:5\"\n",
                "nat.maps[0].internal:",
            ),
            (
                "[[nat.maps]]\npublic_ports = \"5004-5005\"\ninternal = \"10.0.0.1:1\"\n\
                 [[nat.maps]]\npublic_ports = \"5005-5006\"\ninternal = \"10.0.0.1:1\"\n",
                "nat.maps[1].public_ports:",
            ),
            (
                "[media]\nports = \"5000-5009\"\n[[nat.maps]]\npublic_ports = \"5004-5005\"\ninternal = \"10.0.0.1:1\"\n",
                "nat.maps[0].public_ports:",
            ),
            (
                "[[nat.maps]]\npublic_ports = \"5004-5005\"\ninternal = \"10.0.0.1:1\"\nmax_bindings = 0\n",
                "nat.maps[0].max_bindings:",
            ),
        ] {
            let e = load(bad).unwrap_err();
            assert!(e.starts_with(key), "{bad}: {e}");
        }
    }
}
