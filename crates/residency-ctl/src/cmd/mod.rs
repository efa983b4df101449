//! One module per command group.

pub mod cluster;
pub mod user;
