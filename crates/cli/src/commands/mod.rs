pub mod host;
pub mod local;
pub mod migrate;
pub mod migration;
pub mod pki;
pub mod vm;
