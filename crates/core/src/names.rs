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
