//! The snapshot file formats (the base file and the older stream), as a follower installing
//! one or `residencyd restore` reads it:
//! damaged bytes give an error, never a panic, and every value read is decoded as the state
//! machine would decode it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use residency_store::snapshot::snapshot_from_bytes;

/// Pairs read at most per input, so a crafted count cannot run the target for long.
const PAIRS_MAX: usize = 10_000;

fuzz_target!(|data: &[u8]| {
    let Ok((mut reader, _meta)) = snapshot_from_bytes(data) else {
        return;
    };
    for _ in 0..PAIRS_MAX {
        match reader.next_pair() {
            Ok(Some((_key, value))) => {
                let _ = residency_core::codec::decode::<residency_types::Placement>(&value);
                let _ = residency_core::codec::decode::<residency_types::Location>(&value);
                let _ = residency_core::codec::decode::<residency_types::Policy>(&value);
            }
            Ok(None) | Err(_) => return,
        }
    }
});
