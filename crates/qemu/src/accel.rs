//! Choosing between KVM and TCG.
//!
//! `/dev/kvm` existing is not enough: the hosts Ferry is developed on expose
//! a `/dev/kvm` backed by PVM, a paravirtual (software) hypervisor under
//! which a standard Linux guest hangs. Real hardware virtualisation shows up
//! as the `vmx` (Intel) or `svm` (AMD) CPU flag, so KVM is chosen only when
//! the flag is present **and** `/dev/kvm` opens read-write; otherwise TCG,
//! with a reason that ends up in logs and host reports so an operator can see
//! why guests are slow. An explicit setting always wins (an operator may know
//! better), but the reason then carries a warning.
//!
//! Detection is split into gathering ([`AccelProbe::from_host`]) and a pure
//! decision ([`choose_with`]), so the decision is tested with injected
//! `/proc/cpuinfo` text.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Errors from accelerator settings.
#[derive(Debug, thiserror::Error)]
pub enum AccelError {
    #[error("unknown accelerator setting {value:?}: expected \"auto\", \"kvm\" or \"tcg\"")]
    UnknownSetting { value: String },
}

/// The accelerator a QEMU runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// The value of QEMU's `-accel` option.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the operator configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelSetting {
    /// KVM where it really works, TCG elsewhere.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl FromStr for AccelSetting {
    type Err = AccelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(AccelSetting::Auto),
            "kvm" => Ok(AccelSetting::Kvm),
            "tcg" => Ok(AccelSetting::Tcg),
            _ => Err(AccelError::UnknownSetting {
                value: s.to_owned(),
            }),
        }
    }
}

impl fmt::Display for AccelSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AccelSetting::Auto => "auto",
            AccelSetting::Kvm => "kvm",
            AccelSetting::Tcg => "tcg",
        })
    }
}

/// The decision and the sentence explaining it (for logs and host reports).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccelChoice {
    pub accel: Accel,
    pub reason: String,
}

/// The state of `/dev/kvm`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmDevice {
    /// Opened read-write.
    Usable,
    Missing,
    /// Present but opening it failed (permissions, …); the error text.
    Unopenable(String),
}

/// The facts the decision rests on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelProbe {
    /// `Some("vmx")` / `Some("svm")` when the CPU flags show hardware
    /// virtualisation.
    pub virt_flag: Option<&'static str>,
    /// Set when `/proc/cpuinfo` could not be read at all.
    pub cpuinfo_error: Option<String>,
    pub kvm: KvmDevice,
}

/// Finds `vmx` or `svm` in the `flags` lines of `/proc/cpuinfo` text. Only
/// whole words on `flags` lines count (`svm` appearing in a model name or a
/// `vmx flags` line must not).
pub fn cpu_virt_flag(cpuinfo: &str) -> Option<&'static str> {
    cpuinfo
        .lines()
        .filter_map(|line| {
            let (key, value) = line.split_once(':')?;
            (key.trim() == "flags").then_some(value)
        })
        .flat_map(str::split_ascii_whitespace)
        .find_map(|flag| match flag {
            "vmx" => Some("vmx"),
            "svm" => Some("svm"),
            _ => None,
        })
}

impl AccelProbe {
    /// Builds a probe from given `/proc/cpuinfo` text and `/dev/kvm` state.
    pub fn from_parts(cpuinfo: &str, kvm: KvmDevice) -> AccelProbe {
        AccelProbe {
            virt_flag: cpu_virt_flag(cpuinfo),
            cpuinfo_error: None,
            kvm,
        }
    }

    /// Reads this host's `/proc/cpuinfo` and tries to open `/dev/kvm`.
    pub fn from_host() -> AccelProbe {
        let kvm = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
        {
            Ok(_) => KvmDevice::Usable,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => KvmDevice::Missing,
            Err(e) => KvmDevice::Unopenable(e.to_string()),
        };
        match std::fs::read_to_string("/proc/cpuinfo") {
            Ok(text) => AccelProbe::from_parts(&text, kvm),
            Err(e) => AccelProbe {
                virt_flag: None,
                cpuinfo_error: Some(e.to_string()),
                kvm,
            },
        }
    }

    /// Whether KVM would really run a standard guest here, and why not.
    fn kvm_verdict(&self) -> Result<String, String> {
        let no_flag = || match &self.cpuinfo_error {
            Some(e) => format!("/proc/cpuinfo could not be read ({e}), so vmx/svm is unconfirmed"),
            None => "the CPU shows no vmx/svm".to_owned(),
        };
        match (&self.kvm, self.virt_flag) {
            (KvmDevice::Usable, Some(flag)) => Ok(format!(
                "the CPU shows {flag} and /dev/kvm opens read-write"
            )),
            (KvmDevice::Usable, None) => Err(format!(
                "/dev/kvm is present but {} (a paravirtual PVM hypervisor; standard guests \
                 hang under it)",
                no_flag()
            )),
            (KvmDevice::Missing, Some(flag)) => Err(format!(
                "the CPU shows {flag} but /dev/kvm does not exist (kvm module not loaded?)"
            )),
            (KvmDevice::Missing, None) => Err(format!("/dev/kvm does not exist and {}", no_flag())),
            (KvmDevice::Unopenable(e), Some(flag)) => Err(format!(
                "the CPU shows {flag} but /dev/kvm cannot be opened read-write ({e})"
            )),
            (KvmDevice::Unopenable(e), None) => Err(format!(
                "/dev/kvm cannot be opened read-write ({e}) and {}",
                no_flag()
            )),
        }
    }
}

/// Decides for this host (reads `/proc/cpuinfo`, opens `/dev/kvm`).
pub fn choose(setting: AccelSetting) -> AccelChoice {
    choose_with(setting, &AccelProbe::from_host())
}

/// The pure decision.
pub fn choose_with(setting: AccelSetting, probe: &AccelProbe) -> AccelChoice {
    let verdict = probe.kvm_verdict();
    let (accel, reason) = match (setting, verdict) {
        (AccelSetting::Auto, Ok(why)) => (Accel::Kvm, format!("KVM: {why}")),
        (AccelSetting::Auto, Err(why)) => (Accel::Tcg, format!("TCG: {why}")),
        (AccelSetting::Kvm, Ok(why)) => (Accel::Kvm, format!("KVM: set explicitly; {why}")),
        (AccelSetting::Kvm, Err(why)) => (
            Accel::Kvm,
            format!("KVM: set explicitly, but WARNING: {why}; guests may fail to start or hang"),
        ),
        (AccelSetting::Tcg, Ok(why)) => (
            Accel::Tcg,
            format!("TCG: set explicitly (KVM would be usable: {why})"),
        ),
        (AccelSetting::Tcg, Err(why)) => (Accel::Tcg, format!("TCG: set explicitly; {why}")),
    };
    AccelChoice { accel, reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTEL_VMX: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\n\
        model name\t: Intel(R) Xeon(R)\n\
        flags\t\t: fpu vme de pse tsc msr pae mce vmx smx est\n\
        vmx flags\t: vnmi preemption_timer invvpid ept_x_only\n";
    const AMD_SVM: &str = "processor\t: 0\nvendor_id\t: AuthenticAMD\n\
        flags\t\t: fpu vme de pse svm extapic cr8_legacy\n";
    const PVM_GUEST: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\n\
        flags\t\t: fpu vme de pse tsc msr pae hypervisor lahf_lm\n";

    #[test]
    fn vmx_and_svm_are_found_only_on_flags_lines() {
        assert_eq!(cpu_virt_flag(INTEL_VMX), Some("vmx"));
        assert_eq!(cpu_virt_flag(AMD_SVM), Some("svm"));
        assert_eq!(cpu_virt_flag(PVM_GUEST), None);
        assert_eq!(cpu_virt_flag("model name\t: svm vmx special\n"), None);
        assert_eq!(cpu_virt_flag("flags\t: vmxsomething svm_lock\n"), None);
        assert_eq!(cpu_virt_flag(""), None);
    }

    #[test]
    fn auto_with_dev_kvm_but_no_vmx_chooses_tcg_and_names_pvm() {
        let probe = AccelProbe::from_parts(PVM_GUEST, KvmDevice::Usable);
        let choice = choose_with(AccelSetting::Auto, &probe);
        assert_eq!(choice.accel, Accel::Tcg);
        assert!(choice.reason.starts_with("TCG:"), "{}", choice.reason);
        assert!(choice.reason.contains("no vmx/svm"), "{}", choice.reason);
        assert!(choice.reason.contains("PVM"), "{}", choice.reason);
    }

    #[test]
    fn auto_with_vmx_and_usable_dev_kvm_chooses_kvm() {
        let probe = AccelProbe::from_parts(INTEL_VMX, KvmDevice::Usable);
        let choice = choose_with(AccelSetting::Auto, &probe);
        assert_eq!(choice.accel, Accel::Kvm);
        assert!(choice.reason.contains("vmx"), "{}", choice.reason);
    }

    #[test]
    fn auto_with_svm_but_no_dev_kvm_chooses_tcg() {
        let probe = AccelProbe::from_parts(AMD_SVM, KvmDevice::Missing);
        let choice = choose_with(AccelSetting::Auto, &probe);
        assert_eq!(choice.accel, Accel::Tcg);
        assert!(
            choice.reason.contains("does not exist"),
            "{}",
            choice.reason
        );
    }

    #[test]
    fn auto_with_unopenable_dev_kvm_chooses_tcg_and_quotes_the_error() {
        let probe =
            AccelProbe::from_parts(INTEL_VMX, KvmDevice::Unopenable("Permission denied".into()));
        let choice = choose_with(AccelSetting::Auto, &probe);
        assert_eq!(choice.accel, Accel::Tcg);
        assert!(
            choice.reason.contains("Permission denied"),
            "{}",
            choice.reason
        );
    }

    #[test]
    fn explicit_kvm_on_pvm_is_honoured_with_a_warning() {
        let probe = AccelProbe::from_parts(PVM_GUEST, KvmDevice::Usable);
        let choice = choose_with(AccelSetting::Kvm, &probe);
        assert_eq!(choice.accel, Accel::Kvm);
        assert!(choice.reason.contains("WARNING"), "{}", choice.reason);
    }

    #[test]
    fn explicit_tcg_on_kvm_host_is_honoured() {
        let probe = AccelProbe::from_parts(INTEL_VMX, KvmDevice::Usable);
        let choice = choose_with(AccelSetting::Tcg, &probe);
        assert_eq!(choice.accel, Accel::Tcg);
        assert!(
            choice.reason.contains("set explicitly"),
            "{}",
            choice.reason
        );
    }

    #[test]
    fn settings_parse_and_display() {
        assert_eq!("auto".parse::<AccelSetting>().unwrap(), AccelSetting::Auto);
        assert_eq!(" KVM ".parse::<AccelSetting>().unwrap(), AccelSetting::Kvm);
        assert_eq!("tcg".parse::<AccelSetting>().unwrap(), AccelSetting::Tcg);
        let err = "hvf".parse::<AccelSetting>().unwrap_err();
        assert!(err.to_string().contains("\"hvf\""), "{err}");
        assert_eq!(Accel::Kvm.to_string(), "kvm");
        assert_eq!(Accel::Tcg.to_string(), "tcg");
        assert_eq!(serde_json::to_string(&Accel::Tcg).unwrap(), "\"tcg\"");
        assert_eq!(
            serde_json::from_str::<AccelSetting>("\"auto\"").unwrap(),
            AccelSetting::Auto
        );
    }

    #[test]
    fn this_host_decision_does_not_panic() {
        let choice = choose(AccelSetting::Auto);
        assert!(!choice.reason.is_empty());
    }
}
