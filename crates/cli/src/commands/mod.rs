pub mod host;
pub mod local;
pub mod migrate;
pub mod migration;
pub mod network;
pub mod pki;
pub mod storage;
pub mod vm;
