//! Service lookup: from the name a request carries to a target (reference: "Service Name
//! Definition"). Names compare case-insensitively and without a trailing dot, as DNS does.

use std::collections::HashMap;
use std::net::IpAddr;

use portico_shared::proxy_config::{ProxyService, ServiceType};
use rustls::pki_types::ServerName;

use super::access::source_allowed;
use super::tls;

/// One `[[proxy.services]]` entry, prepared for lookups.
#[derive(Debug)]
pub struct Route {
    pub index: usize,
    pub name: String,
    pub host: String,
    pub service: ProxyService,
    /// SNI and the name the target's certificate must carry; `None` if it is not a valid
    /// server name (then TLS to the target fails with a clear reason).
    pub server_name: Option<ServerName<'static>>,
}

impl Route {
    /// Whether `ip` may send requests of type `t` to this service. When the service has no
    /// port of its own for `t` and the request goes to the counterpart's port (reference:
    /// "Service Name Definition"), the counterpart's list applies too: otherwise a service
    /// with only an `http` port and `allow_from.http` would be open to all over HTTPS.
    pub fn allows(&self, t: ServiceType, ip: IpAddr) -> bool {
        source_allowed(self.service.allow_list(t), ip)
            && (self.service.ports().get(t).is_some()
                || source_allowed(self.service.allow_list(t.counterpart()), ip))
    }
}

/// Where a request of some type goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub port: u16,
    pub tls: bool,
}

#[derive(Debug)]
pub enum Lookup<'a> {
    Found(&'a Route, Target),
    /// No service has this name.
    Unknown,
    /// The service exists but has no target port for this protocol.
    NotOffered(&'a Route),
}

#[derive(Debug, Default)]
pub struct Routes {
    routes: Vec<Route>,
    by_name: HashMap<String, usize>,
}

/// Lower case, no trailing dot.
pub fn canonical_name(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl Routes {
    pub fn new(services: &[ProxyService]) -> Routes {
        let mut routes = Vec::with_capacity(services.len());
        let mut by_name = HashMap::new();
        for (index, s) in services.iter().enumerate() {
            let name = canonical_name(&s.name);
            let sni = s.target_name.as_deref().unwrap_or(&s.host);
            by_name.entry(name.clone()).or_insert(index);
            routes.push(Route {
                index,
                name,
                host: s.host.clone(),
                service: s.clone(),
                server_name: tls::server_name(sni).ok(),
            });
        }
        Routes { routes, by_name }
    }

    /// The route at `index` (as given by [`Route::index`] of this same table).
    pub fn get(&self, index: usize) -> &Route {
        &self.routes[index]
    }

    pub fn lookup(&self, name: &str, t: ServiceType) -> Lookup<'_> {
        let Some(&i) = self.by_name.get(&canonical_name(name)) else {
            return Lookup::Unknown;
        };
        let r = &self.routes[i];
        match r.service.target(t) {
            Some((port, tls)) => Lookup::Found(r, Target { port, tls }),
            None => Lookup::NotOffered(r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, f: impl FnOnce(&mut ProxyService)) -> ProxyService {
        let mut s: ProxyService =
            toml::from_str(&format!("name = \"{name}\"\nhost = \"10.0.0.1\"\n")).unwrap();
        f(&mut s);
        s
    }

    #[test]
    fn encryption_kept_or_taken_from_the_only_port() {
        let routes = Routes::new(&[
            svc("both.example", |s| {
                s.http = Some(80);
                s.https = Some(443);
            }),
            svc("tls-only.example", |s| s.ldaps = Some(636)),
            svc("plain-only.example", |s| s.sip = Some(5060)),
        ]);
        let t = |n: &str, ty| match routes.lookup(n, ty) {
            Lookup::Found(_, t) => Some((t.port, t.tls)),
            _ => None,
        };
        assert_eq!(t("both.example", ServiceType::Http), Some((80, false)));
        assert_eq!(t("BOTH.example.", ServiceType::Https), Some((443, true)));
        assert_eq!(t("tls-only.example", ServiceType::Ldap), Some((636, true)));
        assert_eq!(t("tls-only.example", ServiceType::Ldaps), Some((636, true)));
        assert_eq!(
            t("plain-only.example", ServiceType::Sips),
            Some((5060, false))
        );
        assert!(matches!(
            routes.lookup("both.example", ServiceType::Ldap),
            Lookup::NotOffered(_)
        ));
        assert!(matches!(
            routes.lookup("nope.example", ServiceType::Http),
            Lookup::Unknown
        ));
    }

    #[test]
    fn counterpart_port_needs_the_counterpart_list_too() {
        let list = |v: &[&str]| {
            Some(portico_shared::addr::CidrList::new(
                v.iter().map(|s| s.parse().unwrap()).collect(),
            ))
        };
        let routes = Routes::new(&[
            svc("plain.example", |s| {
                s.http = Some(80);
                s.allow_from.http = list(&["127.0.0.2/32"]);
            }),
            svc("both.example", |s| {
                s.http = Some(80);
                s.https = Some(443);
                s.allow_from.http = list(&["127.0.0.2/32"]);
            }),
            svc("two-lists.example", |s| {
                s.sip = Some(5060);
                s.allow_from.sip = list(&["10.0.0.0/8"]);
                s.allow_from.sips = list(&["10.1.0.0/16"]);
            }),
        ]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let route = |n: &str| match routes.lookup(n, ServiceType::Http) {
            Lookup::Found(r, _) => r,
            _ => match routes.lookup(n, ServiceType::Sip) {
                Lookup::Found(r, _) => r,
                other => panic!("{other:?}"),
            },
        };
        let plain = route("plain.example");
        assert!(plain.allows(ServiceType::Http, ip("127.0.0.2")));
        assert!(!plain.allows(ServiceType::Http, ip("127.0.0.1")));
        // HTTPS lands on the http port: the http list holds.
        assert!(!plain.allows(ServiceType::Https, ip("127.0.0.1")));
        assert!(plain.allows(ServiceType::Https, ip("127.0.0.2")));
        // With its own https port, HTTPS has its own (absent: open) list.
        let both = route("both.example");
        assert!(both.allows(ServiceType::Https, ip("127.0.0.1")));
        assert!(!both.allows(ServiceType::Http, ip("127.0.0.1")));
        // SIPS to the sip port must pass both lists.
        let two = route("two-lists.example");
        assert!(two.allows(ServiceType::Sips, ip("10.1.2.3")));
        assert!(!two.allows(ServiceType::Sips, ip("10.2.2.3")));
        assert!(two.allows(ServiceType::Sip, ip("10.2.2.3")));
    }
}
