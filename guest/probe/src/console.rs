//! Prefixes of the probe's console lines. Every line the probe prints starts with one of
//! these, is written with a single `write`, and ends with a newline (the tty turns it into
//! CR LF). Kernel messages can still interleave with them on the serial console, so
//! readers must tolerate foreign and broken lines.

/// `probe-ready version=1 hb_ms=.. mem_mib=.. mem_rate=.. mem_base=0x..|heap|none
/// disk=..|none disk_rate=.. disk_slots=.. power_buttons=.. boot_id=0x..`: printed once,
/// after the working set is initialised and before the first heartbeat.
pub const READY: &str = "probe-ready ";
/// `heartbeat seq=N`: N starts at 1 and goes up by one every `hb_ms`.
pub const HEARTBEAT: &str = "heartbeat seq=";
/// `mem-oracle pass=K fails=F`: pass K of the working set completed; at most once a second.
pub const MEM_PASS: &str = "mem-oracle pass=";
/// `disk-flushed seq=N`: record N is written and flushed to the device.
pub const DISK_FLUSHED: &str = "disk-flushed seq=";
/// `oracle-fail mem page=I offset=O expected=0x.. got=0x..`: a self-check failed.
pub const ORACLE_FAIL: &str = "oracle-fail ";
/// `probe-net ip=198.18.0.10/15 echo_port=7000`: `eth0` has its address and the TCP echo
/// service is listening on every address at that port. Printed once, only with `ferry.ip`;
/// may come before or after `probe-ready` (the network is set up in parallel).
pub const NET: &str = "probe-net ";
/// `probe-error <what>: <details>`: the probe could not do its job (bad configuration,
/// missing device, I/O error).
pub const ERROR: &str = "probe-error ";
/// `probe-poweroff reason=power-button`: the ACPI power button was pressed; the guest is
/// about to power off.
pub const POWEROFF: &str = "probe-poweroff ";
/// Line format version reported in `probe-ready`.
pub const VERSION: u32 = 1;
