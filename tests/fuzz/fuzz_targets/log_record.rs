//! The Raft log's segment bytes and its checksummed records, as a node reads them at start:
//! damaged bytes give an error (or a torn tail), never a panic. Also the vote record and the
//! audit file's verifier.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = residency_store::decode::decode_segment(data);
    let _ = residency_store::record::unseal::<residency_store::Vote>(data, "vote");
    let _ = residency_store::record::unseal_entry(data, "log entry");
    let _ = residency_audit::verify(data);
    let _ = residency_audit::tail(data);
});
