//! The `migrated` binary's start-up contract: the printed default config is
//! valid, and a bad config is refused before anything starts, naming the key.

use std::path::Path;
use std::process::Command;

use migrated::config::Config;

#[test]
fn printed_default_config_is_the_default() {
    let o = Command::new(env!("CARGO_BIN_EXE_migrated"))
        .arg("--print-default-config")
        .output()
        .unwrap();
    assert!(o.status.success());
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(
        text.contains("[migration]") && text.contains("completion_timeout_per_gib = 800"),
        "{text}"
    );
    assert_eq!(
        Config::parse(&text, Path::new("printed")).unwrap(),
        Config::default()
    );
}

#[test]
fn bad_config_is_refused_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[migration]\nbandwidth_per_migration = \"64Mx\"\n",
            "migration.bandwidth_per_migration",
        ),
        (
            "[migration]\nallow_postcopy = true\n",
            "migration.allow_postcopy",
        ),
        ("state_dir = \"state\"\n", "state_dir"),
    ];
    for (text, key) in cases {
        let path = tmp.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        let o = Command::new(env!("CARGO_BIN_EXE_migrated"))
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1), "{text}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(key), "{key} not named in: {err}");
        // Refused before the state directory or socket was touched.
        assert!(!tmp.path().join("state").exists());
    }
    let o = Command::new(env!("CARGO_BIN_EXE_migrated"))
        .arg("--config")
        .arg(tmp.path().join("missing.toml"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("missing.toml"));
}
