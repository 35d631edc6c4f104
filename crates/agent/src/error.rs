//! The agent's one error type, and its mapping to HTTP status codes (in
//! exactly one place: `AgentError::status`).

use ferry_core::spec::SpecError;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("no VM named {name:?} on host {host}")]
    VmNotFound { name: String, host: String },
    #[error("a VM named {name:?} already exists on host {host}")]
    VmExists { name: String, host: String },
    #[error("VM {name:?} is {state}: {action} needs it {needed}")]
    WrongState {
        name: String,
        state: ferry_api::VmState,
        action: &'static str,
        needed: &'static str,
    },
    #[error("invalid VM spec")]
    InvalidSpec(#[source] SpecError),
    #[error("unknown datastore {name:?} on host {host} (known: {known})")]
    UnknownDatastore {
        name: String,
        host: String,
        known: String,
    },
    #[error("disk {disk:?}: {problem}")]
    Disk { disk: String, problem: String },
    #[error("disk {disk:?}: {action} failed")]
    DiskIo {
        disk: String,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot build the QEMU command line for VM {name:?}")]
    CommandLine {
        name: String,
        #[source]
        source: ferry_qemu::cmdline::CmdlineError,
    },
    #[error("cannot launch QEMU for VM {name:?}")]
    Launch {
        name: String,
        #[source]
        source: ferry_qemu::process::ProcessError,
    },
    #[error("QMP {command} failed for VM {name:?}")]
    Qmp {
        name: String,
        command: &'static str,
        #[source]
        source: ferry_qemu::qmp::QmpError,
    },
    #[error("cannot persist the state of VM {name:?} in {path}")]
    Persist {
        name: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the console log of VM {name:?}")]
    Console {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("host {host} does not offer {what}")]
    Unsupported { what: String, host: String },
    #[error("migration: {problem}")]
    Migration { problem: String },
    #[error("{nic}: network {network:?} is not defined (VMs on cluster networks are created through the controller, which knows them: `ferry network list`)")]
    UnknownNetwork { nic: String, network: String },
    #[error("{nic}: cannot attach to network {network:?} on host {host}")]
    Network {
        nic: String,
        network: String,
        host: String,
        #[source]
        source: Box<crate::network::NetworkError>,
    },
    #[error("the VM {name:?} task has stopped")]
    ActorGone { name: String },
    #[error("datastore {datastore:?} on host {host} has {free} free; {needed} needed ({why})")]
    NoSpace {
        datastore: String,
        host: String,
        free: String,
        needed: String,
        why: String,
    },
    #[error("storage: {problem}")]
    Storage { problem: String },
    #[error("no backup {id:?} on host {host}")]
    BackupNotFound { id: String, host: String },
}

impl AgentError {
    /// HTTP status for this error. The only place errors meet status codes.
    pub fn status(&self) -> u16 {
        match self {
            AgentError::VmNotFound { .. } | AgentError::BackupNotFound { .. } => 404,
            AgentError::NoSpace { .. } => 507,
            AgentError::VmExists { .. }
            | AgentError::WrongState { .. }
            | AgentError::Migration { .. }
            | AgentError::Storage { .. } => 409,
            AgentError::InvalidSpec(_)
            | AgentError::UnknownDatastore { .. }
            | AgentError::Disk { .. }
            | AgentError::Unsupported { .. }
            | AgentError::UnknownNetwork { .. }
            | AgentError::Network { .. }
            | AgentError::CommandLine { .. } => 400,
            _ => 500,
        }
    }

    /// Stable code for scripts.
    pub fn code(&self) -> &'static str {
        match self {
            AgentError::VmNotFound { .. } | AgentError::BackupNotFound { .. } => "not_found",
            AgentError::NoSpace { .. } => "no_space",
            AgentError::Storage { .. } => "storage",
            AgentError::VmExists { .. } => "conflict",
            AgentError::WrongState { .. } => "wrong_state",
            AgentError::Migration { .. } => "migration",
            AgentError::InvalidSpec(_)
            | AgentError::UnknownDatastore { .. }
            | AgentError::Disk { .. }
            | AgentError::Unsupported { .. }
            | AgentError::UnknownNetwork { .. }
            | AgentError::Network { .. }
            | AgentError::CommandLine { .. } => "invalid_request",
            _ => "internal",
        }
    }
}

pub use ferry_api::error_chain as chain;
