//! The invariant checkers of `ferry_test_support::invariants`, bound to a [`Cluster`]:
//! its scope (folder, hosts, namespaces, datastores), a G2 baseline of it, and G3 against
//! what its controller reports through the real `ferry` CLI.
//!
//! G1 needs no cluster: `ferry_test_support::invariants::{check_g1, G1Watch}` take the
//! VM's uuid ([`Cluster::vm_uuid`]) and look at every QEMU on the machine.

use ferry_test_support::invariants::{
    self, Baseline, ControllerView, G3Report, Invariant, Scope, Violation,
};

use crate::Cluster;

impl Cluster {
    /// What belongs to this cluster, for G2 and G3 (`Scope::local_cluster`).
    pub fn invariant_scope(&self) -> Scope {
        Scope::local_cluster(self.dir()).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A G2 baseline of this cluster, taken now.
    pub fn g2_baseline(&self) -> Baseline {
        Baseline::capture(&self.invariant_scope()).unwrap_or_else(|e| panic!("G2 baseline: {e}"))
    }

    /// The VM's uuid, as the controller reports it.
    pub fn vm_uuid(&self, name: &str) -> String {
        let vm = self.vm(name);
        vm["uuid"]
            .as_str()
            .unwrap_or_else(|| panic!("no uuid in {vm}"))
            .to_string()
    }

    /// What the controller says: `ferry vm list -o json` and `ferry migration list -o
    /// json`. A host that did not answer makes the view partial; G3 cannot be judged
    /// then, and says so.
    pub fn controller_view(&self) -> Result<ControllerView, Violation> {
        let unobservable = |error: String| Violation::Unobservable {
            invariant: Invariant::G3,
            what: "the controller's view".to_string(),
            error,
        };
        let vms = self.ferry_ok(&["vm", "list", "-o", "json"]);
        if vms.stderr.contains("warning: host") {
            return Err(unobservable(format!(
                "a host did not answer: {}",
                vms.stderr.trim()
            )));
        }
        let migrations = self.ferry_ok(&["migration", "list", "-o", "json"]);
        ControllerView::from_json(&vms.json(), &migrations.json()).map_err(unobservable)
    }

    /// G3 for this cluster.
    pub fn check_g3(&self) -> Result<G3Report, Violation> {
        invariants::check_g3(&self.controller_view()?, &self.invariant_scope())
    }
}
