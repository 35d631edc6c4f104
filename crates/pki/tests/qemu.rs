//! QEMU's view of the cluster's certificates: the directory layout its
//! `tls-creds-x509` reads, its sanity checks, and a real TLS migration
//! between two QEMUs (`-machine none`, so no guest is needed) with
//! `tls-authz` naming the source host by its Distinguished Name.
//!
//! These tests need `qemu-system-x86_64` (QEMU 10, as the project requires),
//! or the binary named by `FERRY_QEMU`. They fail, rather than pass
//! silently, when it is missing.

mod common;

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Cluster;
use ferry_pki::{
    write_qemu_tls_dir, ClusterCa, PeerIdentity, PkiError, Role, QEMU_CA_CERT, QEMU_CLIENT_CERT,
    QEMU_CLIENT_KEY, QEMU_DH_PARAMS, QEMU_SERVER_CERT, QEMU_SERVER_KEY,
};
use serde_json::{json, Value};

const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(20);
const DESTINATION_PATIENCE: Duration = Duration::from_secs(3);

fn qemu_binary() -> PathBuf {
    std::env::var_os("FERRY_QEMU")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"))
}

/// One QEMU process with a QMP connection; killed and reaped on drop so no
/// test leaves a stray process behind.
struct Qemu {
    child: Child,
    qmp: Option<Qmp>,
    stderr_path: PathBuf,
}

struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qemu {
    /// Starts `qemu-system-x86_64 -machine none` with `extra` arguments and
    /// connects to its QMP socket. Returns QEMU's stderr if it exits first.
    fn start(work: &Path, name: &str, extra: &[&str]) -> Result<Qemu, String> {
        let socket = work.join(format!("{name}.qmp"));
        let stderr_path = work.join(format!("{name}.stderr"));
        let child = Command::new(qemu_binary())
            .args(["-nodefaults", "-display", "none", "-machine", "none", "-S"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", socket.display()))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr_path).unwrap())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {} ({e}); install QEMU 10 or set FERRY_QEMU",
                    qemu_binary().display()
                )
            });
        let mut qemu = Qemu {
            child,
            qmp: None,
            stderr_path,
        };
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Some(status) = qemu.child.try_wait().unwrap() {
                return Err(format!("QEMU exited ({status}): {}", qemu.stderr()));
            }
            if let Ok(stream) = UnixStream::connect(&socket) {
                stream.set_read_timeout(Some(STARTUP_TIMEOUT)).unwrap();
                let mut qmp = Qmp {
                    reader: BufReader::new(stream.try_clone().unwrap()),
                    writer: stream,
                };
                qmp.read_message(); // greeting
                qemu.qmp = Some(qmp);
                qemu.execute("qmp_capabilities", json!({})).unwrap();
                return Ok(qemu);
            }
            assert!(
                Instant::now() < deadline,
                "QEMU did not open its QMP socket"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Runs a QMP command; `Err` holds QEMU's error description.
    fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        let qmp = self.qmp.as_mut().expect("QMP connected");
        let request = json!({ "execute": command, "arguments": arguments });
        writeln!(qmp.writer, "{request}").unwrap();
        loop {
            let reply = qmp.read_message();
            // Events, and a greeting (`QMP`) should one arrive late, are not
            // the command's answer.
            if reply.get("event").is_some() || reply.get("QMP").is_some() {
                continue;
            }
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            return Err(match reply["error"]["desc"].as_str() {
                Some(desc) => desc.to_owned(),
                None => format!("unexpected QMP answer to {command}: {reply}"),
            });
        }
    }

    /// Polls `query-migrate` until it reports `completed` or `failed`, or
    /// `patience` runs out; returns the last status.
    fn wait_for_migration(&mut self, patience: Duration) -> String {
        let deadline = Instant::now() + patience;
        loop {
            let info = self.execute("query-migrate", json!({})).unwrap();
            let status = info["status"].as_str().unwrap_or("?").to_owned();
            if status == "completed" || status == "failed" || Instant::now() >= deadline {
                return status;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Qmp {
    fn read_message(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("QMP read");
        assert!(n > 0, "QMP connection closed");
        serde_json::from_str(&line).expect("QMP sends JSON")
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn qemu_tls_dir_has_the_files_qemu_reads_with_private_keys_0600() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("tls");
    let cluster = Cluster::new("prod");

    write_qemu_tls_dir(&dir, cluster.ca.cert_pem(), &cluster.host).unwrap();

    assert_eq!(
        fs::read_to_string(dir.join(QEMU_CA_CERT)).unwrap(),
        cluster.ca.cert_pem()
    );
    for cert in [QEMU_SERVER_CERT, QEMU_CLIENT_CERT] {
        assert_eq!(
            fs::read_to_string(dir.join(cert)).unwrap(),
            cluster.host.cert_pem
        );
        assert_eq!(mode(&dir.join(cert)), 0o644);
    }
    for key in [QEMU_SERVER_KEY, QEMU_CLIENT_KEY] {
        assert_eq!(
            fs::read_to_string(dir.join(key)).unwrap(),
            cluster.host.key_pem
        );
        assert_eq!(mode(&dir.join(key)), 0o600);
    }
    assert!(fs::read_to_string(dir.join(QEMU_DH_PARAMS))
        .unwrap()
        .starts_with("-----BEGIN DH PARAMETERS-----"));
    assert_eq!(mode(&dir), 0o700);
}

#[test]
fn qemu_tls_dir_refuses_a_user_certificate() {
    let work = tempfile::tempdir().unwrap();
    let cluster = Cluster::new("prod");

    let err = write_qemu_tls_dir(work.path(), cluster.ca.cert_pem(), &cluster.admin).unwrap_err();

    assert!(matches!(err, PkiError::NotAHostCertificate { .. }), "{err}");
}

#[test]
fn qemu_tls_dir_refuses_a_host_certificate_from_another_ca() {
    let work = tempfile::tempdir().unwrap();
    let cluster = Cluster::new("prod");
    let impostor = Cluster::new("prod");

    let err = write_qemu_tls_dir(work.path(), cluster.ca.cert_pem(), &impostor.host).unwrap_err();

    assert!(matches!(err, PkiError::NotIssuedByCa { .. }), "{err}");
}

#[test]
fn qemu_accepts_the_directory_as_server_and_as_client_credentials() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("tls");
    let cluster = Cluster::new("prod");
    write_qemu_tls_dir(&dir, cluster.ca.cert_pem(), &cluster.host).unwrap();

    for endpoint in ["server", "client"] {
        let object = format!(
            "tls-creds-x509,id=tls0,dir={},endpoint={endpoint},verify-peer=on",
            dir.display()
        );

        let qemu = Qemu::start(work.path(), endpoint, &["-object", &object]);

        let mut qemu = qemu.unwrap_or_else(|e| panic!("endpoint={endpoint}: {e}"));
        // QEMU loads and checks the files while creating the object and
        // exits if they fail; a live QMP with the object in place means
        // they passed.
        let objects = qemu
            .execute("qom-list", json!({ "path": "/objects" }))
            .unwrap();
        assert!(
            objects
                .as_array()
                .unwrap()
                .iter()
                .any(|o| o["name"] == "tls0"),
            "endpoint={endpoint}: {objects}"
        );
        // Without dh-params.pem a server endpoint spends seconds generating
        // DH parameters at every start; the folder carries fixed ones.
        assert!(
            dir.join("dh-params.pem").is_file(),
            "endpoint={endpoint}: no dh-params.pem in {}",
            dir.display()
        );
        // QEMU may close the monitor before our `quit` is fully written
        // (EPIPE); either way it ends, and the guard reaps it.
        let _ = qemu.execute("quit", json!({}));
    }
}

#[test]
fn qemu_refuses_a_server_certificate_that_does_not_match_its_ca() {
    // The control for the test above: QEMU's sanity check is real, so its
    // acceptance of our directory means something.
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("tls");
    let cluster = Cluster::new("prod");
    let other = ClusterCa::create("staging").unwrap();
    write_qemu_tls_dir(&dir, cluster.ca.cert_pem(), &cluster.host).unwrap();
    fs::write(dir.join(QEMU_CA_CERT), other.cert_pem()).unwrap();
    let object = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=on",
        dir.display()
    );

    let err = Qemu::start(work.path(), "bad", &["-object", &object])
        .err()
        .expect("QEMU accepted a certificate from another CA");

    assert!(err.contains("failed validation"), "{err}");
}

/// How a migration ended, as each side's `query-migrate` status.
#[derive(Debug)]
struct Outcome {
    source: String,
    destination: String,
    destination_stderr: String,
}

/// Two QEMUs, `-machine none`: the destination (host2) listens with TLS and
/// a `tls-authz` for `allowed_source`; the source (`source`) migrates to it.
fn migrate(
    cluster: &Cluster,
    source: &str,
    allowed_source: &str,
    tls_hostname: Option<&str>,
) -> Outcome {
    let work = tempfile::tempdir().unwrap();
    let source_cert = cluster.ca.issue_host(source, &[]).unwrap();
    let dest_cert = cluster.ca.issue_host("host2", &[]).unwrap();
    let source_dir = work.path().join("source-tls");
    let dest_dir = work.path().join("dest-tls");
    write_qemu_tls_dir(&source_dir, cluster.ca.cert_pem(), &source_cert).unwrap();
    write_qemu_tls_dir(&dest_dir, cluster.ca.cert_pem(), &dest_cert).unwrap();

    let mut dest = Qemu::start(work.path(), "dest", &["-incoming", "defer"]).unwrap();
    dest.execute(
        "object-add",
        json!({ "qom-type": "tls-creds-x509", "id": "tls0", "dir": dest_dir,
                "endpoint": "server", "verify-peer": true }),
    )
    .unwrap();
    dest.execute(
        "object-add",
        json!({ "qom-type": "authz-simple", "id": "authz0",
                "identity": PeerIdentity::host(allowed_source).tls_authz_identity() }),
    )
    .unwrap();
    dest.execute(
        "migrate-set-parameters",
        json!({ "tls-creds": "tls0", "tls-authz": "authz0" }),
    )
    .unwrap();
    // exit-on-error=false keeps a failed destination alive to be asked.
    dest.execute(
        "migrate-incoming",
        json!({ "uri": "tcp:127.0.0.1:0", "exit-on-error": false }),
    )
    .unwrap();
    let incoming = dest.execute("query-migrate", json!({})).unwrap();
    let port = incoming["socket-address"][0]["port"]
        .as_str()
        .expect("incoming port")
        .to_owned();

    let mut src = Qemu::start(work.path(), "source", &[]).unwrap();
    src.execute(
        "object-add",
        json!({ "qom-type": "tls-creds-x509", "id": "tls0", "dir": source_dir,
                "endpoint": "client" }),
    )
    .unwrap();
    let mut params = json!({ "tls-creds": "tls0" });
    if let Some(name) = tls_hostname {
        params["tls-hostname"] = json!(name);
    }
    src.execute("migrate-set-parameters", params).unwrap();
    src.execute("migrate", json!({ "uri": format!("tcp:127.0.0.1:{port}") }))
        .unwrap();
    let source = src.wait_for_migration(MIGRATION_TIMEOUT);
    assert!(
        source == "completed" || source == "failed",
        "source migration stuck in {source}"
    );
    // A destination that refused the connection stays in "setup"; a
    // successful one completes right after the source.
    let destination = dest.wait_for_migration(DESTINATION_PATIENCE);
    Outcome {
        source,
        destination,
        destination_stderr: dest.stderr(),
    }
}

#[test]
fn qemu_migrates_over_tls_when_authz_names_the_source_hosts_dn() {
    let cluster = Cluster::new("prod");

    let outcome = migrate(&cluster, "host1", "host1", Some("host2"));

    assert_eq!(outcome.source, "completed", "{outcome:?}");
    assert_eq!(outcome.destination, "completed", "{outcome:?}");
}

#[test]
fn qemu_accepts_the_destination_by_ip_address_san() {
    // Without tls-hostname QEMU checks the URI's host, 127.0.0.1.
    let cluster = Cluster::new("prod");

    let outcome = migrate(&cluster, "host1", "host1", None);

    assert_eq!(outcome.source, "completed", "{outcome:?}");
    assert_eq!(outcome.destination, "completed", "{outcome:?}");
}

#[test]
fn qemu_destination_refuses_a_source_host_authz_does_not_name() {
    let cluster = Cluster::new("prod");

    let outcome = migrate(&cluster, "host1", "host3", Some("host2"));

    // Only the destination knows: in TLS 1.3 the client's handshake is done
    // before the server has judged its certificate, and a small stream fits
    // in the socket buffers, so the *source* may well report "completed".
    assert_ne!(outcome.destination, "completed", "{outcome:?}");
    assert!(
        outcome
            .destination_stderr
            .contains("authz check for O=Ferry,OU=host,CN=host1 is denied"),
        "{outcome:?}"
    );
}

#[test]
fn qemu_source_refuses_a_destination_with_another_host_name() {
    let cluster = Cluster::new("prod");

    let outcome = migrate(&cluster, "host1", "host1", Some("host9"));

    assert_eq!(outcome.source, "failed", "{outcome:?}");
    assert_ne!(outcome.destination, "completed", "{outcome:?}");
}

#[test]
fn user_dn_differs_from_host_dn_for_the_same_name() {
    // A user named like a host can never satisfy a host's tls-authz.
    assert_ne!(
        PeerIdentity::client("host1", Role::Admin).tls_authz_identity(),
        PeerIdentity::host("host1").tls_authz_identity()
    );
}
