//! Ferry's domain types: no I/O, no async. Everything here is pure so that it
//! can be unit-tested and shared by the agent, the controller and the CLI.
//! (One deliberate exception: [`spec::check_host_files`] looks at the file
//! system, and says so in its name.)

pub mod names;
pub mod network;
pub mod spec;
pub mod units;
