//! The controller role of ferryd: the cluster's hosts, which host owns each
//! VM, and the migrations it orchestrates (`migrate.rs`, the saga), over a
//! persistent store (`store`, SQLite by default).

pub mod backups;
pub mod controller;
pub mod failpoints;
pub mod migrate;
pub mod networks;
pub mod recovery;
pub mod routes;
pub mod storage;
pub mod store;
pub mod transfers;
pub mod vms;

pub use controller::{Controller, ControllerError, MigrationDefaults};
