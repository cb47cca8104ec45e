//! Configuration of the reverse proxy (`[proxy]`): listeners per service type, TLS, services,
//! access limitation, redirects and limits.
//!
//! The model follows the reference's "Reverse Proxy" chapter: a *service type* (HTTP, HTTPS,
//! SIP, SIPS, H.323, H.323/TLS, LDAP, LDAPS) is served only when `[proxy.listen]` gives it an
//! address; a *service name* (`[[proxy.services]]`) is what a request names (HTTP Host, SIP
//! From domain, LDAP bind domain, H.323 gatekeeper id) and says where such requests go.
//! Owned by the reverse-proxy work; `Config` embeds it and calls [`ProxyConfig::validate`].

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::addr::CidrList;
use crate::config::{check_duration, ConfigError, Duration};

fn err(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        problem: problem.into(),
    }
}

/// The protocols the proxy tells apart. Plain and TLS flavours are separate types because the
/// reference configures (and limits access to) them separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ServiceType {
    Http,
    Https,
    Sip,
    Sips,
    H323,
    H323Tls,
    Ldap,
    Ldaps,
}

impl ServiceType {
    pub const ALL: [ServiceType; 8] = [
        ServiceType::Http,
        ServiceType::Https,
        ServiceType::Sip,
        ServiceType::Sips,
        ServiceType::H323,
        ServiceType::H323Tls,
        ServiceType::Ldap,
        ServiceType::Ldaps,
    ];

    /// The key used in `[proxy.listen]`, `allow_from` and metrics labels.
    pub fn key(self) -> &'static str {
        match self {
            ServiceType::Http => "http",
            ServiceType::Https => "https",
            ServiceType::Sip => "sip",
            ServiceType::Sips => "sips",
            ServiceType::H323 => "h323",
            ServiceType::H323Tls => "h323_tls",
            ServiceType::Ldap => "ldap",
            ServiceType::Ldaps => "ldaps",
        }
    }

    /// Whether clients of this type speak TLS to the proxy.
    pub fn is_tls(self) -> bool {
        matches!(
            self,
            ServiceType::Https | ServiceType::Sips | ServiceType::H323Tls | ServiceType::Ldaps
        )
    }

    /// The same protocol with the other encryption: HTTP <-> HTTPS and so on.
    pub fn counterpart(self) -> ServiceType {
        match self {
            ServiceType::Http => ServiceType::Https,
            ServiceType::Https => ServiceType::Http,
            ServiceType::Sip => ServiceType::Sips,
            ServiceType::Sips => ServiceType::Sip,
            ServiceType::H323 => ServiceType::H323Tls,
            ServiceType::H323Tls => ServiceType::H323,
            ServiceType::Ldap => ServiceType::Ldaps,
            ServiceType::Ldaps => ServiceType::Ldap,
        }
    }
}

impl fmt::Display for ServiceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key())
    }
}

/// One optional value per service type: listen addresses, target ports, CIDR lists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, bound(deserialize = "T: Deserialize<'de>"))]
pub struct PerType<T> {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<T>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub https: Option<T>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sip: Option<T>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sips: Option<T>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub h323: Option<T>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub h323_tls: Option<T>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ldap: Option<T>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ldaps: Option<T>,
}

// By hand: the derive would demand `T: Default`, which a table of absent values does not need.
impl<T> Default for PerType<T> {
    fn default() -> PerType<T> {
        PerType {
            http: None,
            https: None,
            sip: None,
            sips: None,
            h323: None,
            h323_tls: None,
            ldap: None,
            ldaps: None,
        }
    }
}

impl<T> PerType<T> {
    pub fn get(&self, t: ServiceType) -> Option<&T> {
        match t {
            ServiceType::Http => self.http.as_ref(),
            ServiceType::Https => self.https.as_ref(),
            ServiceType::Sip => self.sip.as_ref(),
            ServiceType::Sips => self.sips.as_ref(),
            ServiceType::H323 => self.h323.as_ref(),
            ServiceType::H323Tls => self.h323_tls.as_ref(),
            ServiceType::Ldap => self.ldap.as_ref(),
            ServiceType::Ldaps => self.ldaps.as_ref(),
        }
    }

    /// The set entries, in [`ServiceType::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = (ServiceType, &T)> {
        ServiceType::ALL
            .into_iter()
            .filter_map(move |t| self.get(t).map(|v| (t, v)))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// `[proxy.listen]`: the address each service type is served on; a type without one is
    /// not served at all.
    pub listen: PerType<SocketAddr>,
    pub tls: ProxyTls,
    /// Peers (e.g. a load balancer in front of Portico) whose `X-Forwarded-For` and
    /// `X-Forwarded-Proto` are kept and appended to; from anyone else they are replaced.
    #[serde(skip_serializing_if = "CidrList::is_empty")]
    pub trusted_proxies: CidrList,
    /// `[proxy.redirect]`: service types that answer every request with a redirect instead of
    /// forwarding it (reference: "Local service type conflicts"). HTTP and HTTPS only.
    pub redirect: PerType<Redirect>,
    pub limits: ProxyLimits,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ProxyService>,
    /// One port for HTTPS and TURN over TLS: a connection on the `https` listener that offers
    /// ALPN `stun.turn` (RFC 7443), or whose first decrypted bytes are a STUN header with the
    /// magic cookie or a ChannelData header, is handed to the dataplane's TURN engine instead
    /// of being served as HTTPS. Off by default.
    #[serde(skip_serializing_if = "is_false")]
    pub turn_on_https: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The unix datagram socket in `state_dir` on which the dataplane takes TURN connections the
/// proxy hands over (`proxy.turn_on_https`); owner-only, like the directory.
pub const TURN_HANDOFF_SOCKET: &str = "turn-handoff.sock";

/// `[proxy.tls]`: the certificate clients see, and the trust store for targets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyTls {
    /// PEM certificate chain (leaf first). Unset: the generated `<state_dir>/cert.pem`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1). Unset: `<state_dir>/key.pem`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// PEM CA certificates trusted for targets' certificates, in addition to the system
    /// store (`/etc/ssl/certs/ca-certificates.crt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// PEM CA certificates that client certificates must chain to for Check Certificate
    /// (a service's `check_certificate`): the proxy's trust list for H.323/TLS and SIPS
    /// registrations. Required when any service sets `check_certificate = true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca_file: Option<PathBuf>,
}

/// A redirect answered by a service type: same host and path, another scheme and/or port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Redirect {
    /// `"http"` or `"https"`; unset keeps the scheme of the listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// Port in the `Location`; unset leaves the port out (the scheme's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// 301, 302, 307 or 308 (default: 308, which keeps the method and body).
    #[serde(default = "default_redirect_status")]
    pub status: u16,
}

fn default_redirect_status() -> u16 {
    308
}

/// `[proxy.limits]`: what one client, and all clients together, may hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyLimits {
    /// Client connections open at once over all service types.
    pub max_connections: usize,
    /// Client connections open at once from one IP address (IPv6: one /64). Sized for an
    /// office behind one NAT address: 50 browsers with 6 connections per host each plus
    /// their WebSockets. Going over it closes the new connection only, and is not counted
    /// toward blacklisting. Trusted proxies are held to `max_connections` alone.
    pub max_connections_per_ip: usize,
    /// Largest request or response head (HTTP, SIP) or first LDAP message, in bytes.
    pub max_header_bytes: usize,
    /// How long a client has for the TLS handshake plus its first complete request head
    /// (plain numbers: seconds, as for the other two).
    pub first_message_timeout: Duration,
    /// How long a connection may stay without traffic in either direction.
    pub idle_timeout: Duration,
    /// How long connecting (TCP and TLS) to a target may take.
    pub connect_timeout: Duration,
}

impl Default for ProxyLimits {
    fn default() -> ProxyLimits {
        ProxyLimits {
            max_connections: 4096,
            max_connections_per_ip: 512,
            max_header_bytes: 16 * 1024,
            first_message_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// `[[proxy.services]]`: a service name and where its requests go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyService {
    /// What requests name: HTTP `Host` (port ignored), SIP `From` domain, LDAP bind domain.
    /// Compared case-insensitively.
    pub name: String,
    /// Target host: an IP address or a DNS name.
    pub host: String,
    /// Target ports by service type (`http`, `https`, `sip`, `sips`, `h323`, `h323_tls`,
    /// `ldap`, `ldaps`). With both a plain and a TLS port of one protocol, the
    /// encryption is kept; with only one, both kinds are forwarded with that one's encryption.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub https: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sip: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sips: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub h323: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub h323_tls: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ldap: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ldaps: Option<u16>,
    /// HTTP(S) URL allow-list (case-sensitive head match; when the matching entry ends with
    /// `/`, the rest of the path must contain no `/`). Empty: every path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    /// Allowed client networks per service type; a type without a list is open to all.
    #[serde(default)]
    pub allow_from: PerType<CidrList>,
    /// Verify the target's TLS certificate against the trust store (`verify_target` is the
    /// same key, shorter). Unset: on; see [`ProxyService::verifies_target`].
    #[serde(
        default,
        alias = "verify_target",
        skip_serializing_if = "Option::is_none"
    )]
    pub verify_target_certificate: Option<bool>,
    /// Check Certificate (reference: "Reverse Proxy and PBX Interaction"): an H.323/TLS or
    /// SIPS registration goes to the target over TLS only when the client's certificate
    /// chains to `proxy.tls.client_ca_file` and names the registration; every other request
    /// of the service goes over TCP. Unset: off (forwarding keeps the client's encryption).
    /// Before this meaning, the key meant what `verify_target_certificate` means now: see
    /// [`ProxyConfig::warnings`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_certificate: Option<bool>,
    /// Name the target's certificate must carry and sent as SNI; default: `host`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_name: Option<String>,
    /// Send a PROXY protocol v2 header with the client's address first on every connection
    /// to the target.
    #[serde(default)]
    pub proxy_protocol: bool,
}

impl ProxyService {
    /// Whether the target's TLS certificate is verified (`verify_target_certificate`,
    /// default on).
    pub fn verifies_target(&self) -> bool {
        self.verify_target_certificate.unwrap_or(true)
    }

    /// Whether Check Certificate is on (`check_certificate`, default off).
    pub fn checks_client_certificate(&self) -> bool {
        self.check_certificate.unwrap_or(false)
    }

    /// The target ports as one per-type value.
    pub fn ports(&self) -> PerType<u16> {
        PerType {
            http: self.http,
            https: self.https,
            sip: self.sip,
            sips: self.sips,
            h323: self.h323,
            h323_tls: self.h323_tls,
            ldap: self.ldap,
            ldaps: self.ldaps,
        }
    }

    /// The port and encryption to use for a request of type `t`, per the reference's
    /// "Service Name Definition": same encryption when both ports exist, else whichever one is
    /// configured.
    pub fn target(&self, t: ServiceType) -> Option<(u16, bool)> {
        let ports = self.ports();
        if let Some(p) = ports.get(t) {
            return Some((*p, t.is_tls()));
        }
        let other = t.counterpart();
        ports.get(other).map(|p| (*p, other.is_tls()))
    }

    /// The CIDR list for type `t`, if one is configured.
    pub fn allow_list(&self, t: ServiceType) -> Option<&CidrList> {
        self.allow_from.get(t)
    }
}

impl ProxyConfig {
    /// What in this section is accepted but probably not meant, one sentence each, to be
    /// logged when the configuration is loaded. Today: `check_certificate` set in a service
    /// that does not set `verify_target_certificate`. Until the key took the reference's
    /// meaning (Check Certificate), it meant verifying the target's certificate: a file
    /// written then with `check_certificate = false` to reach a self-signed PBX now turns
    /// that verification back on, and one with `true` now asks clients for certificates.
    /// A service that sets both keys was written for the new meaning: no warning.
    pub fn warnings(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        if self.turn_on_https && self.listen.https.is_none() {
            out.push(
                "proxy.turn_on_https is on but proxy.listen.https is not set: no connection \
                 can be handed to TURN"
                    .to_string(),
            );
        }
        out.extend(
            self.services
                .iter()
                .enumerate()
                .filter(|(_, s)| {
                    s.check_certificate.is_some() && s.verify_target_certificate.is_none()
                })
                .map(|(i, s)| {
                    format!(
                        "proxy.services[{i}].check_certificate ({}) now means Check Certificate \
                     (client certificates of H.323/TLS and SIPS registrations); verifying the \
                     target's certificate moved to verify_target_certificate (default true): \
                     set it to say which you mean",
                        s.name
                    )
                }),
        );
        out
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let listen: Vec<(ServiceType, &SocketAddr)> = self.listen.iter().collect();
        for (i, (t, a)) in listen.iter().enumerate() {
            if a.port() == 0 {
                return Err(err(
                    format!("proxy.listen.{t}"),
                    format!("\"{a}\" needs a port"),
                ));
            }
            if let Some((o, _)) = listen[..i].iter().find(|(_, b)| b == a) {
                return Err(err(
                    format!("proxy.listen.{t}"),
                    format!("\"{a}\" is already used by proxy.listen.{o}"),
                ));
            }
        }
        for (key, p) in [
            ("proxy.tls.cert", &self.tls.cert),
            ("proxy.tls.key", &self.tls.key),
        ] {
            if p.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                return Err(err(key, "must not be empty"));
            }
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return Err(err(
                "proxy.tls",
                "give both cert and key, or neither (then the generated pair in the state dir is used)",
            ));
        }
        for (t, r) in self.redirect.iter() {
            let key = format!("proxy.redirect.{t}");
            if !matches!(t, ServiceType::Http | ServiceType::Https) {
                return Err(err(key, "redirects exist for http and https only"));
            }
            if let Some(s) = &r.scheme {
                if s != "http" && s != "https" {
                    return Err(err(
                        format!("{key}.scheme"),
                        format!("\"{s}\" is not \"http\" or \"https\""),
                    ));
                }
            }
            if r.port == Some(0) {
                return Err(err(format!("{key}.port"), "0 is not a port"));
            }
            if ![301, 302, 307, 308].contains(&r.status) {
                return Err(err(
                    format!("{key}.status"),
                    format!("{} is not 301, 302, 307 or 308", r.status),
                ));
            }
        }
        let l = &self.limits;
        for (key, v, min, max) in [
            (
                "proxy.limits.max_connections",
                l.max_connections,
                1,
                1_000_000,
            ),
            (
                "proxy.limits.max_connections_per_ip",
                l.max_connections_per_ip,
                1,
                1_000_000,
            ),
            (
                "proxy.limits.max_header_bytes",
                l.max_header_bytes,
                1024,
                1 << 20,
            ),
        ] {
            if v < min || v > max {
                return Err(err(key, format!("{v} is not between {min} and {max}")));
            }
        }
        for (key, d, max) in [
            (
                "proxy.limits.first_message_timeout",
                l.first_message_timeout,
                3600,
            ),
            ("proxy.limits.idle_timeout", l.idle_timeout, 86_400),
            ("proxy.limits.connect_timeout", l.connect_timeout, 600),
        ] {
            check_duration(key, d, 1, max)?;
        }
        for (i, s) in self.services.iter().enumerate() {
            validate_service(i, s)?;
            if s.checks_client_certificate() && self.tls.client_ca_file.is_none() {
                return Err(err(
                    format!("proxy.services[{i}].check_certificate"),
                    "needs proxy.tls.client_ca_file, the CAs client certificates must chain to",
                ));
            }
            if let Some(o) = self.services[..i]
                .iter()
                .position(|o| o.name.eq_ignore_ascii_case(&s.name))
            {
                return Err(err(
                    format!("proxy.services[{i}].name"),
                    format!("\"{}\" is already the name of proxy.services[{o}]", s.name),
                ));
            }
        }
        Ok(())
    }
}

fn validate_service(i: usize, s: &ProxyService) -> Result<(), ConfigError> {
    let key = |k: &str| format!("proxy.services[{i}].{k}");
    if s.name.is_empty() || s.name.len() > 253 {
        return Err(err(key("name"), "must be 1 to 253 characters"));
    }
    if s.name
        .bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(err(
            key("name"),
            format!("\"{}\" contains white space", s.name),
        ));
    }
    if !valid_host(&s.host) {
        return Err(err(
            key("host"),
            format!("\"{}\" is not an IP address or a DNS name", s.host),
        ));
    }
    if let Some(n) = &s.target_name {
        if !valid_host(n) {
            return Err(err(
                key("target_name"),
                format!("\"{n}\" is not an IP address or a DNS name"),
            ));
        }
    }
    for (t, p) in s.ports().iter() {
        if *p == 0 {
            return Err(err(key(t.key()), "0 is not a port"));
        }
    }
    for (j, u) in s.urls.iter().enumerate() {
        if !u.starts_with('/') {
            return Err(err(
                format!("{}[{j}]", key("urls")),
                format!("\"{u}\" must start with /"),
            ));
        }
        if u.contains(['?', '#', '\\']) || u.contains("//") || u.bytes().any(|b| b <= b' ') {
            return Err(err(
                format!("{}[{j}]", key("urls")),
                format!("\"{u}\" is not a normalised path (no ?, #, \\, //, spaces)"),
            ));
        }
    }
    Ok(())
}

/// An IP literal or a DNS name of letters, digits, `-`, `_` and dots.
fn valid_host(h: &str) -> bool {
    if h.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    use super::*;

    const EXAMPLE: &str = r#"
[proxy.listen]
http = "127.0.0.1:8080"
https = "127.0.0.1:8443"
ldap = "[::1]:3389"

[proxy.tls]
cert = "/etc/portico/cert.pem"
key = "/etc/portico/key.pem"

[proxy.redirect]
http = { scheme = "https", port = 8443 }

[proxy.limits]
idle_timeout = 60

[[proxy.services]]
name = "pbx.example.com"
host = "10.0.0.5"
http = 80
https = 443
ldap = 389
urls = ["/PBX0/APPS/", "/PBX0/APPCLIENT/appclient.htm"]
allow_from = { http = ["0.0.0.0/0"], ldap = ["10.0.0.0/8", "fd00::/8"] }
verify_target = false
proxy_protocol = true
"#;

    #[test]
    fn example_parses_and_round_trips() {
        let c = Config::from_toml(EXAMPLE).unwrap();
        let p = &c.proxy;
        assert_eq!(p.listen.https, Some("127.0.0.1:8443".parse().unwrap()));
        assert_eq!(p.listen.sip, None);
        assert_eq!(p.limits.idle_timeout.as_secs(), 60);
        assert_eq!(p.limits.max_connections, 4096);
        // The per-source default fits an office NAT (50 browsers x 6 + WebSockets) and
        // stays below the total.
        let d = ProxyLimits::default();
        assert!(d.max_connections_per_ip >= 50 * 6 + 50);
        assert!(d.max_connections > d.max_connections_per_ip);
        let s = &p.services[0];
        assert!(!s.verifies_target(), "verify_target is an alias");
        assert!(!s.checks_client_certificate());
        assert_eq!(s.target(ServiceType::Https), Some((443, true)));
        assert_eq!(s.target(ServiceType::Ldaps), Some((389, false)));
        assert_eq!(s.target(ServiceType::Sip), None);
        assert!(s
            .allow_list(ServiceType::Ldap)
            .unwrap()
            .contains("fd00::1".parse().unwrap()));
        assert!(s.allow_list(ServiceType::Https).is_none());
        let back = Config::from_toml(&c.to_toml()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn target_verification_defaults_to_on_and_check_certificate_to_off() {
        let c = Config::from_toml("[[proxy.services]]\nname = \"a\"\nhost = \"b\"\n").unwrap();
        assert!(c.proxy.services[0].verifies_target());
        assert!(!c.proxy.services[0].checks_client_certificate());
        assert!(c.proxy.warnings().is_empty());
        let c = Config::from_toml(
            "[[proxy.services]]\nname = \"a\"\nhost = \"b\"\nverify_target_certificate = false\n",
        )
        .unwrap();
        assert!(!c.proxy.services[0].verifies_target());
        // Round trip keeps what was (not) written.
        assert_eq!(Config::from_toml(&c.to_toml()).unwrap(), c);
    }

    #[test]
    fn check_certificate_of_the_old_meaning_is_warned_about() {
        // Written before the rename: the old key alone.
        let old = Config::from_toml(
            "[[proxy.services]]\nname = \"a\"\nhost = \"b\"\ncheck_certificate = false\n",
        )
        .unwrap();
        let w = old.proxy.warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("proxy.services[0].check_certificate"),
            "{w:?}"
        );
        assert!(w[0].contains("verify_target_certificate"), "{w:?}");
        // The new meaning needs the client trust list, named in the error.
        let e = Config::from_toml(
            "[[proxy.services]]\nname = \"a\"\nhost = \"b\"\ncheck_certificate = true\nverify_target_certificate = true\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("proxy.services[0].check_certificate"), "{e}");
        assert!(e.contains("client_ca_file"), "{e}");
        // Both keys: written for the new meaning, no warning.
        let new = Config::from_toml(
            "[proxy.tls]\nclient_ca_file = \"/etc/ca.pem\"\n[[proxy.services]]\nname = \"a\"\nhost = \"b\"\ncheck_certificate = true\nverify_target_certificate = true\n",
        )
        .unwrap();
        assert!(new.proxy.services[0].checks_client_certificate());
        assert!(new.proxy.warnings().is_empty());
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("[[proxy.services]]\nname = \"a\"\nhost = \"b c\"\n", "proxy.services[0].host"),
            (
                "[[proxy.services]]\nname = \"a\"\nhost = \"b\"\n[[proxy.services]]\nname = \"A\"\nhost = \"b\"\n",
                "proxy.services[1].name",
            ),
            (
                "[[proxy.services]]\nname = \"a\"\nhost = \"b\"\nallow_from = { sip = [\"10.0.0.0/33\"] }\n",
                "proxy.services[0].allow_from.sip[0]",
            ),
            (
                "[[proxy.services]]\nname = \"a\"\nhost = \"b\"\nurls = [\"PBX0\"]\n",
                "proxy.services[0].urls[0]",
            ),
            (
                "[proxy.listen]\nhttp = \"127.0.0.1:1\"\nhttps = \"127.0.0.1:1\"\n",
                "proxy.listen.https",
            ),
            ("[proxy.redirect]\nsip = { port = 1 }\n", "proxy.redirect.sip"),
            ("[proxy.limits]\nmax_header_bytes = 10\n", "proxy.limits.max_header_bytes"),
            ("[proxy.tls]\ncert = \"/x\"\n", "proxy.tls"),
            ("[proxy]\ntrusted_proxies = [\"x\"]\n", "proxy.trusted_proxies[0]"),
            ("[proxy.limits]\nidle_timeout = 0\n", "proxy.limits.idle_timeout"),
            ("[proxy.limits]\nconnect_timeout = \"1h\"\n", "proxy.limits.connect_timeout"),
            ("[proxy.limits]\nfirst_message_timeout = \"x\"\n", "proxy.limits.first_message_timeout"),
        ];
        for (text, key) in cases {
            let e = Config::from_toml(text).unwrap_err();
            assert_eq!(e.key, key, "{text}: {e}");
        }
    }

    #[test]
    fn unknown_keys_are_errors() {
        for text in [
            "[proxy.listen]\nhttpz = \"127.0.0.1:1\"\n",
            "[[proxy.services]]\nname = \"a\"\nhost = \"b\"\nbogus = 1\n",
            "[[proxy.services]]\nname = \"a\"\nhost = \"b\"\nallow_from = { web = [] }\n",
            "[proxy.limits]\nmax_conns = 1\n",
        ] {
            let e = Config::from_toml(text).unwrap_err();
            assert!(e.to_string().contains("unknown field"), "{text}: {e}");
        }
    }
}
