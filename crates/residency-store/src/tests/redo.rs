//! An apply's changes, made key by key behind a redo record: a crash before the record is whole
//! leaves none of them, a crash after it leaves them all once the store opens again.

use std::collections::BTreeMap;

use crate::redo::{self, Changes, REDO_TREE};

fn changes(pairs: &[(&str, Option<&str>)]) -> Changes {
    pairs
        .iter()
        .map(|(key, value)| {
            (
                key.as_bytes().to_vec(),
                value.map(|v| v.as_bytes().to_vec()),
            )
        })
        .collect()
}

fn contents(tree: &sled::Tree) -> BTreeMap<String, String> {
    tree.iter()
        .map(|pair| {
            let (key, value) = pair.expect("reads");
            (
                String::from_utf8_lossy(&key).into_owned(),
                String::from_utf8_lossy(&value).into_owned(),
            )
        })
        .collect()
}

fn open(dir: &std::path::Path) -> sled::Db {
    crate::durable::open_sled(dir, 16 * 1024 * 1024).expect("sled opens")
}

#[test]
fn a_write_makes_every_change_and_leaves_no_redo() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = open(dir.path());
    let state = db.open_tree("state-0").expect("tree");
    let redo_tree = db.open_tree(REDO_TREE).expect("tree");
    state.insert("gone", "old").expect("insert");
    let big = "v".repeat(40_000);
    let mut set = changes(&[("a", Some("1")), ("gone", None), ("b", Some("2"))]);
    // Enough to take several chunks.
    for n in 0..5 {
        set.insert(
            format!("big-{n}").into_bytes(),
            Some(big.clone().into_bytes()),
        );
    }
    redo::write(&redo_tree, &state, "state-0", &set).expect("written");
    let held = contents(&state);
    assert_eq!(held.get("a").map(String::as_str), Some("1"));
    assert_eq!(held.get("b").map(String::as_str), Some("2"));
    assert!(!held.contains_key("gone"));
    assert_eq!(held.len(), 7);
    assert!(redo_tree.is_empty(), "the redo is dropped once made");
}

#[test]
fn a_whole_redo_left_by_a_crash_is_finished_on_open() {
    let dir = tempfile::tempdir().expect("temp dir");
    {
        let db = open(dir.path());
        let state = db.open_tree("state-0").expect("tree");
        state.insert("gone", "old").expect("insert");
        state.insert("a", "stale").expect("insert");
        let redo_tree = db.open_tree(REDO_TREE).expect("tree");
        let set = changes(&[("a", Some("1")), ("gone", None), ("b", Some("2"))]);
        redo::write_redo_only(&redo_tree, "state-0", &set, true).expect("redo written");
        // The crash came after the first change only.
        state.insert("a", "1").expect("insert");
        db.flush().expect("flushed");
    }
    let db = open(dir.path());
    let made = redo::finish_interrupted(&db, "state-0").expect("finished");
    assert_eq!(made, 3);
    let state = db.open_tree("state-0").expect("tree");
    assert_eq!(
        contents(&state),
        BTreeMap::from([
            ("a".to_string(), "1".to_string()),
            ("b".to_string(), "2".to_string())
        ])
    );
    assert!(db.open_tree(REDO_TREE).expect("tree").is_empty());
}

#[test]
fn a_redo_cut_short_before_its_header_changes_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    {
        let db = open(dir.path());
        let state = db.open_tree("state-0").expect("tree");
        state.insert("a", "stale").expect("insert");
        let redo_tree = db.open_tree(REDO_TREE).expect("tree");
        let mut set = changes(&[("a", Some("1")), ("b", Some("2"))]);
        for n in 0..5 {
            set.insert(format!("big-{n}").into_bytes(), Some(vec![b'v'; 40_000]));
        }
        redo::write_redo_only(&redo_tree, "state-0", &set, false).expect("chunks written");
        assert!(
            !redo_tree.is_empty(),
            "the chunks after the first are written first"
        );
        db.flush().expect("flushed");
    }
    let db = open(dir.path());
    assert_eq!(
        redo::finish_interrupted(&db, "state-0").expect("finished"),
        0
    );
    let state = db.open_tree("state-0").expect("tree");
    assert_eq!(
        contents(&state),
        BTreeMap::from([("a".to_string(), "stale".to_string())])
    );
    assert!(
        db.open_tree(REDO_TREE).expect("tree").is_empty(),
        "stray chunks are dropped"
    );
}

#[test]
fn a_redo_for_another_state_tree_stops_the_store_from_opening() {
    let dir = tempfile::tempdir().expect("temp dir");
    {
        let db = open(dir.path());
        let redo_tree = db.open_tree(REDO_TREE).expect("tree");
        let set = changes(&[("a", Some("1"))]);
        redo::write_redo_only(&redo_tree, "state-3", &set, true).expect("redo written");
        db.flush().expect("flushed");
    }
    let db = open(dir.path());
    let refused = redo::finish_interrupted(&db, "state-0").expect_err("refused");
    assert!(refused.to_string().contains("state-3"), "{refused}");
}
