//! `residencyd` as a user runs it: a bad configuration is refused before anything starts, with
//! the field at fault named. (Also makes `cargo test` build the binary the cluster tests run.)

use std::process::Command;

fn residencyd(args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_residencyd"))
        .args(args)
        .output()
        .expect("residencyd runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

const VALID: [&str; 12] = [
    "--node-id",
    "1",
    "--jurisdiction",
    "US",
    "--data-dir",
    "/tmp/residency-unused",
    "--listen-client",
    "127.0.0.1:1",
    "--listen-peer",
    "127.0.0.1:2",
    "--tls-dir",
    "/tmp/residency-unused/certs",
];

#[test]
fn a_valid_configuration_passes_the_check() {
    let mut args = VALID.to_vec();
    args.extend(["--listen-metrics", "127.0.0.1:3", "--check-config"]);
    let (ok, text) = residencyd(&args);
    assert!(ok, "{text}");
    assert!(text.contains("node_id: 1"), "{text}");
    assert!(text.contains("node1.pem"), "{text}");
}

#[test]
fn a_node_without_a_word_on_tls_is_refused() {
    let args: Vec<&str> = VALID[..10]
        .iter()
        .copied()
        .chain(["--listen-metrics", "127.0.0.1:3", "--check-config"])
        .collect();
    let (ok, text) = residencyd(&args);
    assert!(!ok);
    assert!(text.contains("tls: is required"), "{text}");
}

#[test]
fn a_bad_configuration_is_refused_naming_the_field() {
    let (ok, text) = residencyd(&VALID);
    assert!(!ok);
    assert!(text.contains("listen.metrics"), "{text}");
    let mut args = VALID.to_vec();
    args.extend([
        "--listen-metrics",
        "127.0.0.1:3",
        "--jurisdiction",
        "XX",
        "--check-config",
    ]);
    let (ok, text) = residencyd(&args);
    assert!(!ok);
    assert!(text.contains("jurisdiction"), "{text}");
}

#[test]
fn a_missing_config_file_is_reported() {
    let (ok, text) = residencyd(&["--config", "/nonexistent/node.toml", "--check-config"]);
    assert!(!ok);
    assert!(text.contains("/nonexistent/node.toml"), "{text}");
}
