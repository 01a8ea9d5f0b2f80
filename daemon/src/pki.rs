//! The daemon's small PKI: `ca init` makes a CA and a server certificate, `cert issue`
//! makes an agent certificate whose common name is the agent id.

use anyhow::{bail, Context};
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

fn write_secret(path: &Path, pem: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(pem.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn write_public(path: &Path, pem: &str) -> anyhow::Result<()> {
    std::fs::write(path, pem).with_context(|| format!("cannot write {}", path.display()))
}

/// Creates `dir/ca.pem ca.key server.pem server.key`. `names` go into the server
/// certificate (DNS names or IP addresses agents will use). Refuses to overwrite an
/// existing CA key: that would orphan every enrolled agent.
pub fn ca_init(dir: &Path, names: &[String]) -> anyhow::Result<CaFiles> {
    if names.is_empty() {
        bail!("give at least one --name: the host name or IP agents use to reach this daemon");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let files = CaFiles {
        ca_cert: dir.join("ca.pem"),
        ca_key: dir.join("ca.key"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        fingerprint: String::new(),
    };
    if files.ca_key.exists() {
        bail!(
            "{} already exists; refusing to replace the CA (every agent trusts it). Remove it first if you really mean to start over",
            files.ca_key.display()
        );
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

    let server_key = KeyPair::generate()?;
    let mut server = CertificateParams::default();
    server
        .distinguished_name
        .push(DnType::CommonName, names[0].clone());
    server.subject_alt_names = names
        .iter()
        .map(|n| match n.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => {
                Ok(SanType::DnsName(n.clone().try_into().with_context(
                    || format!("`{n}` is not a valid host name"),
                )?))
            }
        })
        .collect::<anyhow::Result<_>>()?;
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    validity(&mut server, SERVER_VALIDITY);
    let server_cert = server.signed_by(&server_key, &issuer)?;

    write_public(&files.ca_cert, &ca_cert.pem())?;
    write_secret(&files.ca_key, &issuer.key().serialize_pem())?;
    write_public(&files.server_cert, &server_cert.pem())?;
    write_secret(&files.server_key, &server_key.serialize_pem())?;
    Ok(CaFiles {
        fingerprint: updraft_shared::tls::fingerprint(ca_cert.der()),
        ..files
    })
}

/// Loads the CA from `ca_dir/ca.pem` and `ca_dir/ca.key`.
pub fn load_issuer(ca_dir: &Path) -> anyhow::Result<Issuer<'static, KeyPair>> {
    load_issuer_files(&ca_dir.join("ca.pem"), &ca_dir.join("ca.key")).map_err(|e| {
        e.context(format!(
            "run `updraftd ca init --dir {}` first, or pass --ca-dir",
            ca_dir.display()
        ))
    })
}

/// Loads the CA certificate and its key from two PEM files.
pub fn load_issuer_files(
    cert_path: &Path,
    key_path: &Path,
) -> anyhow::Result<Issuer<'static, KeyPair>> {
    let cert = std::fs::read_to_string(cert_path)
        .with_context(|| format!("cannot read {}", cert_path.display()))?;
    let key = std::fs::read_to_string(key_path)
        .with_context(|| format!("cannot read {}", key_path.display()))?;
    let key = KeyPair::from_pem(&key)
        .with_context(|| format!("{} is not a private key", key_path.display()))?;
    Issuer::from_ca_cert_pem(&cert, key)
        .with_context(|| format!("{} is not a CA certificate", cert_path.display()))
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
pub fn parse_request(csr_pem: &str) -> anyhow::Result<rcgen::CertificateSigningRequestParams> {
    rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| anyhow::anyhow!("not a usable certificate request: {e}"))
}

/// Signs the public key of a parsed request into an agent certificate for `agent_id`.
/// Only the key is taken from the request: subject, usages and lifetime are ours.
/// Returns the certificate, PEM.
pub fn sign_request(
    issuer: &Issuer<'static, KeyPair>,
    mut request: rcgen::CertificateSigningRequestParams,
    agent_id: &str,
    lifetime: Duration,
) -> anyhow::Result<String> {
    updraft_shared::tls::check_agent_id(agent_id).map_err(anyhow::Error::msg)?;
    request.params = agent_params(agent_id, lifetime);
    Ok(request.signed_by(issuer)?.pem())
}

/// The agent id a parsed request asks for: its subject common name.
pub fn requested_agent_id(
    request: &rcgen::CertificateSigningRequestParams,
) -> anyhow::Result<String> {
    match request.params.distinguished_name.get(&DnType::CommonName) {
        Some(rcgen::DnValue::Utf8String(s)) => Ok(s.clone()),
        Some(rcgen::DnValue::PrintableString(s)) => Ok(s.as_str().to_string()),
        _ => bail!("the certificate request names no agent id (common name, UTF-8)"),
    }
}

/// Issues an agent certificate (CN = agent id, client auth) into `out/agent.pem` and
/// `out/agent.key`.
pub fn cert_issue(
    ca_dir: &Path,
    agent_id: &str,
    out: &Path,
    lifetime: Duration,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    updraft_shared::tls::check_agent_id(agent_id).map_err(anyhow::Error::msg)?;
    let issuer = load_issuer(ca_dir)?;
    let key = KeyPair::generate()?;
    let params = agent_params(agent_id, lifetime);
    let cert = params.signed_by(&key, &issuer)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
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
