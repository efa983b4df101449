//! The state as layers: sled trees holding the changes since the last snapshot, over the base
//! file of that snapshot (`base.rs`).
//!
//! - The **live** tree takes every apply's changes. A value there is *tagged*: a put carries
//!   its value, a delete leaves a tombstone, so that it hides the key in the layers below.
//! - **Frozen** trees are former live trees whose changes a snapshot build is merging into a new
//!   base. They no longer change; at most one exists unless a build failed (newest first).
//! - The **base** file holds the state as of the last snapshot. It never changes either.
//!
//! A read looks in the live tree, then the frozen ones, then the base, and the first layer that
//! knows the key answers. A walk merges the layers in key order (`Merged`). Which trees and
//! which base file make up the state is recorded in the `sm_pointer` tree (`LayerNames`),
//! changed only by a build's two switches and an install, each in one sled write.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::StoreError;
use crate::base::{Base, BaseCursor};
use crate::snapshot::StatePair;

/// The first byte of a value in a delta tree.
const TAG_DELETED: u8 = 0;
const TAG_VALUE: u8 = 1;

/// A value as a delta tree stores it: `None` is a delete.
pub(crate) fn tagged(value: Option<&[u8]>) -> Vec<u8> {
    match value {
        None => vec![TAG_DELETED],
        Some(value) => {
            let mut stored = Vec::with_capacity(value.len() + 1);
            stored.push(TAG_VALUE);
            stored.extend_from_slice(value);
            stored
        }
    }
}

/// A delta tree's stored value: the value, or `None` for a delete.
pub(crate) fn untagged(stored: &[u8]) -> Result<Option<&[u8]>, StoreError> {
    match stored.split_first() {
        Some((&TAG_VALUE, value)) => Ok(Some(value)),
        Some((&TAG_DELETED, [])) => Ok(None),
        _ => Err(StoreError::corrupt(
            "a state change in sled carries no valid tag",
        )),
    }
}

/// What `sm_pointer` records: the layers of the state, by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LayerNames {
    /// The base file's name in the snapshot directory, if there is one.
    pub(crate) base: Option<String>,
    /// The delta trees, the live one first, then the frozen ones, newest first.
    pub(crate) deltas: Vec<String>,
}

/// The open layers of the state (see the module's comment).
#[derive(Debug, Clone)]
pub(crate) struct Layers {
    pub(crate) live: sled::Tree,
    pub(crate) frozen: Vec<sled::Tree>,
    pub(crate) base: Option<Arc<Base>>,
    /// The base file's name in the snapshot directory.
    pub(crate) base_name: Option<String>,
}

impl Layers {
    /// The value of `key` in the state.
    pub(crate) fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        for tree in std::iter::once(&self.live).chain(&self.frozen) {
            if let Some(stored) = tree.get(key)? {
                return Ok(untagged(&stored)?.map(<[u8]>::to_vec));
            }
        }
        match &self.base {
            Some(base) => base.get(key),
            None => Ok(None),
        }
    }

    /// Every pair of the state from `start` on, in key order. `cache` as for
    /// `Base::pairs_from`.
    pub(crate) fn pairs_from(&self, start: &[u8], cache: bool) -> Merged<'static> {
        let mut sources: Vec<Box<dyn PairSource + Send>> = Vec::new();
        for tree in std::iter::once(&self.live).chain(&self.frozen) {
            sources.push(Box::new(tree.range(start.to_vec()..)));
        }
        if let Some(base) = &self.base {
            sources.push(Box::new(base.pairs_from(start, cache)));
        }
        Merged::new(sources)
    }

    /// The frozen trees and the base merged (what a build writes), without the live tree.
    pub(crate) fn below_live(&self) -> Merged<'static> {
        let mut sources: Vec<Box<dyn PairSource + Send>> = Vec::new();
        for tree in &self.frozen {
            sources.push(Box::new(tree.iter()));
        }
        if let Some(base) = &self.base {
            sources.push(Box::new(base.pairs_from(b"", false)));
        }
        Merged::new(sources)
    }

    /// The names `sm_pointer` records for these layers.
    pub(crate) fn names(&self) -> LayerNames {
        LayerNames {
            base: self.base_name.clone(),
            deltas: std::iter::once(&self.live)
                .chain(&self.frozen)
                .map(|tree| String::from_utf8_lossy(&tree.name()).into_owned())
                .collect(),
        }
    }
}

/// A key and its value in one layer: `None` is a delete.
pub(crate) type Change = (Vec<u8>, Option<Vec<u8>>);

/// One layer's pairs in key order.
pub(crate) trait PairSource {
    fn next_change(&mut self) -> Result<Option<Change>, StoreError>;
}

impl PairSource for sled::Iter {
    fn next_change(&mut self) -> Result<Option<Change>, StoreError> {
        match self.next() {
            None => Ok(None),
            Some(item) => {
                let (key, stored) = item?;
                let value = untagged(&stored)?.map(<[u8]>::to_vec);
                Ok(Some((key.to_vec(), value)))
            }
        }
    }
}

impl PairSource for BaseCursor {
    fn next_change(&mut self) -> Result<Option<Change>, StoreError> {
        Ok(self.next_pair()?.map(|(key, value)| (key, Some(value))))
    }
}

impl PairSource for crate::capture::AsOfStart<'_> {
    fn next_change(&mut self) -> Result<Option<Change>, StoreError> {
        match self.next_pair()? {
            None => Ok(None),
            Some((key, stored)) => {
                let value = untagged(&stored)?.map(<[u8]>::to_vec);
                Ok(Some((key, value)))
            }
        }
    }
}

/// Several layers walked together in key order: for a key more than one holds, the first
/// source's (the newest layer's) value wins, and a delete there hides the key.
pub(crate) struct Merged<'a> {
    sources: Vec<Box<dyn PairSource + Send + 'a>>,
    heads: Vec<Option<Change>>,
    started: bool,
}

impl std::fmt::Debug for Merged<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Merged")
            .field("sources", &self.sources.len())
            .finish_non_exhaustive()
    }
}

impl<'a> Merged<'a> {
    /// `sources` newest first.
    pub(crate) fn new(sources: Vec<Box<dyn PairSource + Send + 'a>>) -> Merged<'a> {
        let heads = sources.iter().map(|_| None).collect();
        Merged {
            sources,
            heads,
            started: false,
        }
    }

    /// The next pair of the merged state, deletes skipped.
    pub(crate) fn next_pair(&mut self) -> Result<Option<StatePair>, StoreError> {
        if !self.started {
            for (head, source) in self.heads.iter_mut().zip(&mut self.sources) {
                *head = source.next_change()?;
            }
            self.started = true;
        }
        loop {
            // The smallest key; on a tie the first (newest) source, as `<` keeps the first.
            let mut best: Option<usize> = None;
            for (at, head) in self.heads.iter().enumerate() {
                let Some((key, _)) = head else { continue };
                let smaller = best.is_none_or(|best| {
                    key < &self.heads[best].as_ref().expect("a head was found here").0
                });
                if smaller {
                    best = Some(at);
                }
            }
            let Some(best) = best else {
                return Ok(None);
            };
            let (key, value) = self.heads[best].take().expect("the best head exists");
            for at in 0..self.heads.len() {
                let same = at == best
                    || self.heads[at]
                        .as_ref()
                        .is_some_and(|(other, _)| *other == key);
                if same {
                    self.heads[at] = self.sources[at].next_change()?;
                }
            }
            if let Some(value) = value {
                return Ok(Some((key, value)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A layer given as a list of changes in key order.
    struct Listed(std::vec::IntoIter<Change>);

    impl PairSource for Listed {
        fn next_change(&mut self) -> Result<Option<Change>, StoreError> {
            Ok(self.0.next())
        }
    }

    fn layer(changes: &[(&str, Option<&str>)]) -> Box<dyn PairSource + Send> {
        Box::new(Listed(
            changes
                .iter()
                .map(|(key, value)| {
                    (
                        key.as_bytes().to_vec(),
                        value.map(|value| value.as_bytes().to_vec()),
                    )
                })
                .collect::<Vec<_>>()
                .into_iter(),
        ))
    }

    fn merged(layers: Vec<Box<dyn PairSource + Send>>) -> Vec<(String, String)> {
        let mut merged = Merged::new(layers);
        let mut pairs = Vec::new();
        while let Some((key, value)) = merged.next_pair().unwrap() {
            pairs.push((
                String::from_utf8(key).unwrap(),
                String::from_utf8(value).unwrap(),
            ));
        }
        pairs
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect()
    }

    #[test]
    fn the_newest_layer_wins_and_its_deletes_hide_older_values() {
        let live = layer(&[("a", Some("a2")), ("c", None), ("e", Some("e1"))]);
        let frozen = layer(&[("b", Some("b2")), ("c", Some("c2")), ("d", None)]);
        let base = layer(&[
            ("a", Some("a0")),
            ("b", Some("b0")),
            ("c", Some("c0")),
            ("d", Some("d0")),
            ("f", Some("f0")),
        ]);
        assert_eq!(
            merged(vec![live, frozen, base]),
            pairs(&[("a", "a2"), ("b", "b2"), ("e", "e1"), ("f", "f0")])
        );
    }

    #[test]
    fn a_delete_of_a_key_no_lower_layer_holds_yields_nothing() {
        let live = layer(&[("a", None), ("b", None)]);
        assert_eq!(merged(vec![live, layer(&[])]), pairs(&[]));
        assert_eq!(merged(vec![]), pairs(&[]));
    }

    #[test]
    fn a_put_over_a_delete_in_an_older_layer_is_seen() {
        let live = layer(&[("k", Some("new"))]);
        let frozen = layer(&[("k", None)]);
        let base = layer(&[("k", Some("old"))]);
        assert_eq!(merged(vec![live, frozen, base]), pairs(&[("k", "new")]));
    }

    #[test]
    fn tags_round_trip_and_a_bad_tag_is_corruption() {
        assert_eq!(untagged(&tagged(Some(b"v"))).unwrap(), Some(&b"v"[..]));
        assert_eq!(untagged(&tagged(Some(b""))).unwrap(), Some(&b""[..]));
        assert_eq!(untagged(&tagged(None)).unwrap(), None);
        for bad in [&b""[..], b"\x02v", b"\x00x"] {
            assert!(
                matches!(untagged(bad), Err(StoreError::Corrupt(_))),
                "{bad:?}"
            );
        }
    }
}
