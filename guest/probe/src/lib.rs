//! Formats and configuration shared by the Ferry test-guest probe (the binary in
//! `main.rs`, which runs inside the guest) and the host-side checkers in
//! `ferry-test-support`. Keeping them in one place means the writer and the reader of
//! each oracle cannot drift apart. See `guest/README.md` for the contract.

pub mod config;
pub mod console;
pub mod format;
pub mod net;
