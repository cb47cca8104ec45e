//! Changes made through the API are written into the operator's configuration file in place:
//! only the keys whose value changed are touched, and every comment, blank line, key order and
//! formatting choice of the rest of the file stays as the operator wrote it. (The alternative,
//! a layer of API changes in the state dir over a read-only file, would leave two places to
//! look for the truth; the file stays the one source.)
//!
//! The change is computed between the canonical TOML of the configuration before and after
//! (`Config::to_toml`, which lists every key), and applied to the file's own document with
//! `toml_edit`, the format-preserving editor that the `toml` crate itself is built on.

use toml_edit::{DocumentMut, Item, TableLike, Value};

/// The file's text with the change from `old` to `new` (both canonical TOML of a whole
/// configuration) applied; `Err` when the file is not TOML (the caller then writes the whole
/// configuration instead).
pub fn apply_change(file: &str, old: &str, new: &str) -> Result<String, String> {
    let mut doc: DocumentMut = file
        .parse()
        .map_err(|e| format!("the configuration file is not TOML: {e}"))?;
    let old: toml::Table = old.parse().map_err(|e| format!("old configuration: {e}"))?;
    let new: toml::Table = new.parse().map_err(|e| format!("new configuration: {e}"))?;
    apply(doc.as_table_mut(), &old, &new, false)?;
    Ok(doc.to_string())
}

/// Applies the difference between `old` and `new` to `dst`. `inline`: `dst` is an inline
/// table (`a = { b = 1 }`), whose members must be values.
fn apply(
    dst: &mut dyn TableLike,
    old: &toml::Table,
    new: &toml::Table,
    inline: bool,
) -> Result<(), String> {
    for (key, nv) in new {
        let ov = old.get(key);
        if ov == Some(nv) {
            continue;
        }
        if let (Some(toml::Value::Table(ot)), toml::Value::Table(nt)) = (ov, nv) {
            if let Some(item) = dst.get_mut(key) {
                let is_inline = item.is_inline_table();
                if let Some(t) = item.as_table_like_mut() {
                    apply(t, ot, nt, inline || is_inline)?;
                    continue;
                }
            }
        }
        match dst.get_mut(key) {
            // Replaced in place: the key keeps its decor (the comment lines above it), the
            // value keeps its own (a comment after it), and a value written inline stays
            // inline (`users = [{ ... }]` does not turn into `[[turn.users]]`).
            Some(existing) => {
                let mut item = to_item(key, nv, inline || existing.is_value())?;
                if let (Some(was), Some(now)) = (existing.as_value(), item.as_value_mut()) {
                    *now.decor_mut() = was.decor().clone();
                }
                *existing = item;
            }
            None => {
                dst.insert(key, to_item(key, nv, inline)?);
            }
        }
    }
    for key in old.keys() {
        if !new.contains_key(key) {
            dst.remove(key);
        }
    }
    Ok(())
}

/// A `toml_edit` item for `value`: a `[section]` for a table inside a regular table, an
/// inline value otherwise. Made by printing `key = value` with `toml` and parsing it back,
/// so strings are quoted and escaped exactly as `toml` does.
fn to_item(key: &str, value: &toml::Value, inline: bool) -> Result<Item, String> {
    let mut one = toml::Table::new();
    one.insert(key.to_string(), value.clone());
    let text = toml::to_string(&one).map_err(|e| format!("{key}: {e}"))?;
    let mut doc: DocumentMut = text.parse().map_err(|e| format!("{key}: {e}"))?;
    let item = doc
        .remove(key)
        .ok_or_else(|| format!("{key}: lost in printing"))?;
    Ok(match item {
        Item::Table(t) if inline => Item::Value(Value::InlineTable(t.into_inline_table())),
        Item::ArrayOfTables(a) if inline => Item::Value(Value::Array(a.into_array())),
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"# The operator's own words.
state_dir = "./state"   # beside the binary

[turn]
# Our realm, agreed with the PBX team.
realm = "old.example.com"
listen = ["0.0.0.0:3478"]
users = [{ name = "alice", password = "a" }]

# Fraud settings below.
[fraud]
suspicious_per_minute = 20
"#;

    fn canon(s: &str) -> String {
        s.parse::<toml::Table>().unwrap().to_string()
    }

    #[test]
    fn only_changed_keys_are_touched() {
        let old = canon(
            "state_dir = \"./state\"\n[turn]\nrealm = \"old.example.com\"\nlisten = [\"0.0.0.0:3478\"]\n\
             users = [{ name = \"alice\", password = \"a\" }]\nworkers = 0\n\
             [fraud]\nsuspicious_per_minute = 20\nwhitelist = []\n",
        );
        let new = canon(
            "state_dir = \"./state\"\n[turn]\nrealm = \"new.example.com\"\nlisten = [\"0.0.0.0:3478\"]\n\
             users = [{ name = \"alice\", password = \"a\" }, { name = \"bob\", password = \"b\" }]\n\
             workers = 0\n[fraud]\nsuspicious_per_minute = 20\nwhitelist = [\"192.0.2.0/24\"]\n",
        );
        let out = apply_change(FILE, &old, &new).unwrap();
        for kept in [
            "# The operator's own words.",
            "state_dir = \"./state\"   # beside the binary",
            "# Our realm, agreed with the PBX team.",
            "# Fraud settings below.",
        ] {
            assert!(out.contains(kept), "lost {kept:?}:\n{out}");
        }
        assert!(out.contains("realm = \"new.example.com\""), "{out}");
        assert!(out.contains("bob"), "{out}");
        assert!(out.contains("whitelist = [\"192.0.2.0/24\"]"), "{out}");
        // A default the file omitted and the change did not touch stays omitted.
        assert!(!out.contains("workers"), "{out}");
        // Order kept: turn before fraud, realm before listen.
        assert!(out.find("[turn]").unwrap() < out.find("[fraud]").unwrap());
        assert!(out.find("realm =").unwrap() < out.find("listen =").unwrap());
        // And the result means the new configuration (but for the default it omits).
        let mut want: toml::Table = new.parse().unwrap();
        if let Some(toml::Value::Table(t)) = want.get_mut("turn") {
            t.remove("workers");
        }
        assert_eq!(out.parse::<toml::Table>().unwrap(), want);
    }

    #[test]
    fn new_sections_removed_keys_and_inline_tables() {
        let file = "# hello\n[turn]\nrealm = \"r\"\nlimits = { a = 1, b = 2 } # inline\n";
        let old = canon("[turn]\nrealm = \"r\"\nlimits = { a = 1, b = 2 }\nsecret = \"s\"\n");
        let new = canon(
            "[turn]\nrealm = \"r\"\nlimits = { a = 1, b = 3, c = { d = 4 } }\n\
             [proxy.limits]\nmax_connections = 9\n",
        );
        let out = apply_change(file, &old, &new).unwrap();
        assert!(out.starts_with("# hello\n"), "{out}");
        assert!(out.contains("# inline"), "{out}");
        assert!(!out.contains("secret"), "{out}");
        let back: toml::Table = out.parse().unwrap();
        assert_eq!(back["turn"]["limits"]["b"].as_integer(), Some(3));
        assert_eq!(back["turn"]["limits"]["c"]["d"].as_integer(), Some(4));
        assert_eq!(
            back["proxy"]["limits"]["max_connections"].as_integer(),
            Some(9)
        );
        assert!(
            out.contains("[proxy.limits]"),
            "a new table is a section: {out}"
        );
    }

    #[test]
    fn a_file_that_is_not_toml_is_refused() {
        assert!(apply_change("[turn\n", "", "").is_err());
    }
}
