//! The probe's configuration, read from the kernel command line.
//!
//! Parameters use a `ferry.` prefix (the kernel leaves dotted parameters alone and they
//! show in `/proc/cmdline`). An unknown `ferry.` parameter is an error rather than
//! ignored: a typo in a test's command line must not silently turn an oracle off.
//! The contract is documented in `guest/README.md`.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// Everything the probe's three workers need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Heartbeat period in milliseconds (>= 1).
    pub hb_ms: u64,
    /// Memory-oracle working set in MiB; 0 disables the memory oracle.
    pub mem_mib: u64,
    /// Memory-oracle dirtying rate in MiB/s; 0 means as fast as possible.
    pub mem_rate: u64,
    /// Guest-physical address of the working set, mapped through `/dev/mem`. `None` puts
    /// the working set in the probe's heap: it still checks itself but the host cannot
    /// find it.
    pub mem_base: Option<u64>,
    /// Block device for the disk oracle; `None` disables it.
    pub disk: Option<String>,
    /// When the disk oracle's device never appears, go on without the oracle
    /// (a warning line says so) instead of stopping. Set on the bootable
    /// disk's own command line: the same disk booted on a SATA or SCSI bus
    /// (an import from VirtualBox or Hyper-V) has no `/dev/vda2`, and its
    /// heartbeat must still show that it boots.
    pub disk_optional: bool,
    /// Disk-oracle records per second; 0 means as fast as possible.
    pub disk_rate: u64,
    /// Address of the first ethernet NIC (`eth0`); `None` leaves networking off.
    pub ip: Option<Ipv4Net>,
    /// TCP port of the echo service (only used with `ip`).
    pub echo_port: u16,
}

/// The default `ferry.echo_port`.
pub const DEFAULT_ECHO_PORT: u16 = 7000;

/// An IPv4 interface address with its prefix length, written `ADDR/PREFIX`
/// (`198.18.0.10/15`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    /// 1..=32.
    pub prefix: u8,
}

impl Ipv4Net {
    /// The netmask of the prefix, e.g. 255.254.0.0 for /15.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::MAX << (32 - u32::from(self.prefix)))
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Net {
    type Err = &'static str;

    /// Parses `ADDR/PREFIX`. Refuses what cannot be a host's own unicast address
    /// (unspecified, loopback, multicast, broadcast) and a missing or out-of-range prefix.
    fn from_str(s: &str) -> Result<Ipv4Net, &'static str> {
        const SYNTAX: &str = "expected an IPv4 address with a prefix length, e.g. 198.18.0.10/15";
        let (addr, prefix) = s.split_once('/').ok_or(SYNTAX)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| SYNTAX)?;
        // u8::from_str accepts a leading '+'; a prefix is plain digits.
        if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) {
            return Err(SYNTAX);
        }
        let prefix: u8 = prefix.parse().map_err(|_| SYNTAX)?;
        if !(1..=32).contains(&prefix) {
            return Err("prefix length must be 1..=32");
        }
        if addr.is_unspecified() || addr.is_loopback() || addr.is_multicast() || addr.is_broadcast()
        {
            return Err("not a unicast host address");
        }
        Ok(Ipv4Net { addr, prefix })
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            hb_ms: 10,
            mem_mib: 16,
            mem_rate: 8,
            mem_base: None,
            disk: None,
            disk_optional: false,
            disk_rate: 50,
            ip: None,
            echo_port: DEFAULT_ECHO_PORT,
        }
    }
}

/// Why a command line was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// A `ferry.` parameter the probe does not know.
    Unknown(String),
    /// A parameter whose value does not parse or is out of range.
    BadValue {
        key: String,
        value: String,
        why: &'static str,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Unknown(k) => write!(f, "unknown parameter {k}"),
            ConfigError::BadValue { key, value, why } => {
                write!(f, "bad value {value:?} for {key}: {why}")
            }
        }
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Parses a kernel command line. `mem=` (the kernel's own limit) is the default for
    /// `ferry.mem_base`, because the recommended set-up reserves exactly the RAM above it.
    pub fn from_cmdline(cmdline: &str) -> Result<Config, ConfigError> {
        let mut cfg = Config::default();
        let mut kernel_mem: Option<u64> = None;
        let mut echo_port_set = false;
        for word in cmdline.split_whitespace() {
            let (key, value) = word.split_once('=').unwrap_or((word, ""));
            if key == "mem" {
                // Not ours to validate; if it does not parse we just lack a default.
                kernel_mem = parse_size(value).ok();
                continue;
            }
            let Some(name) = key.strip_prefix("ferry.") else {
                continue;
            };
            let bad = |why| ConfigError::BadValue {
                key: key.to_string(),
                value: value.to_string(),
                why,
            };
            match name {
                "hb_ms" => {
                    cfg.hb_ms = parse_u64(value).ok_or_else(|| bad("expected an integer"))?;
                    if cfg.hb_ms == 0 {
                        return Err(bad("must be at least 1"));
                    }
                }
                "mem_mib" => {
                    cfg.mem_mib = parse_u64(value).ok_or_else(|| bad("expected an integer"))?
                }
                "mem_rate" => {
                    cfg.mem_rate = parse_u64(value).ok_or_else(|| bad("expected an integer"))?
                }
                "mem_base" => {
                    let base = parse_size(value).map_err(bad)?;
                    if base % crate::format::BLOCK_SIZE as u64 != 0 {
                        return Err(bad("must be page aligned"));
                    }
                    cfg.mem_base = Some(base);
                }
                "disk" => {
                    cfg.disk = match value {
                        "" | "none" => None,
                        v if v.starts_with('/') => Some(v.to_string()),
                        _ => return Err(bad("expected an absolute device path or none")),
                    }
                }
                "disk_optional" => {
                    cfg.disk_optional = match value {
                        "0" => false,
                        "1" => true,
                        _ => return Err(bad("expected 0 or 1")),
                    }
                }
                "disk_rate" => {
                    cfg.disk_rate = parse_u64(value).ok_or_else(|| bad("expected an integer"))?
                }
                "ip" => {
                    cfg.ip = match value {
                        "none" => None,
                        v => Some(v.parse().map_err(bad)?),
                    }
                }
                "echo_port" => {
                    let port = parse_u64(value).ok_or_else(|| bad("expected an integer"))?;
                    cfg.echo_port = u16::try_from(port)
                        .ok()
                        .filter(|&p| p != 0)
                        .ok_or_else(|| bad("expected a TCP port 1..=65535"))?;
                    echo_port_set = true;
                }
                _ => return Err(ConfigError::Unknown(key.to_string())),
            }
        }
        if cfg.mem_base.is_none() {
            cfg.mem_base = kernel_mem.filter(|m| m % crate::format::BLOCK_SIZE as u64 == 0);
        }
        if echo_port_set && cfg.ip.is_none() {
            // The echo service only runs with networking; a port without an address is
            // most likely a forgotten ferry.ip, and a test waiting for echoes would just
            // time out.
            return Err(ConfigError::BadValue {
                key: "ferry.echo_port".into(),
                value: cfg.echo_port.to_string(),
                why: "needs ferry.ip (the echo service only runs with networking)",
            });
        }
        if cfg.mem_mib > (1 << 20) {
            return Err(ConfigError::BadValue {
                key: "ferry.mem_mib".into(),
                value: cfg.mem_mib.to_string(),
                why: "unreasonably large",
            });
        }
        Ok(cfg)
    }
}

fn parse_u64(s: &str) -> Option<u64> {
    s.parse().ok()
}

/// Parses a size the way the kernel's `memparse` does for the common cases: a decimal or
/// `0x` hexadecimal number of bytes, optionally followed by K, M or G (binary units).
pub fn parse_size(s: &str) -> Result<u64, &'static str> {
    let (digits, shift) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 10),
        Some('m' | 'M') => (&s[..s.len() - 1], 20),
        Some('g' | 'G') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n = if let Some(hex) = digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        u64::from_str_radix(hex, 16)
    } else {
        digits.parse()
    }
    .map_err(|_| "expected a size such as 448M, 0x1c000000 or 469762048")?;
    n.checked_mul(1u64 << shift).ok_or("size overflows 64 bits")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_apply_without_ferry_parameters() {
        let cfg = Config::from_cmdline("console=ttyS0 quiet").unwrap();
        assert_eq!(cfg, Config::default());
    }

    #[test]
    fn full_command_line_parses() {
        let cfg = Config::from_cmdline(
            "console=ttyS0 mem=448M ferry.hb_ms=20 ferry.mem_mib=32 ferry.mem_rate=0 \
             ferry.disk=/dev/vda2 ferry.disk_rate=100",
        )
        .unwrap();
        assert_eq!(cfg.hb_ms, 20);
        assert_eq!(cfg.mem_mib, 32);
        assert_eq!(cfg.mem_rate, 0);
        assert_eq!(cfg.mem_base, Some(448 << 20), "mem= is the default base");
        assert_eq!(cfg.disk.as_deref(), Some("/dev/vda2"));
        assert_eq!(cfg.disk_rate, 100);
    }

    #[test]
    fn explicit_base_wins_over_mem() {
        let cfg = Config::from_cmdline("mem=448M ferry.mem_base=0x1d000000").unwrap();
        assert_eq!(cfg.mem_base, Some(0x1d00_0000));
    }

    #[test]
    fn unknown_parameter_is_refused() {
        let err = Config::from_cmdline("ferry.hb=10").unwrap_err();
        assert_eq!(err, ConfigError::Unknown("ferry.hb".into()));
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(Config::from_cmdline("ferry.hb_ms=0").is_err());
        assert!(Config::from_cmdline("ferry.hb_ms=abc").is_err());
        assert!(Config::from_cmdline("ferry.mem_base=448X").is_err());
        assert!(
            Config::from_cmdline("ferry.mem_base=1000").is_err(),
            "unaligned"
        );
        assert!(Config::from_cmdline("ferry.disk=vda2").is_err());
    }

    #[test]
    fn network_parameters_parse() {
        let cfg = Config::from_cmdline("console=ttyS0 ferry.ip=198.18.0.10/15").unwrap();
        let ip = cfg.ip.unwrap();
        assert_eq!(ip.addr, std::net::Ipv4Addr::new(198, 18, 0, 10));
        assert_eq!(ip.prefix, 15);
        assert_eq!(ip.netmask(), std::net::Ipv4Addr::new(255, 254, 0, 0));
        assert_eq!(ip.to_string(), "198.18.0.10/15");
        assert_eq!(cfg.echo_port, DEFAULT_ECHO_PORT, "default port");

        let cfg = Config::from_cmdline("ferry.echo_port=7100 ferry.ip=198.18.0.11/32").unwrap();
        assert_eq!(cfg.echo_port, 7100, "order does not matter");
        assert_eq!(cfg.ip.unwrap().netmask(), std::net::Ipv4Addr::BROADCAST);

        assert_eq!(Config::from_cmdline("ferry.ip=none").unwrap().ip, None);
        assert_eq!(
            Config::from_cmdline("quiet").unwrap().ip,
            None,
            "off by default"
        );
    }

    #[test]
    fn bad_network_parameters_are_refused() {
        for bad in [
            "ferry.ip=198.18.0.10",
            "ferry.ip=198.18.0.10/",
            "ferry.ip=198.18.0.10/33",
            "ferry.ip=198.18.0.10/0",
            "ferry.ip=198.18.0.10/+15",
            "ferry.ip=198.18.0/15",
            "ferry.ip=198.18.0.256/15",
            "ferry.ip=fd00::1/64",
            "ferry.ip=0.0.0.0/15",
            "ferry.ip=127.0.0.1/8",
            "ferry.ip=224.0.0.1/4",
            "ferry.ip=",
        ] {
            let err = Config::from_cmdline(bad).unwrap_err();
            assert!(
                matches!(&err, ConfigError::BadValue { key, .. } if key == "ferry.ip"),
                "{bad}: {err}"
            );
        }
        for bad in [
            "ferry.echo_port=0",
            "ferry.echo_port=65536",
            "ferry.echo_port=-1",
            "ferry.echo_port=http",
            "ferry.echo_port=",
        ] {
            let line = format!("ferry.ip=198.18.0.10/15 {bad}");
            let err = Config::from_cmdline(&line).unwrap_err();
            assert!(
                matches!(&err, ConfigError::BadValue { key, .. } if key == "ferry.echo_port"),
                "{bad}: {err}"
            );
        }
        let err = Config::from_cmdline("ferry.echo_port=7000").unwrap_err();
        assert!(err.to_string().contains("needs ferry.ip"), "{err}");
        assert_eq!(
            Config::from_cmdline("ferry.ipaddr=198.18.0.10/15").unwrap_err(),
            ConfigError::Unknown("ferry.ipaddr".into())
        );
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("448M"), Ok(448 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("0x1000"), Ok(4096));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("").is_err());
    }
}
