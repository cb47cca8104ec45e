//! Access limitation (reference: "Access Limitation"): source networks per service type, and
//! the HTTP URL allow-list with the path normalised first, so that `..`, `//`, `.` and
//! percent-encoding cannot make a request the target will read as one path pass the rule as
//! another. The normalised path is also what the target receives.

use std::fmt;
use std::net::IpAddr;

use portico_shared::addr::CidrList;

/// Whether `ip` may use a service of a type whose list is `allow` (`None`: no list, open).
pub fn source_allowed(allow: Option<&CidrList>, ip: IpAddr) -> bool {
    let ip = canonical_ip(ip);
    allow.is_none_or(|l| l.contains(ip))
}

/// IPv4 clients on a dual-stack socket arrive as `::ffff:a.b.c.d`; lists name them as IPv4.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// The reference's URL rule: an entry must match the head of the path; when that entry ends
/// with `/`, the rest of the path must contain no `/`. Case-sensitive. No entries: all paths.
pub fn url_allowed(urls: &[String], path: &str) -> bool {
    urls.is_empty()
        || urls.iter().any(|u| match path.strip_prefix(u.as_str()) {
            Some(rest) => !u.ends_with('/') || !rest.contains('/'),
            None => false,
        })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// Not origin-form (`/...`).
    NotAPath,
    /// `%` not followed by two hex digits.
    BadEscape,
    /// An encoded `/`, `\`, NUL or control character, or a raw `\`: ways to hide a separator.
    HiddenSeparator,
    /// `..` above the root.
    AboveRoot,
    /// A `.` or `..` segment with parameters (`..;x`): servlet containers strip the
    /// parameters and then resolve the dots, which the rule here would not have seen.
    DotWithParams,
}

impl PathError {
    pub fn as_str(&self) -> &'static str {
        match self {
            PathError::NotAPath => "request target is not a path",
            PathError::BadEscape => "bad percent-escape in path",
            PathError::HiddenSeparator => "encoded separator or control character in path",
            PathError::AboveRoot => "path climbs above the root",
            PathError::DotWithParams => "dot segment with parameters in path",
        }
    }
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request target split into its normalised path and its untouched query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalTarget {
    pub path: String,
    pub query: Option<String>,
}

impl NormalTarget {
    /// The target to send on: normalised path plus the original query.
    pub fn to_target(&self) -> String {
        match &self.query {
            Some(q) => format!("{}?{q}", self.path),
            None => self.path.clone(),
        }
    }
}

/// Normalises an origin-form request target: decodes percent-escapes of unreserved characters
/// (so `%2E%2E` is `..`), refuses encoded separators, removes empty and `.` segments, resolves
/// `..`, and keeps a trailing `/`. The query is not part of the match and is kept as sent.
pub fn normalize_target(target: &str) -> Result<NormalTarget, PathError> {
    let (raw_path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q.to_string())),
        None => (target, None),
    };
    if !raw_path.starts_with('/') || raw_path.contains('#') {
        return Err(PathError::NotAPath);
    }
    let decoded = decode_unreserved(raw_path)?;
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing = false;
    for seg in decoded.split('/').skip(1) {
        trailing = false;
        if seg.contains(';') || seg.contains("%3B") {
            let base = seg.split(';').next().unwrap_or(seg);
            let base = base.split("%3B").next().unwrap_or(base);
            if base == "." || base == ".." {
                return Err(PathError::DotWithParams);
            }
        }
        match seg {
            "" | "." => trailing = true,
            ".." => {
                if segments.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
                trailing = true;
            }
            s => segments.push(s),
        }
    }
    let mut path = String::with_capacity(decoded.len());
    for s in &segments {
        path.push('/');
        path.push_str(s);
    }
    if trailing || segments.is_empty() {
        path.push('/');
    }
    Ok(NormalTarget { path, query })
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes `%XX` of unreserved characters (RFC 3986 2.3); other escapes stay escaped (with
/// upper-case digits) so the result still means the same to the target.
fn decode_unreserved(p: &str) -> Result<String, PathError> {
    let b = p.as_bytes();
    let mut out = String::with_capacity(p.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let (h, l) = match (
                    b.get(i + 1).and_then(|&c| hex(c)),
                    b.get(i + 2).and_then(|&c| hex(c)),
                ) {
                    (Some(h), Some(l)) => (h, l),
                    _ => return Err(PathError::BadEscape),
                };
                let c = h << 4 | l;
                if c == b'/' || c == b'\\' || c < 0x20 || c == 0x7f {
                    return Err(PathError::HiddenSeparator);
                }
                if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                    out.push(char::from(c));
                } else {
                    out.push_str(&format!("%{c:02X}"));
                }
                i += 3;
            }
            b'\\' => return Err(PathError::HiddenSeparator),
            c if c < 0x20 || c == 0x7f => return Err(PathError::HiddenSeparator),
            _ => {
                // Copy a run of ordinary characters at once (keeps UTF-8 intact).
                let start = i;
                while i < b.len() && !matches!(b[i], b'%' | b'\\') && b[i] >= 0x20 && b[i] != 0x7f {
                    i += 1;
                }
                out.push_str(&p[start..i]);
                continue;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(t: &str) -> Result<String, PathError> {
        normalize_target(t).map(|n| n.to_target())
    }

    #[test]
    fn normalises_dots_slashes_and_escapes() {
        assert_eq!(norm("/"), Ok("/".into()));
        assert_eq!(norm("/a//b/./c"), Ok("/a/b/c".into()));
        assert_eq!(norm("/a/b/../c/"), Ok("/a/c/".into()));
        assert_eq!(norm("/a/b/.."), Ok("/a/".into()));
        assert_eq!(
            norm("/PBX0/%41PPS/x?y=/../z"),
            Ok("/PBX0/APPS/x?y=/../z".into())
        );
        assert_eq!(norm("/a/%2e%2E/b"), Ok("/b".into()));
        assert_eq!(norm("/a%20b/%c3%a9"), Ok("/a%20b/%C3%A9".into()));
        assert_eq!(norm("/ä/x"), Ok("/ä/x".into()));
    }

    #[test]
    fn refuses_escapes_that_hide_structure() {
        assert_eq!(norm("/a%2Fb"), Err(PathError::HiddenSeparator));
        assert_eq!(norm("/a%2fb"), Err(PathError::HiddenSeparator));
        assert_eq!(norm("/a%5Cb"), Err(PathError::HiddenSeparator));
        assert_eq!(norm("/a\\b"), Err(PathError::HiddenSeparator));
        assert_eq!(norm("/a%00"), Err(PathError::HiddenSeparator));
        assert_eq!(norm("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(norm("/a%2"), Err(PathError::BadEscape));
        assert_eq!(norm("/.."), Err(PathError::AboveRoot));
        assert_eq!(norm("/a/../../b"), Err(PathError::AboveRoot));
        assert_eq!(norm("*"), Err(PathError::NotAPath));
        assert_eq!(norm("a/b"), Err(PathError::NotAPath));
    }

    #[test]
    fn refuses_dot_segments_with_parameters() {
        for t in [
            "/a/..;/b",
            "/a/..;x=1/b",
            "/a/.;/b",
            "/a/%2e%2e;/b",
            "/a/..%3b/b",
            "/a/..%3B/b",
            "/..;/x",
        ] {
            assert_eq!(norm(t), Err(PathError::DotWithParams), "{t}");
        }
        // Parameters on ordinary segments, and dots inside names, are fine.
        assert_eq!(norm("/a;jsessionid=1/b"), Ok("/a;jsessionid=1/b".into()));
        assert_eq!(norm("/a/...;/b"), Ok("/a/...;/b".into()));
        assert_eq!(norm("/a/b?x=..;/"), Ok("/a/b?x=..;/".into()));
    }

    #[test]
    fn reference_url_rule() {
        let urls = vec![
            "/PBX0/APPS/".to_string(),
            "/PBX0/APPCLIENT/appclient.htm".to_string(),
            "/devices".to_string(),
        ];
        assert!(url_allowed(&urls, "/PBX0/APPS/app.js"));
        assert!(url_allowed(&urls, "/PBX0/APPS/"));
        assert!(!url_allowed(&urls, "/PBX0/APPS/sub/app.js"), "rest has a /");
        assert!(!url_allowed(&urls, "/PBX0/APPS"), "no head match");
        assert!(!url_allowed(&urls, "/pbx0/apps/app.js"), "case-sensitive");
        assert!(url_allowed(&urls, "/PBX0/APPCLIENT/appclient.htm"));
        assert!(
            url_allowed(&urls, "/devices/any/depth"),
            "no trailing / : head only"
        );
        assert!(url_allowed(&urls, "/devicesX"));
        assert!(!url_allowed(&urls, "/PBX0/ADMIN"));
        assert!(url_allowed(&[], "/anything/at/all"));
    }

    #[test]
    fn normalisation_closes_the_escapes() {
        let urls = vec!["/PBX0/APPS/".to_string()];
        for attack in [
            "/PBX0/APPS/../ADMIN/x",
            "/PBX0/APPS/%2e%2e/ADMIN",
            "/PBX0/APPS//x/y",
            "/PBX0/APPS/./sub/x",
        ] {
            let ok = normalize_target(attack)
                .map(|n| url_allowed(&urls, &n.path))
                .unwrap_or(false);
            assert!(!ok, "{attack} must not pass");
        }
        let n = normalize_target("/PBX0/./APPS//app.js").unwrap();
        assert!(url_allowed(&urls, &n.path));
    }

    #[test]
    fn sources() {
        let list = CidrList::new(vec![
            "10.0.0.0/8".parse().unwrap(),
            "fd00::/8".parse().unwrap(),
        ]);
        assert!(source_allowed(None, "1.2.3.4".parse().unwrap()));
        assert!(source_allowed(Some(&list), "10.1.1.1".parse().unwrap()));
        assert!(source_allowed(
            Some(&list),
            "::ffff:10.1.1.1".parse().unwrap()
        ));
        assert!(source_allowed(Some(&list), "fd12::1".parse().unwrap()));
        assert!(!source_allowed(Some(&list), "11.1.1.1".parse().unwrap()));
        assert!(!source_allowed(
            Some(&CidrList::default()),
            "10.1.1.1".parse().unwrap()
        ));
    }
}
