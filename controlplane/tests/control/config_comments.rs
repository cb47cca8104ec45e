//! The operator's file stays the operator's: a change through the API edits only the keys it
//! changes, so comments, blank lines and the order of the file survive the change and a
//! restart (which reads the edited file back).

use std::fs;
use std::path::Path;
use std::time::Duration;

use portico_testkit::Portico;

use crate::spec;

fn read_to_string(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn a_hand_written_comment_survives_an_api_change_and_a_restart() {
    // The operator's file, with comments of their own in several places (the `[fraud]` lines
    // go into the kit's `[fraud]` table).
    let site = Portico::new(
        "comments",
        spec()
            .turn("realm = \"before.example.com\"\n")
            .fraud("# Raised for the call centre (ticket 4711).")
            .fraud("suspicious_per_minute = 40 # was 20"),
    );
    let mine = format!(
        "# Edge box of the Hamburg office -- ask Jana before changing anything.\n{}",
        site.config_text("# The realm the PBX team agreed to.\nrealm = \"before.example.com\"\n")
    );
    fs::write(&site.config_path, &mine).unwrap_or_else(|e| panic!("{e}"));
    let mut p = site.launch();
    site.json(
        "PATCH",
        "/api/v1/config",
        r#"{"turn": {"realm": "after.example.com"}}"#,
        200,
    );
    let text = read_to_string(&site.config_path);
    for kept in [
        "# Edge box of the Hamburg office -- ask Jana before changing anything.",
        "# The realm the PBX team agreed to.",
        "# Raised for the call centre (ticket 4711).",
        "suspicious_per_minute = 40 # was 20",
    ] {
        assert!(
            text.contains(kept),
            "the API change dropped {kept:?}; the file is now:\n{text}"
        );
    }
    assert!(text.contains("realm = \"after.example.com\""), "{text}");
    assert!(!text.contains("before.example.com"), "{text}");
    // Nothing but the realm line changed.
    let changed: Vec<(&str, &str)> = mine
        .lines()
        .zip(text.lines())
        .filter(|(a, b)| a != b)
        .collect();
    assert_eq!(changed.len(), 1, "{changed:?}");
    assert_eq!(mine.lines().count(), text.lines().count(), "{text}");

    // A restart reads the edited file: the change holds and the comments are still there.
    assert!(
        p.terminate(Duration::from_secs(10)).is_some(),
        "portico did not stop"
    );
    let _p = site.launch();
    assert_eq!(
        site.json("GET", "/api/v1/config", "", 200)["turn"]["realm"],
        "after.example.com"
    );
    let again = read_to_string(&site.config_path);
    assert!(
        again.contains("# The realm the PBX team agreed to."),
        "{again}"
    );
    assert_eq!(again, text, "the restart rewrote the file");
}
