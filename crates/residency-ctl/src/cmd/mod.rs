//! One module per command group.

pub mod audit;
pub mod backup;
pub mod certs;
pub mod check;
pub mod cluster;
pub mod location;
pub mod member;
pub mod policy;
pub mod transfer;
pub mod user;
pub mod watch;
