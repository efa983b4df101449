//! The wire format: code generated from `proto/`, conversions between it and our domain types,
//! and the metadata keys that carry reason codes and leader hints. The wire format stops here:
//! no generated type reaches the core or the disk.

pub mod convert;
pub mod metadata;

/// Generated code, in modules that mirror the proto packages (`peer.v1` refers to `v1` types).
#[allow(missing_debug_implementations, clippy::all)]
pub mod generated {
    pub mod residency {
        pub mod v1 {
            tonic::include_proto!("residency.v1");
        }
        pub mod peer {
            pub mod v1 {
                tonic::include_proto!("residency.peer.v1");
            }
        }
    }
}

/// Node-to-node traffic, package `residency.peer.v1`.
pub use generated::residency::peer::v1 as peer_pb;
/// The public API, package `residency.v1`.
pub use generated::residency::v1 as pb;

/// The encoded descriptors of every service, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("residency_descriptor");
