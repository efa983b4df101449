//! `residencyctl` refuses bad input locally with exit code 2 and a one-line reason, and reports
//! an unreachable cluster with exit code 1. (Also makes `cargo test` build the binary.)

use std::process::Command;

fn residencyctl(args: &[&str]) -> (Option<i32>, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_residencyctl"))
        .args(args)
        .env_remove("RESIDENCY_ENDPOINTS")
        .output()
        .expect("residencyctl runs");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).to_string(),
    )
}

#[test]
fn malformed_input_exits_2_with_the_reason_code() {
    let cases: [(&[&str], &str); 3] = [
        (
            &[
                "user",
                "assign",
                "bad id",
                "--residency",
                "US",
                "--location",
                "l",
            ],
            "INVALID_USER_ID",
        ),
        (
            &[
                "user",
                "assign",
                "u1",
                "--residency",
                "USA",
                "--location",
                "l",
            ],
            "INVALID_JURISDICTION",
        ),
        (
            &["user", "get", "u1", "--consistency", "sometimes"],
            "sometimes",
        ),
    ];
    for (args, expected) in cases {
        let (code, stderr) = residencyctl(args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        let first_line = stderr.lines().next().unwrap_or_default();
        assert!(
            first_line.starts_with("error: ") && first_line.contains(expected),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn an_unreachable_cluster_exits_1() {
    let (code, stderr) = residencyctl(&[
        "--endpoints",
        "127.0.0.1:1",
        "--timeout-ms",
        "300",
        "user",
        "get",
        "u1",
    ]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
}

#[test]
fn every_command_help_shows_an_example() {
    let commands: &[&[&str]] = &[
        &["status"],
        &["cluster", "status"],
        &["cluster", "init"],
        &["cluster", "digest"],
        &["member", "list"],
        &["member", "add-learner"],
        &["member", "promote"],
        &["member", "remove"],
        &["user", "assign"],
        &["user", "get"],
        &["user", "forget"],
        &["user", "import"],
        &["user", "export"],
        &["user", "move", "begin"],
        &["user", "move", "complete"],
        &["user", "move", "abort"],
        &["location", "add"],
        &["location", "get"],
        &["location", "list"],
        &["location", "drain"],
        &["location", "activate"],
        &["location", "retire"],
        &["policy", "set"],
        &["policy", "get"],
        &["policy", "list"],
        &["policy", "dry-run"],
        &["check"],
        &["backup", "create"],
        &["watch"],
    ];
    for command in commands {
        let output = Command::new(env!("CARGO_BIN_EXE_residencyctl"))
            .args(*command)
            .arg("--help")
            .output()
            .expect("residencyctl runs");
        let help = String::from_utf8_lossy(&output.stdout);
        assert!(
            help.contains("Example: residencyctl"),
            "{command:?} --help has no example:\n{help}"
        );
    }
}
