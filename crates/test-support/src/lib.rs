//! Host-side test support for Ferry: the oracles that judge whether a migrated guest
//! survived intact, and a small harness to run the test guest under QEMU.
//!
//! The test guest (`guest/`, built by `guest/build.sh`) runs `ferry-probe`, which
//! prints heartbeats, keeps a self-checking memory working set and writes flushed,
//! checksummed disk records. The modules here read its console ([`console`],
//! [`heartbeat`]), verify dumps of its memory ([`memory_oracle`]) and its disk
//! ([`disk_oracle`]), locate the built guest ([`guest`]) and boot it ([`vm`]), and
//! shape, cut and restore the links of a namespace cluster ([`netns`]). Each
//! oracle can also be made to fail on purpose, so that tests can prove it would notice.

pub mod console;
pub mod disk_oracle;
pub mod guest;
pub mod heartbeat;
pub mod invariants;
pub mod memory_oracle;
pub mod netns;
pub mod vm;
