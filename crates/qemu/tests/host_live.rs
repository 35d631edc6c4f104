//! Host facts from the real QEMU.

mod process_support;

use ferry_qemu::accel::AccelSetting;
use ferry_qemu::host;
use process_support::qemu_binary;

#[tokio::test]
async fn host_facts_list_the_default_machine_type_and_cpu_model() {
    let binary = qemu_binary();

    let facts = host::gather(&binary, AccelSetting::Auto).await.unwrap();

    assert!(
        facts.machine_types.iter().any(|m| m == "pc-q35-10.0"),
        "{:?}",
        facts.machine_types
    );
    assert!(
        facts.cpu_models.iter().any(|c| c == "qemu64"),
        "{:?}",
        facts.cpu_models
    );
    assert!(facts.qemu_version.major >= 10);
    assert!(facts.cpus >= 1);
    assert!(facts.memory_bytes >= facts.memory_available_bytes);
    assert!(!facts.accel_reason.is_empty());
    let json = serde_json::to_value(&facts).unwrap();
    assert!(json["accel"] == "tcg" || json["accel"] == "kvm");
}

#[tokio::test]
async fn capabilities_are_cached_per_binary_and_version() {
    let binary = qemu_binary();

    let first = host::qemu_capabilities(&binary).await.unwrap();
    let second = host::qemu_capabilities(&binary).await.unwrap();

    assert!(
        std::sync::Arc::ptr_eq(&first, &second),
        "second call should hit the cache"
    );
    assert!(first
        .machine_aliases
        .iter()
        .any(|(alias, _)| alias == "q35"));
}
