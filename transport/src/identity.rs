//! Who a host is on the migration network: a cluster CA and the per-host
//! certificates it issues, used for mutual TLS between `migrated` peers.
//!
//! Every host certificate carries exactly one DNS subject alternative name,
//! the host's name ([`HostName`]). The server side of a connection learns the
//! dialing peer's name from that SAN, and the dialing side asks rustls to check
//! the SAN against the name it meant to reach, so the SAN *is* the identity.
//!
//! Files are PEM; private keys are written with mode 0600 because anyone who
//! can read a host key can impersonate that host to every peer.

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, DnsName, PrivateKeyDer};

/// How long before "now" a certificate's validity starts, so that peers whose
/// clocks run a little behind the issuer still accept it.
const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(5 * 60);

/// Default validity of a cluster CA: ten years.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// A host's name on the migration network, as found in its certificate's SAN.
///
/// Always a syntactically valid DNS name, stored lower-case (DNS names compare
/// case-insensitively, and peers are looked up by this value).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostName(String);

/// A string that is not usable as a host name.
#[derive(Debug, thiserror::Error)]
#[error("invalid host name {name:?}: must be a DNS name")]
pub struct InvalidHostName {
    /// The rejected input.
    pub name: String,
}

impl HostName {
    /// Validates `name` as a DNS name (IP addresses are refused: certificates
    /// name hosts, addresses are configuration).
    pub fn new(name: &str) -> Result<Self, InvalidHostName> {
        let lower = name.to_ascii_lowercase();
        let looks_like_ip = lower.parse::<std::net::IpAddr>().is_ok();
        if looks_like_ip || DnsName::try_from(lower.as_str()).is_err() {
            return Err(InvalidHostName {
                name: name.to_owned(),
            });
        }
        Ok(Self(lower))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for HostName {
    type Err = InvalidHostName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// The window in which a certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// First instant the certificate is valid.
    pub not_before: SystemTime,
    /// Last instant the certificate is valid.
    pub not_after: SystemTime,
}

impl Validity {
    /// Valid from (nearly) now for `duration`.
    pub fn for_duration(duration: Duration) -> Self {
        let now = SystemTime::now();
        Self {
            not_before: now - CLOCK_SKEW_ALLOWANCE,
            not_after: now + duration,
        }
    }

    /// A window that ended a day ago: for testing that expired peers are
    /// refused.
    pub fn expired() -> Self {
        let now = SystemTime::now();
        let day = Duration::from_secs(24 * 3600);
        Self {
            not_before: now - 2 * day,
            not_after: now - day,
        }
    }
}

/// Creating a cluster CA failed.
#[derive(Debug, thiserror::Error)]
pub enum GenerateCaError {
    /// The CA name is not a usable common name.
    #[error("invalid ca name {name:?}")]
    InvalidName {
        /// The rejected name.
        name: String,
    },
    /// Key generation or self-signing failed.
    #[error("cannot create ca certificate")]
    Sign(#[source] rcgen::Error),
}

/// Issuing a host certificate failed.
#[derive(Debug, thiserror::Error)]
pub enum IssueCertError {
    /// `not_after` is not later than `not_before`.
    #[error("validity window is empty")]
    EmptyValidity,
    /// Key generation or signing failed.
    #[error("cannot sign certificate for {host}")]
    Sign {
        /// The host the certificate was for.
        host: HostName,
        /// What rcgen reported.
        #[source]
        source: rcgen::Error,
    },
}

/// Writing a PEM file failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {path}")]
pub struct WritePemError {
    /// The file being written.
    pub path: PathBuf,
    /// The I/O error.
    #[source]
    pub source: std::io::Error,
}

/// Loading certificates or keys from PEM files failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadPemError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid PEM or holds no object of the expected kind.
    #[error("no valid {what} in {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// "certificate" or "private key".
        what: &'static str,
        /// The parser's error.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// The CA key or certificate cannot be used to issue certificates.
    #[error("unusable ca in {path}")]
    Ca {
        /// The file.
        path: PathBuf,
        /// What rcgen reported.
        #[source]
        source: rcgen::Error,
    },
    /// The host certificate names no host.
    #[error("host certificate {path} carries no usable host name")]
    HostName {
        /// The file.
        path: PathBuf,
        /// Why no name could be taken from it.
        #[source]
        source: PeerNameError,
    },
}

/// No host name could be read from a peer's certificate.
#[derive(Debug, thiserror::Error)]
pub enum PeerNameError {
    /// The DER does not parse as an X.509 certificate.
    #[error("certificate does not parse")]
    Parse,
    /// The certificate has no DNS SAN that is a valid host name.
    #[error("certificate has no dns subject alternative name")]
    NoDnsName,
}

/// The cluster certificate authority: trusted by every host, signs host
/// certificates.
pub struct ClusterCa {
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("ClusterCa").finish_non_exhaustive()
    }
}

impl ClusterCa {
    /// Generates a new CA (ECDSA P-256) whose common name is `name`, valid
    /// for [`CA_VALIDITY`].
    pub fn generate(name: &str) -> Result<Self, GenerateCaError> {
        if name.is_empty() || name.len() > 64 {
            return Err(GenerateCaError::InvalidName {
                name: name.to_owned(),
            });
        }
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        // Path length 0: the CA signs hosts directly, never other CAs.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let validity = Validity::for_duration(CA_VALIDITY);
        params.not_before = validity.not_before.into();
        params.not_after = validity.not_after.into();
        let key = KeyPair::generate().map_err(GenerateCaError::Sign)?;
        let cert = params.self_signed(&key).map_err(GenerateCaError::Sign)?;
        Ok(Self {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA written by [`ClusterCa::write_pem`].
    pub fn load_pem(cert_path: &Path, key_path: &Path) -> Result<Self, LoadPemError> {
        let cert_pem = read_to_string(cert_path)?;
        let key_pem = read_to_string(key_path)?;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|source| {
            LoadPemError::Parse {
                path: cert_path.to_owned(),
                what: "certificate",
                source,
            }
        })?;
        let key = KeyPair::from_pem(&key_pem).map_err(|source| LoadPemError::Ca {
            path: key_path.to_owned(),
            source,
        })?;
        let issuer =
            Issuer::from_ca_cert_der(&cert_der, key).map_err(|source| LoadPemError::Ca {
                path: cert_path.to_owned(),
                source,
            })?;
        Ok(Self {
            cert_der,
            cert_pem,
            issuer,
        })
    }

    /// The CA certificate (the trust anchor every host needs).
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA certificate as PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Writes the certificate (mode 0644) and the key (mode 0600).
    pub fn write_pem(&self, cert_path: &Path, key_path: &Path) -> Result<(), WritePemError> {
        write_file(cert_path, self.cert_pem.as_bytes(), 0o644)?;
        write_file(
            key_path,
            self.issuer.key().serialize_pem().as_bytes(),
            0o600,
        )
    }

    /// Issues a certificate for `host` (fresh ECDSA P-256 key), valid for
    /// both TLS server and client authentication, with `host` as its only
    /// SAN. A window in the past (see [`Validity::expired`]) is allowed so
    /// tests can check that expired peers are refused.
    pub fn issue_host(
        &self,
        host: &HostName,
        validity: Validity,
    ) -> Result<HostCert, IssueCertError> {
        if validity.not_after <= validity.not_before {
            return Err(IssueCertError::EmptyValidity);
        }
        let sign_err = |source| IssueCertError::Sign {
            host: host.clone(),
            source,
        };
        let mut params = CertificateParams::new(vec![host.0.clone()]).map_err(sign_err)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host.as_str());
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = validity.not_before.into();
        params.not_after = validity.not_after.into();
        let key = KeyPair::generate().map_err(sign_err)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(sign_err)?;
        Ok(HostCert {
            host: host.clone(),
            cert_der: cert.der().clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            key_der: key.serialize_der(),
        })
    }

    /// Issues a certificate for `host` and bundles it with this CA as the
    /// trust anchor: everything an endpoint needs.
    pub fn host_identity(
        &self,
        host: &HostName,
        validity: Validity,
    ) -> Result<HostIdentity, IssueCertError> {
        let cert = self.issue_host(host, validity)?;
        Ok(HostIdentity {
            host: cert.host.clone(),
            chain: vec![cert.cert_der.clone()],
            key: cert.private_key(),
            trust_anchor: self.cert_der.clone(),
        })
    }
}

/// A host certificate and its private key, as issued.
#[derive(Clone)]
pub struct HostCert {
    host: HostName,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    key_pem: String,
    key_der: Vec<u8>,
}

impl fmt::Debug for HostCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostCert")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

impl HostCert {
    /// The host the certificate names.
    pub fn host(&self) -> &HostName {
        &self.host
    }

    /// The certificate in DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The private key (PKCS#8).
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key_der.clone().into())
    }

    /// Writes the certificate (mode 0644) and the key (mode 0600).
    pub fn write_pem(&self, cert_path: &Path, key_path: &Path) -> Result<(), WritePemError> {
        write_file(cert_path, self.cert_pem.as_bytes(), 0o644)?;
        write_file(key_path, self.key_pem.as_bytes(), 0o600)
    }
}

/// What one host presents and trusts: its certificate chain and key, its
/// name (from the certificate), and the cluster CA it verifies peers against.
pub struct HostIdentity {
    host: HostName,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    trust_anchor: CertificateDer<'static>,
}

impl Clone for HostIdentity {
    fn clone(&self) -> Self {
        Self {
            host: self.host.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            trust_anchor: self.trust_anchor.clone(),
        }
    }
}

impl fmt::Debug for HostIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostIdentity")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

impl HostIdentity {
    /// Assembles an identity from a chain (leaf first), the leaf's key and
    /// the CA to trust. The host name is read from the leaf.
    pub fn from_parts(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        trust_anchor: CertificateDer<'static>,
    ) -> Result<Self, PeerNameError> {
        let host = host_name_of(chain.first().ok_or(PeerNameError::NoDnsName)?)?;
        Ok(Self {
            host,
            chain,
            key,
            trust_anchor,
        })
    }

    /// Loads a host's identity from PEM files: the cluster CA certificate,
    /// the host certificate (a chain, leaf first, is accepted) and its key.
    /// The host name is read from the leaf's SAN.
    pub fn load_pem(
        ca_cert_path: &Path,
        cert_path: &Path,
        key_path: &Path,
    ) -> Result<Self, LoadPemError> {
        let parse_err = |path: &Path, what| {
            let path = path.to_owned();
            move |source| LoadPemError::Parse { path, what, source }
        };
        let ca_pem = read_to_string(ca_cert_path)?;
        let trust_anchor = CertificateDer::from_pem_slice(ca_pem.as_bytes())
            .map_err(parse_err(ca_cert_path, "certificate"))?;
        let cert_pem = read_to_string(cert_path)?;
        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(parse_err(cert_path, "certificate"))?;
        let Some(leaf) = chain.first() else {
            return Err(LoadPemError::Parse {
                path: cert_path.to_owned(),
                what: "certificate",
                source: rustls::pki_types::pem::Error::NoItemsFound,
            });
        };
        let host = host_name_of(leaf).map_err(|source| LoadPemError::HostName {
            path: cert_path.to_owned(),
            source,
        })?;
        let key_pem = read_to_string(key_path)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(parse_err(key_path, "private key"))?;
        Ok(Self {
            host,
            chain,
            key,
            trust_anchor,
        })
    }

    /// This host's name.
    pub fn host(&self) -> &HostName {
        &self.host
    }

    /// The certificate chain presented to peers, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The private key of the leaf certificate.
    pub fn key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }

    /// The cluster CA certificate peers are verified against.
    pub fn trust_anchor(&self) -> &CertificateDer<'static> {
        &self.trust_anchor
    }
}

/// Reads the host name from a (verified) peer certificate: its first DNS SAN
/// that is a valid [`HostName`].
pub fn host_name_of(cert: &CertificateDer<'_>) -> Result<HostName, PeerNameError> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|_| PeerNameError::Parse)?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|_| PeerNameError::Parse)?
        .ok_or(PeerNameError::NoDnsName)?;
    san.value
        .general_names
        .iter()
        .find_map(|name| match name {
            x509_parser::extensions::GeneralName::DNSName(dns) => HostName::new(dns).ok(),
            _ => None,
        })
        .ok_or(PeerNameError::NoDnsName)
}

fn read_to_string(path: &Path) -> Result<String, LoadPemError> {
    fs::read_to_string(path).map_err(|source| LoadPemError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Writes `contents` to `path` with `mode`, also tightening the mode of a
/// file that already existed (`mode()` only applies at creation).
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), WritePemError> {
    let io_err = |source| WritePemError {
        path: path.to_owned(),
        source,
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(io_err)?;
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_err)?;
    file.write_all(contents).map_err(io_err)?;
    file.sync_all().map_err(io_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str) -> HostName {
        HostName::new(name).expect("valid host name")
    }

    #[test]
    fn host_names_are_validated_and_lowercased() {
        assert_eq!(host("Host-A.example").as_str(), "host-a.example");
        for bad in ["", "a b", "10.0.0.1", "::1", "host_a!"] {
            assert!(HostName::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn issued_cert_names_the_host() {
        let ca = ClusterCa::generate("test-cluster").unwrap();
        let cert = ca
            .issue_host(
                &host("node-1"),
                Validity::for_duration(Duration::from_secs(60)),
            )
            .unwrap();
        assert_eq!(host_name_of(cert.cert_der()).unwrap(), host("node-1"));
    }

    #[test]
    fn empty_validity_is_refused() {
        let ca = ClusterCa::generate("test-cluster").unwrap();
        let now = SystemTime::now();
        let err = ca
            .issue_host(
                &host("node-1"),
                Validity {
                    not_before: now,
                    not_after: now,
                },
            )
            .unwrap_err();
        assert!(matches!(err, IssueCertError::EmptyValidity));
    }

    #[test]
    fn pem_round_trip_and_key_modes() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        let ca = ClusterCa::generate("test-cluster").unwrap();
        ca.write_pem(&p("ca.pem"), &p("ca.key")).unwrap();
        let cert = ca
            .issue_host(
                &host("node-2"),
                Validity::for_duration(Duration::from_secs(60)),
            )
            .unwrap();
        cert.write_pem(&p("node.pem"), &p("node.key")).unwrap();

        for key in ["ca.key", "node.key"] {
            let mode = fs::metadata(p(key)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{key}");
        }

        // A reloaded CA can still issue, and the result chains to the same
        // trust anchor.
        let reloaded = ClusterCa::load_pem(&p("ca.pem"), &p("ca.key")).unwrap();
        assert_eq!(reloaded.cert_der(), ca.cert_der());
        reloaded
            .issue_host(
                &host("node-3"),
                Validity::for_duration(Duration::from_secs(60)),
            )
            .unwrap();

        let id = HostIdentity::load_pem(&p("ca.pem"), &p("node.pem"), &p("node.key")).unwrap();
        assert_eq!(id.host(), &host("node-2"));
        assert_eq!(id.chain(), std::slice::from_ref(cert.cert_der()));
        assert_eq!(id.trust_anchor(), ca.cert_der());
    }

    #[test]
    fn loading_garbage_is_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        fs::write(&junk, b"not pem at all").unwrap();
        let missing = dir.path().join("missing.pem");
        assert!(matches!(
            HostIdentity::load_pem(&junk, &junk, &junk),
            Err(LoadPemError::Parse { .. })
        ));
        assert!(matches!(
            ClusterCa::load_pem(&missing, &junk),
            Err(LoadPemError::Read { .. })
        ));
    }
}
