//! The import report: what came in, what it became, and every change made
//! on the way. `ferry import` prints it (text, or JSON with `-o json`) for a
//! dry run and for a real import alike.

use crate::detect::ImageInfo;
use crate::foreign::Origin;
use ferry_core::spec::VmSpec;
use serde::Serialize;

/// What happened to one source device (or setting) in the mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MappingAction {
    /// Carried over as it was.
    Kept,
    /// Carried over as the closest thing Ferry supports.
    Changed,
    /// Not carried over: Ferry has no equivalent.
    LeftOut,
}

/// One line of the mapping: a source device and what it became.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mapping {
    /// `cpu`, `memory`, `firmware`, `disk`, `nic`, `cdrom`, `sound`…
    pub device: String,
    /// The device as the source describes it (`scsi0:0 on lsilogic,
    /// disk1.vmdk`).
    pub source: String,
    /// What it became in the Ferry spec (`vd0: scsi (virtio-scsi)`), empty
    /// when left out.
    pub target: String,
    pub action: MappingAction,
    /// Why, when it is not kept as is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// One disk of the import.
#[derive(Debug, Clone, Serialize)]
pub struct DiskReport {
    /// The disk's id in the Ferry spec.
    pub id: String,
    /// The source file (inside an OVA: `archive.ova:member`).
    pub source: String,
    /// What Ferry's own inspection found in its bytes.
    pub image: ImageInfo,
    /// The file made in the datastore, and its format.
    pub target_file: String,
    pub target_format: String,
    /// `qemu-img compare` between the input and the result; absent on a dry
    /// run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verified: Option<bool>,
    /// Milliseconds of conversion and of verification.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub convert_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify_ms: Option<u64>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct ImportReport {
    /// The path given to `ferry import`.
    pub source: String,
    /// What kind of description it was.
    pub origin: Origin,
    pub dry_run: bool,
    /// The VM's name in Ferry.
    pub vm: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    pub datastore: String,
    /// Every device and setting, what it became.
    pub mappings: Vec<Mapping>,
    pub disks: Vec<DiskReport>,
    /// Checks passed on the input (manifest digests, formats).
    pub checks: Vec<String>,
    /// Things the user should know before booting the VM.
    pub warnings: Vec<String>,
    /// The resulting Ferry spec.
    pub spec: VmSpec,
}

impl ImportReport {
    /// The report as people read it.
    pub fn render_text(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let verb = if self.dry_run {
            "would import"
        } else {
            "imported"
        };
        let _ = writeln!(
            out,
            "{verb} {} ({}) as VM {}{} on datastore {}",
            self.source,
            self.origin.as_str(),
            self.vm,
            self.host
                .as_deref()
                .map(|h| format!(" on host {h}"))
                .unwrap_or_default(),
            self.datastore
        );
        let _ = writeln!(out, "\nmappings (→ kept, ⇒ changed, ✗ left out):");
        let width = self
            .mappings
            .iter()
            .map(|m| m.device.chars().count())
            .max()
            .unwrap_or(0);
        for m in &self.mappings {
            let (arrow, target) = match m.action {
                MappingAction::Kept => ("→", m.target.as_str()),
                MappingAction::Changed => ("⇒", m.target.as_str()),
                MappingAction::LeftOut => ("✗", "left out"),
            };
            let _ = writeln!(out, "  {:width$}  {}", m.device, m.source);
            let _ = writeln!(out, "  {:width$}  {arrow} {target}", "");
            if let Some(note) = &m.note {
                let _ = writeln!(out, "  {:width$}    {note}", "");
            }
        }
        let _ = writeln!(out, "\ndisks:");
        for d in &self.disks {
            let variant = if d.image.variant.is_empty() {
                String::new()
            } else {
                format!(" {}", d.image.variant)
            };
            let _ = write!(
                out,
                "  {}: {} ({}{variant}, {} virtual) → {} ({})",
                d.id,
                d.source,
                d.image.format.name(),
                ferry_core::units::format_size_human(d.image.virtual_size),
                d.target_file,
                d.target_format
            );
            match d.verified {
                Some(true) => out.push_str(", verified identical (qemu-img compare)"),
                Some(false) => out.push_str(", DIFFERS from the input"),
                None => {}
            }
            out.push('\n');
        }
        if !self.checks.is_empty() {
            let _ = writeln!(out, "\nchecks:");
            for c in &self.checks {
                let _ = writeln!(out, "  ✓ {c}");
            }
        }
        if !self.warnings.is_empty() {
            let _ = writeln!(out, "\nwarnings:");
            for w in &self.warnings {
                let _ = writeln!(out, "  ! {w}");
            }
        }
        if self.dry_run {
            let _ = writeln!(out, "\ndry run: nothing was written");
        }
        out
    }
}
