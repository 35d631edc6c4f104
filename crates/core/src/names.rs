//! Stable QEMU identifiers derived from the ids in a spec.
//!
//! Migration needs the same device ids and block node names on both ends, so
//! they are a pure function of the spec's ids and nothing else. QEMU limits node
//! names to 31 characters; spec validation keeps ids short enough for the
//! longest prefix here.

/// Longest id a disk or NIC may have, so that every derived name fits QEMU's
/// 31-character limit on node names.
pub const MAX_ID_LEN: usize = 24;

/// The guest-visible device id of a disk (`-device ...,id=`).
pub fn disk_device_id(disk_id: &str) -> String {
    format!("disk-{disk_id}")
}

/// The format-layer block node (what the device and block jobs use).
pub fn disk_format_node(disk_id: &str) -> String {
    format!("fmt-{disk_id}")
}

/// The protocol-layer (file) block node under the format node.
pub fn disk_file_node(disk_id: &str) -> String {
    format!("file-{disk_id}")
}

/// The device id of a NIC.
pub fn nic_device_id(nic_id: &str) -> String {
    format!("nic-{nic_id}")
}

/// The netdev id of a NIC's backend.
pub fn nic_netdev_id(nic_id: &str) -> String {
    format!("net-{nic_id}")
}

/// The id of the guest RAM backend object (`-object memory-backend-memfd,id=`).
/// Migration matches RAM blocks by this name, so both ends must use it.
pub const MEMORY_BACKEND_ID: &str = "ram0";

/// The chardev that carries QMP.
pub const QMP_CHARDEV_ID: &str = "qmp";

/// The chardev behind the guest's first serial port (ttyS0).
pub const SERIAL_CHARDEV_ID: &str = "serial0";

/// The single virtio-scsi controller that every `bus = "scsi"` disk sits on.
pub const SCSI_CONTROLLER_ID: &str = "scsi0";

/// The AHCI controller added for `bus = "sata"` disks on i440fx machines
/// (q35 has one built in, whose ports are the buses `ide.0` … `ide.5`).
pub const AHCI_CONTROLLER_ID: &str = "ahci0";

/// Longest Linux network interface name (`IFNAMSIZ` minus the NUL).
pub const MAX_IFNAME_LEN: usize = 15;

/// Whether `name` is usable as a Linux interface name (a bridge or a tap).
///
/// The kernel accepts almost any byte, but `/`, whitespace, `:` (alias syntax)
/// and `%` (scope syntax) break tools and sysfs paths, so Ferry allows only
/// ASCII letters, digits, `.`, `_` and `-`, and not the names `.` and `..`.
pub fn is_valid_interface_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_IFNAME_LEN
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_names_fit_qemu_node_name_limit() {
        let id = "a".repeat(MAX_ID_LEN);
        for name in [
            disk_device_id(&id),
            disk_format_node(&id),
            disk_file_node(&id),
            nic_device_id(&id),
            nic_netdev_id(&id),
        ] {
            assert!(name.len() <= 31, "{name} is longer than 31 characters");
        }
    }

    #[test]
    fn interface_names_follow_linux_limits() {
        assert!(is_valid_interface_name("br0"));
        assert!(is_valid_interface_name("tap-vm_1.2"));
        assert!(is_valid_interface_name(&"x".repeat(15)));
        assert!(!is_valid_interface_name(&"x".repeat(16)));
        assert!(!is_valid_interface_name(""));
        assert!(!is_valid_interface_name(".."));
        assert!(!is_valid_interface_name("eth0:1"));
        assert!(!is_valid_interface_name("a/b"));
        assert!(!is_valid_interface_name("a b"));
    }
}
