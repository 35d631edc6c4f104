//! Everything Ferry knows about driving QEMU: choosing the accelerator, turning
//! a spec into a command line, launching and supervising the process, and
//! talking QMP to it. No Ferry policy lives here; the agent decides, this crate
//! does.

pub mod accel;
pub mod blockjob;
pub mod cmdline;
pub mod host;
pub mod migration;
pub mod nbd;
pub mod process;
pub mod qmp;
pub mod storage;
pub mod tls;
