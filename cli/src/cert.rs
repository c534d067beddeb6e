//! `migratectl cert`: the cluster CA and host certificates peers use for
//! mutual TLS. Thin over `transport::identity`, which owns the certificate
//! profile; this module only decides file names and refuses to clobber keys.
//!
//! Layout, matching the daemon's `[tls]` defaults:
//!
//! ```text
//! CA_DIR/ca.pem  CA_DIR/ca.key          (cert init-ca)
//! OUT/ca.pem  OUT/host.pem  OUT/host.key (cert issue; ca.pem copied for [tls] ca)
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use transport::identity::{ClusterCa, HostName, Validity};

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
pub const HOST_CERT: &str = "host.pem";
pub const HOST_KEY: &str = "host.key";

/// Host certificates last a year unless told otherwise.
const DEFAULT_DAYS: u32 = 365;

#[derive(Subcommand, Debug)]
pub enum CertCommand {
    /// Create a cluster CA (ca.pem, ca.key with mode 0600) in --dir.
    InitCa(InitCaArgs),
    /// Issue a host certificate (host.pem, host.key with mode 0600, plus a
    /// copy of ca.pem) into --out.
    Issue(IssueArgs),
}

#[derive(Args, Debug)]
pub struct InitCaArgs {
    /// Directory for ca.pem and ca.key (created if missing).
    #[arg(long)]
    pub dir: PathBuf,
    /// The CA's common name.
    #[arg(long, default_value = "migrated cluster CA")]
    pub name: String,
    /// Replace an existing CA (every host certificate it issued stops
    /// being trusted by hosts that get the new ca.pem).
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Debug)]
pub struct IssueArgs {
    /// The host's name, as in its daemon's host_name and its peers' [peers].
    pub host: String,
    /// Directory holding ca.pem and ca.key (from `cert init-ca`).
    #[arg(long)]
    pub ca_dir: PathBuf,
    /// Directory for host.pem, host.key and ca.pem (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Days the certificate is valid.
    #[arg(long, default_value_t = DEFAULT_DAYS, value_parser = clap::value_parser!(u32).range(1..=36500))]
    pub days: u32,
    /// Replace an existing host.pem/host.key in --out.
    #[arg(long)]
    pub force: bool,
}

/// Runs a `cert` subcommand, printing what was written.
pub fn run(cmd: CertCommand) -> Result<()> {
    match cmd {
        CertCommand::InitCa(a) => {
            let (cert, key) = init_ca(&a.dir, &a.name, a.force)?;
            println!("wrote {} and {}", cert.display(), key.display());
            println!(
                "next: migratectl cert issue HOST --ca-dir {} --out DIR, once per host",
                a.dir.display()
            );
            Ok(())
        }
        CertCommand::Issue(a) => {
            let written = issue(&a.host, &a.ca_dir, &a.out, a.days, a.force)?;
            println!("wrote {}", join_paths(&written));
            println!(
                "point the daemon's [tls] ca, cert and key at them; host_name must be {}",
                a.host.to_ascii_lowercase()
            );
            Ok(())
        }
    }
}

fn join_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

/// Refuses to overwrite key material unless `force`: a clobbered CA key
/// silently splits a cluster.
fn refuse_existing(paths: &[&Path], force: bool) -> Result<()> {
    if force {
        return Ok(());
    }
    if let Some(p) = paths.iter().find(|p| p.exists()) {
        bail!("{} already exists; pass --force to replace it", p.display());
    }
    Ok(())
}

/// Creates a CA in `dir`; returns the certificate and key paths.
pub fn init_ca(dir: &Path, name: &str, force: bool) -> Result<(PathBuf, PathBuf)> {
    let cert = dir.join(CA_CERT);
    let key = dir.join(CA_KEY);
    refuse_existing(&[&cert, &key], force)?;
    create_dir(dir)?;
    let ca = ClusterCa::generate(name).context("cannot create the CA")?;
    ca.write_pem(&cert, &key).context("cannot write the CA")?;
    Ok((cert, key))
}

/// Issues a certificate for `host` from the CA in `ca_dir` into `out`;
/// returns the files written.
pub fn issue(
    host: &str,
    ca_dir: &Path,
    out: &Path,
    days: u32,
    force: bool,
) -> Result<Vec<PathBuf>> {
    let host = HostName::new(host).context("cannot issue a certificate")?;
    let ca =
        ClusterCa::load_pem(&ca_dir.join(CA_CERT), &ca_dir.join(CA_KEY)).with_context(|| {
            format!(
                "cannot load the CA from {} (create one with `migratectl cert init-ca --dir {}`)",
                ca_dir.display(),
                ca_dir.display()
            )
        })?;
    let cert_path = out.join(HOST_CERT);
    let key_path = out.join(HOST_KEY);
    refuse_existing(&[&cert_path, &key_path], force)?;
    create_dir(out)?;
    let validity = Validity::for_duration(Duration::from_secs(u64::from(days) * 24 * 3600));
    let cert = ca
        .issue_host(&host, validity)
        .context("cannot issue the certificate")?;
    cert.write_pem(&cert_path, &key_path)
        .context("cannot write the certificate")?;
    let mut written = vec![cert_path, key_path];
    // The daemon needs the CA certificate beside its own; copying it saves
    // a step, and it is public.
    let ca_copy = out.join(CA_CERT);
    if ca_copy != ca_dir.join(CA_CERT) {
        std::fs::write(&ca_copy, ca.cert_pem())
            .with_context(|| format!("cannot write {}", ca_copy.display()))?;
        written.push(ca_copy);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use transport::identity::HostIdentity;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn issued_certificates_load_as_identities() {
        let tmp = tempfile::tempdir().unwrap();
        let ca_dir = tmp.path().join("ca");
        let (ca_cert, ca_key) = init_ca(&ca_dir, "test ca", false).unwrap();
        assert_eq!(mode(&ca_key), 0o600);
        let out = tmp.path().join("node-a");
        issue("Node-A", &ca_dir, &out, 2, false).unwrap();
        assert_eq!(mode(&out.join(HOST_KEY)), 0o600);
        let id = HostIdentity::load_pem(
            &out.join(CA_CERT),
            &out.join(HOST_CERT),
            &out.join(HOST_KEY),
        )
        .unwrap();
        assert_eq!(id.host().as_str(), "node-a");
        let ca = ClusterCa::load_pem(&ca_cert, &ca_key).unwrap();
        assert_eq!(id.trust_anchor(), ca.cert_der());
    }

    #[test]
    fn existing_keys_are_not_clobbered() {
        let tmp = tempfile::tempdir().unwrap();
        init_ca(tmp.path(), "ca", false).unwrap();
        let before = std::fs::read(tmp.path().join(CA_KEY)).unwrap();
        let err = init_ca(tmp.path(), "ca", false).unwrap_err();
        assert!(format!("{err:#}").contains("--force"), "{err:#}");
        assert_eq!(std::fs::read(tmp.path().join(CA_KEY)).unwrap(), before);
        init_ca(tmp.path(), "ca", true).unwrap();
        assert_ne!(std::fs::read(tmp.path().join(CA_KEY)).unwrap(), before);
    }

    #[test]
    fn bad_host_and_missing_ca_are_clear() {
        let tmp = tempfile::tempdir().unwrap();
        let err = issue("node_a!", tmp.path(), tmp.path(), 1, false).unwrap_err();
        assert!(format!("{err:#}").contains("invalid host name"), "{err:#}");
        let err = issue("node-a", tmp.path(), tmp.path(), 1, false).unwrap_err();
        assert!(format!("{err:#}").contains("cert init-ca"), "{err:#}");
    }
}
