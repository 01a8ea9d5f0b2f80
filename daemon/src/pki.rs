//! The daemon's small PKI: `ca init` makes a CA and a server certificate, `cert issue`
//! makes an agent certificate whose common name is the agent id.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// CA lifetime: ten years; rotating a fleet's trust root is a planned event.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Server certificate lifetime: two years.
pub const SERVER_VALIDITY: Duration = Duration::from_secs(2 * 365 * 24 * 3600);
/// Default agent certificate lifetime for `cert issue`: one year.
pub const AGENT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Default lifetime of certificates issued at enrollment and renewal: 90 days; agents
/// renew them over their live connection well before they run out.
pub const ENROLLED_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);

/// Why a PKI command or a signature failed. Each message carries its causes inline
/// (callers print `{e}`), so nothing is marked as a source to print twice.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// `ca init` was given no name for the server certificate.
    #[error("give at least one --name: the host name or IP agents use to reach this daemon")]
    NoNames,
    /// `ca init` found a CA key in place; replacing it would orphan every agent.
    #[error("{} already exists; refusing to replace the CA (every agent trusts it). Remove it first if you really mean to start over", .0.display())]
    CaExists(PathBuf),
    /// A `--name` is neither an IP address nor a valid DNS name.
    #[error("`{name}` is not a valid host name: {error}")]
    HostName {
        /// The name given.
        name: String,
        /// Why rcgen refused it.
        error: rcgen::Error,
    },
    /// A directory could not be created.
    #[error("cannot create {}: {error}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The failure.
        error: std::io::Error,
    },
    /// A file could not be written.
    #[error("cannot write {}: {error}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The failure.
        error: std::io::Error,
    },
    /// A file could not be read.
    #[error("cannot read {}: {error}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The failure.
        error: std::io::Error,
    },
    /// The CA key file holds no usable private key.
    #[error("{} is not a private key: {error}", path.display())]
    NotAKey {
        /// The file.
        path: PathBuf,
        /// What rcgen said.
        error: rcgen::Error,
    },
    /// The CA certificate file holds no usable CA certificate.
    #[error("{} is not a CA certificate: {error}", path.display())]
    NotACa {
        /// The file.
        path: PathBuf,
        /// What rcgen said.
        error: rcgen::Error,
    },
    /// `--ca-dir` holds no usable CA; says which command makes one.
    #[error("run `updraftd ca init --dir {}` first, or pass --ca-dir: {error}", ca_dir.display())]
    NoCa {
        /// The directory looked in.
        ca_dir: PathBuf,
        /// What was wrong with its files.
        error: Box<PkiError>,
    },
    /// A certificate request did not parse, or its signature did not verify.
    #[error("not a usable certificate request: {0}")]
    BadRequest(rcgen::Error),
    /// A certificate request names no agent id.
    #[error("the certificate request names no agent id (common name, UTF-8)")]
    NoAgentId,
    /// The agent id is not one a certificate may name.
    #[error("{0}")]
    AgentId(updraft_shared::tls::AgentIdError),
    /// Generating a key or signing failed.
    #[error(transparent)]
    Sign(#[from] rcgen::Error),
}

/// Files written by `ca init`.
#[derive(Debug)]
pub struct CaFiles {
    /// `ca.pem`.
    pub ca_cert: PathBuf,
    /// `ca.key`.
    pub ca_key: PathBuf,
    /// `server.pem`.
    pub server_cert: PathBuf,
    /// `server.key`.
    pub server_key: PathBuf,
    /// SHA-256 of the CA certificate's DER, hex: what agents pin.
    pub fingerprint: String,
}

fn validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = SystemTime::now();
    // Back-date so boards (and daemons) with a slightly slow clock accept fresh
    // certificates: an hour, or a tenth of a short lifetime.
    let backdate = Duration::from_secs(3600).min(lifetime / 10);
    params.not_before = (now - backdate).into();
    params.not_after = (now + lifetime).into();
}

fn write_secret(path: &Path, pem: &str) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(pem.as_bytes()))
        .map_err(|error| PkiError::Write {
            path: path.to_path_buf(),
            error,
        })
}

fn write_public(path: &Path, pem: &str) -> Result<(), PkiError> {
    std::fs::write(path, pem).map_err(|error| PkiError::Write {
        path: path.to_path_buf(),
        error,
    })
}

fn create_dir(path: &Path) -> Result<(), PkiError> {
    std::fs::create_dir_all(path).map_err(|error| PkiError::CreateDir {
        path: path.to_path_buf(),
        error,
    })
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|error| PkiError::Read {
        path: path.to_path_buf(),
        error,
    })
}

/// Creates `dir/ca.pem ca.key server.pem server.key`. `names` go into the server
/// certificate (DNS names or IP addresses agents will use). Refuses to overwrite an
/// existing CA key: that would orphan every enrolled agent.
pub fn ca_init(dir: &Path, names: &[String]) -> Result<CaFiles, PkiError> {
    if names.is_empty() {
        return Err(PkiError::NoNames);
    }
    create_dir(dir)?;
    let files = CaFiles {
        ca_cert: dir.join("ca.pem"),
        ca_key: dir.join("ca.key"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        fingerprint: String::new(),
    };
    if files.ca_key.exists() {
        return Err(PkiError::CaExists(files.ca_key));
    }
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name = DistinguishedName::new();
    ca.distinguished_name.push(DnType::CommonName, "Updraft CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut ca, CA_VALIDITY);
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let (server_cert, server_key) = server_certificate(&issuer, names)?;
    write_public(&files.ca_cert, &ca_cert.pem())?;
    write_secret(&files.ca_key, &issuer.key().serialize_pem())?;
    write_public(&files.server_cert, &server_cert)?;
    write_secret(&files.server_key, &server_key)?;
    Ok(CaFiles {
        fingerprint: updraft_shared::tls::fingerprint(ca_cert.der()),
        ..files
    })
}

/// A server certificate for `names` (the first is its common name), signed by
/// `issuer`, and its new key: PEM both.
fn server_certificate(
    issuer: &Issuer<'_, KeyPair>,
    names: &[String],
) -> Result<(String, String), PkiError> {
    if names.is_empty() {
        return Err(PkiError::NoNames);
    }
    let server_key = KeyPair::generate()?;
    let mut server = CertificateParams::default();
    server
        .distinguished_name
        .push(DnType::CommonName, names[0].clone());
    server.subject_alt_names = names
        .iter()
        .map(|n| match n.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => match n.clone().try_into() {
                Ok(dns) => Ok(SanType::DnsName(dns)),
                Err(error) => Err(PkiError::HostName {
                    name: n.clone(),
                    error,
                }),
            },
        })
        .collect::<Result<_, _>>()?;
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    validity(&mut server, SERVER_VALIDITY);
    let server_cert = server.signed_by(&server_key, issuer)?;
    Ok((server_cert.pem(), server_key.serialize_pem()))
}

/// A new server certificate for `names` from the CA in `ca_dir` (its `ca.pem` and
/// `ca.key`), written as `out/server.pem` and `out/server.key`; agents keep trusting
/// the daemon, since the CA is the same.
pub fn server_issue(
    ca_dir: &Path,
    names: &[String],
    out: &Path,
) -> Result<(PathBuf, PathBuf), PkiError> {
    let issuer = load_issuer(ca_dir)?;
    let (cert, key) = server_certificate(&issuer, names)?;
    create_dir(out)?;
    let (cert_path, key_path) = (out.join("server.pem"), out.join("server.key"));
    write_public(&cert_path, &cert)?;
    write_secret(&key_path, &key)?;
    Ok((cert_path, key_path))
}

/// Loads the CA from `ca_dir/ca.pem` and `ca_dir/ca.key`.
pub fn load_issuer(ca_dir: &Path) -> Result<Issuer<'static, KeyPair>, PkiError> {
    load_issuer_files(&ca_dir.join("ca.pem"), &ca_dir.join("ca.key")).map_err(|e| PkiError::NoCa {
        ca_dir: ca_dir.to_path_buf(),
        error: Box::new(e),
    })
}

/// Loads the CA certificate and its key from two PEM files.
pub fn load_issuer_files(
    cert_path: &Path,
    key_path: &Path,
) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let cert = read(cert_path)?;
    let key = read(key_path)?;
    let key = KeyPair::from_pem(&key).map_err(|error| PkiError::NotAKey {
        path: key_path.to_path_buf(),
        error,
    })?;
    Issuer::from_ca_cert_pem(&cert, key).map_err(|error| PkiError::NotACa {
        path: cert_path.to_path_buf(),
        error,
    })
}

fn agent_params(agent_id: &str, lifetime: Duration) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, agent_id);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    validity(&mut params, lifetime);
    params
}

/// Parses and verifies a PKCS#10 request (PEM): its signature proves the sender holds
/// the key.
pub fn parse_request(csr_pem: &str) -> Result<rcgen::CertificateSigningRequestParams, PkiError> {
    rcgen::CertificateSigningRequestParams::from_pem(csr_pem).map_err(PkiError::BadRequest)
}

/// Signs the public key of a parsed request into an agent certificate for `agent_id`.
/// Only the key is taken from the request: subject, usages and lifetime are ours.
/// Returns the certificate, PEM.
pub fn sign_request(
    issuer: &Issuer<'static, KeyPair>,
    mut request: rcgen::CertificateSigningRequestParams,
    agent_id: &str,
    lifetime: Duration,
) -> Result<String, PkiError> {
    updraft_shared::tls::check_agent_id(agent_id).map_err(PkiError::AgentId)?;
    request.params = agent_params(agent_id, lifetime);
    Ok(request.signed_by(issuer)?.pem())
}

/// The agent id a parsed request asks for: its subject common name.
pub fn requested_agent_id(
    request: &rcgen::CertificateSigningRequestParams,
) -> Result<String, PkiError> {
    match request.params.distinguished_name.get(&DnType::CommonName) {
        Some(rcgen::DnValue::Utf8String(s)) => Ok(s.clone()),
        Some(rcgen::DnValue::PrintableString(s)) => Ok(s.as_str().to_string()),
        _ => Err(PkiError::NoAgentId),
    }
}

/// Issues an agent certificate (CN = agent id, client auth) into `out/agent.pem` and
/// `out/agent.key`.
pub fn cert_issue(
    ca_dir: &Path,
    agent_id: &str,
    out: &Path,
    lifetime: Duration,
) -> Result<(PathBuf, PathBuf), PkiError> {
    updraft_shared::tls::check_agent_id(agent_id).map_err(PkiError::AgentId)?;
    let issuer = load_issuer(ca_dir)?;
    let key = KeyPair::generate()?;
    let params = agent_params(agent_id, lifetime);
    let cert = params.signed_by(&key, &issuer)?;
    create_dir(out)?;
    let (cert_path, key_path) = (out.join("agent.pem"), out.join("agent.key"));
    write_public(&cert_path, &cert.pem())?;
    write_secret(&key_path, &key.serialize_pem())?;
    Ok((cert_path, key_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_and_agent_certificates_chain() {
        let d = tempfile::tempdir().unwrap();
        let files = ca_init(d.path(), &["localhost".into(), "127.0.0.1".into()]).unwrap();
        assert_eq!(files.fingerprint.len(), 64);
        assert!(ca_init(d.path(), &["localhost".into()])
            .unwrap_err()
            .to_string()
            .contains("refusing"));
        let (cert, _key) =
            cert_issue(d.path(), "board-7", &d.path().join("agent"), AGENT_VALIDITY).unwrap();
        let certs = updraft_shared::tls::load_certs(&cert).unwrap();
        assert_eq!(
            updraft_shared::tls::agent_id_of(&certs[0]).unwrap(),
            "board-7"
        );
        // Both identities build working rustls configs against the same CA.
        let server = updraft_shared::tls::Identity::load(
            &files.ca_cert,
            &files.server_cert,
            &files.server_key,
        )
        .unwrap();
        server.rustls_server().unwrap();
        let agent = updraft_shared::tls::Identity::load(
            &files.ca_cert,
            &cert,
            &d.path().join("agent/agent.key"),
        )
        .unwrap();
        agent.rustls_client().unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&files.ca_key)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "CA key readable by others");
        assert!(cert_issue(d.path(), "bad id", d.path(), AGENT_VALIDITY).is_err());
    }
}
