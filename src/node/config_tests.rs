//! Tests of the node configuration (`config.rs`).
use super::*;

#[test]
fn defaults_are_valid() {
    let s = NodeFile::default().settings(Path::new("/base")).unwrap();
    assert_eq!(s.sync_interval, Nanos::from_millis(5));
    assert_eq!(s.policy, SharePolicy::Strict);
    assert_eq!(s.inflight_ppm, 20_000);
    assert_eq!(s.rules, PathBuf::from("/base/rules.toml"));
}

#[test]
fn grpc_tls_needs_a_certificate_and_its_key() {
    let base = Path::new("/base");
    let file = |cert: Option<&str>, key: Option<&str>, ca: Option<&str>| NodeFile {
        grpc_tls_cert: cert.map(PathBuf::from),
        grpc_tls_key: key.map(PathBuf::from),
        grpc_tls_client_ca: ca.map(PathBuf::from),
        ..NodeFile::default()
    };
    assert_eq!(
        file(None, None, None).settings(base).unwrap().grpc_tls,
        None
    );
    let tls = file(Some("c.pem"), Some("k.pem"), Some("ca.pem"))
        .settings(base)
        .unwrap()
        .grpc_tls
        .unwrap();
    assert_eq!(tls.cert, PathBuf::from("/base/c.pem"));
    assert_eq!(tls.client_ca, Some(PathBuf::from("/base/ca.pem")));
    for bad in [
        file(Some("c.pem"), None, None),
        file(None, Some("k.pem"), None),
        file(None, None, Some("ca.pem")),
    ] {
        assert!(matches!(
            bad.settings(base),
            Err(ConfigError::Invalid { .. })
        ));
    }
}

#[test]
fn bad_values_name_their_field() {
    let cases: Vec<(NodeFile, &str)> = vec![
        (
            NodeFile {
                share_policy: "lax".into(),
                ..NodeFile::default()
            },
            "share_policy",
        ),
        (
            NodeFile {
                sync_interval: "5".into(),
                ..NodeFile::default()
            },
            "sync_interval",
        ),
        (
            NodeFile {
                inflight_fraction: 0.0,
                ..NodeFile::default()
            },
            "inflight_fraction",
        ),
        (
            NodeFile {
                key_seed: Some("xyz".into()),
                ..NodeFile::default()
            },
            "key_seed",
        ),
        (
            NodeFile {
                forget_after: "100ms".into(),
                ..NodeFile::default()
            },
            "forget_after",
        ),
    ];
    for (file, field) in cases {
        match file.settings(Path::new(".")) {
            Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: {other:?}"),
        }
    }
}

#[test]
fn memory_budgets_parse_with_units_and_refuse_nonsense() {
    assert_eq!(parse_memory("512MiB"), Ok(512 << 20));
    assert_eq!(parse_memory("2GB"), Ok(2_000_000_000));
    assert_eq!(parse_memory("1048576"), Ok(1 << 20));
    assert!(parse_memory("12").is_err(), "below the minimum");
    assert!(parse_memory("1.5GB").is_err());
    assert!(parse_memory("10 parsecs").is_err());
    assert!(parse_memory("99999999999999999999GiB").is_err());
    let file = NodeFile {
        max_memory: Some("lots".into()),
        ..NodeFile::default()
    };
    let e = file.settings(Path::new("/base")).unwrap_err();
    assert!(e.to_string().contains("max_memory"), "{e}");
    let file = NodeFile {
        max_memory: Some("64MiB".into()),
        ..NodeFile::default()
    };
    assert_eq!(
        file.settings(Path::new("/base")).unwrap().max_memory,
        Some(64 << 20)
    );
    assert_eq!(
        NodeFile::default()
            .settings(Path::new("/base"))
            .unwrap()
            .max_memory,
        None
    );
}

#[test]
fn a_data_dir_alone_keeps_the_snapshot_and_journal_in_it() {
    let base = Path::new("/base");
    let none = NodeFile::default().settings(base).unwrap();
    assert_eq!(none.snapshot_path, None);
    let dir = NodeFile {
        name: "n1".into(),
        data_dir: Some("state".into()),
        ..NodeFile::default()
    }
    .settings(base)
    .unwrap();
    assert_eq!(dir.snapshot_path, Some(base.join("state/n1.snapshot")));
    // An explicit snapshot path wins.
    let both = NodeFile {
        data_dir: Some("state".into()),
        snapshot_path: Some("/elsewhere/s.bin".into()),
        ..NodeFile::default()
    }
    .settings(base)
    .unwrap();
    assert_eq!(both.snapshot_path, Some(PathBuf::from("/elsewhere/s.bin")));
}

#[test]
fn unknown_keys_are_refused() {
    assert!(toml::from_str::<NodeFile>("nmae = \"x\"").is_err());
    let f: NodeFile = toml::from_str("slot = 2\nseeds = [\"a:1\"]").unwrap();
    assert_eq!(f.slot, 2);
}

#[test]
fn seeds_parse_from_hex() {
    assert_eq!(
        parse_seed("0000000000000001000000000000000a"),
        Some(KeySeed(1, 10))
    );
    assert_eq!(parse_seed("00"), None);
}
