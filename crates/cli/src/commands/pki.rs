//! `ferry pki …`: the cluster's certificate authority.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Create the cluster CA (refuses to overwrite an existing one).
    Init {
        /// Folder for ca.pem and ca-key.pem.
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
        /// The cluster's name, written into the CA certificate.
        #[arg(long, default_value = "ferry")]
        cluster: String,
    },
    /// Issue a host certificate (server and client use) signed by the CA.
    IssueHost {
        /// The host's name (its certificate's CN).
        name: String,
        /// Extra names and addresses the host is reached at (localhost and
        /// 127.0.0.1 are always included).
        #[arg(long = "san")]
        sans: Vec<String>,
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
    },
    /// Issue a client certificate for a person or script.
    IssueClient {
        name: String,
        /// admin, operator or viewer.
        #[arg(long, default_value = "admin")]
        role: String,
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
    },
}

pub fn run(command: PkiCommand) -> anyhow::Result<()> {
    match command {
        PkiCommand::Init { dir, cluster } => {
            let ca = ferry_pki::ClusterCa::create(&cluster).context("cannot create the CA")?;
            ca.save(&dir)
                .with_context(|| format!("cannot save the CA in {}", dir.display()))?;
            println!("created cluster CA {cluster:?} in {}", dir.display());
            Ok(())
        }
        PkiCommand::IssueHost { name, sans, dir } => {
            let ca = ferry_pki::ClusterCa::load(&dir)
                .with_context(|| format!("cannot load the CA from {}", dir.display()))?;
            let mut all = vec![
                "localhost".to_string(),
                "127.0.0.1".to_string(),
                name.clone(),
            ];
            all.extend(sans);
            let cert = ca
                .issue_host(&name, &all)
                .with_context(|| format!("cannot issue a certificate for host {name}"))?;
            cert.save(&dir, &name)
                .with_context(|| format!("cannot save the certificate in {}", dir.display()))?;
            println!("issued host certificate {}/{name}.pem", dir.display());
            Ok(())
        }
        PkiCommand::IssueClient { name, role, dir } => {
            let role: ferry_pki::Role = role
                .parse()
                .map_err(|_| anyhow::anyhow!("role {role:?} must be admin, operator or viewer"))?;
            let ca = ferry_pki::ClusterCa::load(&dir)
                .with_context(|| format!("cannot load the CA from {}", dir.display()))?;
            let cert = ca
                .issue_client(&name, role)
                .with_context(|| format!("cannot issue a certificate for {name}"))?;
            cert.save(&dir, &name)
                .with_context(|| format!("cannot save the certificate in {}", dir.display()))?;
            println!("issued client certificate {}/{name}.pem", dir.display());
            Ok(())
        }
    }
}
