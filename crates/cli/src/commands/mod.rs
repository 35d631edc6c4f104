pub mod host;
pub mod local;
pub mod pki;
pub mod vm;
