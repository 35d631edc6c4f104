//! The agent role of ferryd: owns the QEMU processes of one host (one task
//! per VM), its datastores and its facts, and serves them over the API.

pub mod agent;
pub mod backup;
pub mod console;
pub mod disks;
pub mod error;
pub mod host;
pub mod network;
pub mod record;
pub mod routes;
pub mod routes_storage;
pub mod transfer;
mod vm;

pub use agent::{Agent, OpenError};
pub use host::AgentConfig;
