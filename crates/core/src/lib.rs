//! Ferry's domain types: no I/O, no async. Everything here is pure so that it
//! can be unit-tested and shared by the agent, the controller and the CLI.

pub mod names;
pub mod spec;
