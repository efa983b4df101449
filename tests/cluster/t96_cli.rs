//! `residencyctl` end to end against a real cluster: status, import with good and bad rows
//! (exactly the expected rejections, and nothing applied twice on a re-run), export.

use residency_tests::{Cluster, serially};
use serde_json::Value;

use crate::DEFAULT_RAFT;

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|error| panic!("not JSON ({error}): {text}"))
}

fn lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(json)
        .collect()
}

#[test]
fn status_import_and_export_through_the_cli() {
    serially(|| async {
        let cluster = Cluster::start(3, DEFAULT_RAFT).await;
        let (code, out, err) = cluster.ctl(&["status", "-o", "json"]);
        assert_eq!(code, Some(0), "{err}");
        let status = json(&out);
        let members = status["members"].as_array().expect("members");
        assert_eq!(members.len(), 3);
        assert_eq!(
            members
                .iter()
                .filter(|member| member["role"] == "voter")
                .count(),
            3
        );
        assert_eq!(
            members
                .iter()
                .filter(|member| member["state"] == "leader")
                .count(),
            1
        );

        let scratch = tempfile::tempdir().expect("scratch");
        let file = scratch.path().join("users.csv");
        let mut rows = String::from("user_id,residency,location_id\n");
        for n in 0..1_200 {
            let row = match n {
                7 => "bad id,US,us-east-1/pg-1".to_string(),
                250 => format!("u-{n},US,eu-central-1/pg-9"),
                600 => format!("u-{n},XX,us-east-1/pg-1"),
                900 => format!("u-{n},US,nowhere/pg-0"),
                _ => format!("u-{n},US,us-west-2/pg-2"),
            };
            rows.push_str(&row);
            rows.push('\n');
        }
        std::fs::write(&file, rows).expect("file written");
        let file_arg = file.to_str().expect("utf-8 path");
        let import = || cluster.ctl(&["-o", "json", "user", "import", file_arg]);
        let (code, out, err) = import();
        assert_eq!(code, Some(0), "{err}");
        let summary = json(&out);
        assert_eq!(
            (summary["applied"].as_u64(), summary["refused"].as_u64()),
            (Some(1_196), Some(4)),
            "{summary}"
        );
        let rejects = std::fs::read_to_string(scratch.path().join("users.csv.rejects.jsonl"))
            .expect("rejects");
        let mut refused: Vec<(u64, String)> = lines(&rejects)
            .iter()
            .map(|reject| {
                (
                    reject["row"].as_u64().expect("row"),
                    reject["reason"].as_str().expect("reason").to_string(),
                )
            })
            .collect();
        refused.sort();
        let expected = [
            (9, "INVALID_USER_ID"),
            (252, "STORAGE_JURISDICTION_NOT_ALLOWED"),
            (602, "INVALID_JURISDICTION"),
            (902, "LOCATION_NOT_FOUND"),
        ];
        let expected: Vec<(u64, String)> = expected
            .iter()
            .map(|(row, reason)| (*row, reason.to_string()))
            .collect();
        assert_eq!(refused, expected);

        let export = || {
            let (code, out, err) = cluster.ctl(&["user", "export"]);
            assert_eq!(code, Some(0), "{err}");
            lines(&out)
        };
        let first = export();
        assert_eq!(first.len(), 1_196);
        let (code, _, err) = import();
        assert_eq!(code, Some(0), "{err}");
        let second = export();
        assert_eq!(first, second, "a re-run of the import changed placements");
        let backup = scratch.path().join("registry.backup");
        let (code, out, err) = cluster.ctl(&[
            "-o",
            "json",
            "backup",
            "create",
            backup.to_str().expect("utf-8"),
        ]);
        assert_eq!(code, Some(0), "{err}");
        let summary = json(&out);
        let size = std::fs::metadata(&backup).expect("backup written").len();
        assert_eq!(summary["size_bytes"].as_u64(), Some(size));
    });
}

#[test]
/// Plaintext, so that a node can state a foreign jurisdiction and be refused by the rule.
fn membership_through_the_cli() {
    serially(|| async {
        let mut cluster = Cluster::start_plaintext(3, DEFAULT_RAFT).await;
        let newcomer = cluster.add_node("US", DEFAULT_RAFT).await;
        let outsider = cluster.add_node("CA", DEFAULT_RAFT).await;
        let peer = |id: u64| cluster.nodes[&id].peer_addr();

        let (code, _, err) = cluster.ctl(&["member", "add-learner", &peer(outsider)]);
        assert_eq!(code, Some(1), "{err}");
        assert!(
            err.starts_with("error: MEMBER_JURISDICTION_NOT_ALLOWED"),
            "{err}"
        );

        let (code, out, err) =
            cluster.ctl(&["-o", "json", "member", "add-learner", &peer(newcomer)]);
        assert_eq!(code, Some(0), "{err}");
        let learner = json(&out)["members"]
            .as_array()
            .expect("members")
            .iter()
            .find(|member| member["id"] == newcomer)
            .cloned()
            .expect("listed");
        assert_eq!(learner["role"], "learner");

        let (code, _, err) = cluster.ctl(&[
            "member",
            "promote",
            &newcomer.to_string(),
            "--catch-up-timeout-ms",
            "30000",
        ]);
        assert_eq!(code, Some(0), "{err}");
        let (code, _, err) = cluster.ctl(&["member", "remove", "1"]);
        assert_eq!(code, Some(0), "{err}");
        cluster.node(1).stop();

        let (code, out, err) = cluster.ctl(&["-o", "json", "member", "list"]);
        assert_eq!(code, Some(0), "{err}");
        let listed = json(&out);
        let mut voters: Vec<u64> = listed["members"]
            .as_array()
            .expect("members")
            .iter()
            .filter(|member| member["role"] == "voter")
            .map(|member| member["id"].as_u64().expect("id"))
            .collect();
        voters.sort_unstable();
        assert_eq!(voters, vec![2, 3, newcomer]);
        let (code, out, err) = cluster.ctl(&["-o", "json", "cluster", "digest"]);
        assert_eq!(code, Some(0), "{err}");
        assert_eq!(json(&out)["agree"], true);
    });
}
