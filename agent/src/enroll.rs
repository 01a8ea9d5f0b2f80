//! Joining a fleet and staying in it.
//!
//! - [`enroll`]: the key is made here and never leaves the board; a certificate request
//!   and a one-time token go to the daemon over TLS pinned to the CA fingerprint the
//!   operator gave; the certificate that comes back names this agent and lands in
//!   `state_dir` (the `[tls]` paths), where `serve` finds it.
//! - [`renew`]: the same request, without a token, over a live task connection while
//!   the certificate is still valid. Running tasks keep their connection; new
//!   connections use the new certificate.
//! - [`CertFiles`]: the key and certificate are replaced as a pair: a crash in between
//!   is finished on the next start, never left as a key that does not fit.

use crate::config::AgentConfig;
use anyhow::{anyhow, bail, Context};
use rcgen::{CertificateParams, DnType, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};
use updraft_shared::files;
use updraft_shared::protocol::{CertReply, CertRequest, FrameKind};
use updraft_shared::tls::{self, Identity, PinnedCa};
use updraft_shared::wire::{write_frame, FrameReader};

/// How long the daemon may take to answer a certificate request.
const REPLY_TIMEOUT: Duration = Duration::from_secs(15);

/// Where the agent's CA, certificate and key live.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// CA certificate the daemons chain to.
    pub ca: PathBuf,
    /// The agent's certificate.
    pub cert: PathBuf,
    /// The agent's private key.
    pub key: PathBuf,
}

impl CertFiles {
    /// The `[tls]` paths of a config (default: `state_dir/ca.pem agent.pem agent.key`).
    pub fn of(config: &AgentConfig) -> Self {
        Self {
            ca: config.tls_ca.clone(),
            cert: config.tls_cert.clone(),
            key: config.tls_key.clone(),
        }
    }

    /// Finishes a replacement a crash interrupted. The new key is renamed into place
    /// before the new certificate, so a staged certificate means the pair is not done.
    pub fn finish_swap(&self) -> std::io::Result<bool> {
        let (cert_new, key_new) = (
            files::sibling(&self.cert, "new"),
            files::sibling(&self.key, "new"),
        );
        if !cert_new.exists() {
            // A staged key alone is a replacement that never got its certificate.
            let _ = std::fs::remove_file(&key_new);
            return Ok(false);
        }
        if key_new.exists() {
            std::fs::rename(&key_new, &self.key)?;
        }
        std::fs::rename(&cert_new, &self.cert)?;
        files::sync_dir(&self.cert)?;
        Ok(true)
    }

    /// Writes a new key and certificate (and the CA, when given) as one replacement.
    pub fn install(
        &self,
        key_pem: &str,
        cert_pem: &str,
        ca_pem: Option<&str>,
    ) -> std::io::Result<()> {
        for p in [&self.ca, &self.cert, &self.key] {
            if let Some(dir) = p.parent() {
                std::fs::create_dir_all(dir)?;
            }
        }
        if let Some(ca) = ca_pem {
            files::write_atomic(&self.ca, ca.as_bytes(), 0o644)?;
        }
        let (cert_new, key_new) = (
            files::sibling(&self.cert, "new"),
            files::sibling(&self.key, "new"),
        );
        files::write_synced(&key_new, key_pem.as_bytes(), 0o600)?;
        files::write_synced(&cert_new, cert_pem.as_bytes(), 0o644)?;
        files::sync_dir(&cert_new)?;
        self.finish_swap().map(|_| ())
    }

    /// Loads the identity these files make.
    pub fn load(&self) -> Result<Identity, tls::TlsError> {
        Identity::load(&self.ca, &self.cert, &self.key)
    }
}

/// A fresh key and a certificate request for `agent_id`, both PEM.
pub fn new_request(agent_id: &str) -> anyhow::Result<(String, String)> {
    let key = KeyPair::generate().context("cannot generate a key")?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, agent_id);
    let csr = params
        .serialize_request(&key)
        .context("cannot make a certificate request")?
        .pem()?;
    Ok((key.serialize_pem(), csr))
}

/// Checks that a certificate the daemon sent names `agent_id` and carries the public
/// key of `key_pem`, and returns when it expires.
fn check_issued(cert_pem: &str, key_pem: &str, agent_id: &str) -> anyhow::Result<SystemTime> {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| anyhow!("the daemon sent an unreadable certificate: {e}"))?;
    let named = tls::agent_id_of(&der)?;
    if named != agent_id {
        bail!("the daemon's certificate names `{named}`, not `{agent_id}`");
    }
    let key = KeyPair::from_pem(key_pem)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| anyhow!("the daemon sent an unreadable certificate: {e}"))?;
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        bail!("the daemon's certificate is not for the key this agent made");
    }
    Ok(tls::validity_of(&der)?.1)
}

/// Sends one certificate request on a new stream of `conn` and reads the answer.
async fn request_certificate(
    conn: &quinn::Connection,
    request: &CertRequest,
) -> anyhow::Result<(String, String)> {
    let exchange = async {
        let (mut send, recv) = conn.open_bi().await?;
        write_frame(&mut send, &request.to_frame()).await?;
        let _ = send.finish();
        let mut reader = FrameReader::new(recv);
        let frame = reader
            .next()
            .await?
            .ok_or_else(|| anyhow!("the daemon closed the stream without an answer"))?;
        if frame.kind != FrameKind::CertReply {
            bail!(
                "the daemon answered with a {:?} frame; it may be older than this agent",
                frame.kind
            );
        }
        Ok::<_, anyhow::Error>(CertReply::from_frame(&frame)?)
    };
    match tokio::time::timeout(REPLY_TIMEOUT, exchange).await {
        Err(_) => bail!("no answer from the daemon within {REPLY_TIMEOUT:?}"),
        Ok(Err(e)) => Err(e),
        Ok(Ok(CertReply::Issued { cert, ca })) => Ok((cert, ca)),
        Ok(Ok(CertReply::Rejected { code, message })) => bail!("refused ({code}): {message}"),
    }
}

/// This board's agent id: `--agent-id`, else `agent_id` in the config, else the host name.
pub fn agent_id_for(config: &AgentConfig, flag: Option<&str>) -> anyhow::Result<String> {
    let id = match flag.map(str::to_string).or_else(|| config.agent_id.clone()) {
        Some(id) => id,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .context("cannot read the host name; set agent_id in agent.toml or pass --agent-id")?,
    };
    tls::check_agent_id(&id)
        .map_err(|e| anyhow!("{e}; set agent_id in agent.toml or pass --agent-id"))?;
    Ok(id)
}

/// What `enroll` did.
#[derive(Debug)]
pub struct Enrolled {
    /// The agent id the certificate names.
    pub agent_id: String,
    /// When the certificate expires (the agent renews it before then).
    pub not_after: SystemTime,
    /// Where the files went.
    pub files: CertFiles,
}

/// The name to verify in the daemon's certificate: `--server-name`, else the
/// `server_name` of the `[[cloud]]` entry with this address, else the host part.
pub fn server_name_for(
    config: &AgentConfig,
    server: &str,
    flag: Option<&str>,
) -> anyhow::Result<String> {
    if let Some(name) = flag {
        return Ok(name.to_string());
    }
    if let Some(cloud) = config.clouds.iter().find(|c| c.address == server) {
        return Ok(cloud.server_name.clone());
    }
    let (host, _) = server
        .rsplit_once(':')
        .filter(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
        .ok_or_else(|| anyhow!("--server `{server}` is not host:port"))?;
    Ok(host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string())
}

/// Why the handshake with the daemon failed, in the operator's terms.
fn handshake_error(
    pin: &PinnedCa,
    server: &str,
    name: &str,
    ca_sha256: &str,
    e: impl std::fmt::Display,
) -> anyhow::Error {
    if let Some(names) = pin.wrong_name() {
        return anyhow!(
            "the daemon at {server} has the pinned CA, but its certificate does not name `{name}`: it names {}. Pass --server-name with one of those, or set server_name for address \"{server}\" in [[cloud]] of agent.toml; nothing was sent",
            if names.is_empty() { "no host at all".to_string() } else { names.join(", ") }
        );
    }
    let seen = pin.seen();
    if !pin.pin_offered() && !seen.is_empty() {
        return anyhow!(
            "the daemon at {server} is not the one you meant: its CA has fingerprint {} but --ca-sha256 says {}; nothing was sent. Check the fingerprint `updraftd ca init` printed",
            seen.join(" or "),
            ca_sha256
        );
    }
    anyhow!("TLS handshake with {server} (as `{name}`) failed: {e}")
}

/// Enrolls this board with the daemon at `server` (`host:port`), verifying it as
/// `server_name` (see [`server_name_for`]).
pub async fn enroll(
    config: &AgentConfig,
    server: &str,
    server_name: Option<&str>,
    token: &str,
    ca_sha256: &str,
    agent_id: Option<&str>,
    force: bool,
) -> anyhow::Result<Enrolled> {
    let pin = PinnedCa::new(ca_sha256).map_err(|e| anyhow!("--ca-sha256: {e}"))?;
    let agent_id = agent_id_for(config, agent_id)?;
    let files = CertFiles::of(config);
    files.finish_swap().ok();
    if !force {
        if let Ok(certs) = tls::load_certs(&files.cert) {
            if let Ok((_, not_after)) = tls::validity_of(&certs[0]) {
                if not_after > SystemTime::now() {
                    bail!(
                        "{} is already a valid certificate (for `{}`, until {}); pass --force to replace it",
                        files.cert.display(),
                        tls::agent_id_of(&certs[0]).unwrap_or_default(),
                        humantime::format_rfc3339_seconds(not_after)
                    );
                }
            }
        }
    }
    let host = server_name_for(config, server, server_name)?;
    let addr = tokio::net::lookup_host(server)
        .await
        .with_context(|| format!("cannot resolve {server}"))?
        .next()
        .ok_or_else(|| anyhow!("{server} resolves to no address"))?;
    let bind: std::net::SocketAddr = if addr.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    }
    .parse()
    .expect("literal address");
    let endpoint = quinn::Endpoint::client(bind)?;
    let client = quinn::ClientConfig::new(pin.quic_client()?);
    let connecting = endpoint
        .connect_with(client, addr, &host)
        .map_err(|e| anyhow!("cannot connect to {server}: {e}"))?;
    let conn = match tokio::time::timeout(REPLY_TIMEOUT, connecting).await {
        Err(_) => bail!("no answer from {server} within {REPLY_TIMEOUT:?}: is updraftd listening there, and UDP let through?"),
        Ok(Err(e)) => return Err(handshake_error(&pin, server, &host, ca_sha256, e)),
        Ok(Ok(c)) => c,
    };
    let (key_pem, csr) = new_request(&agent_id)?;
    let request = CertRequest {
        token: Some(token.trim().to_string()),
        csr,
    };
    let answer = request_certificate(&conn, &request).await;
    conn.close(0u32.into(), b"enrolled");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    let (cert_pem, ca_pem) =
        answer.map_err(|e| anyhow!("the daemon at {server} did not enroll this agent: {e}"))?;
    let not_after = check_issued(&cert_pem, &key_pem, &agent_id)?;
    // The CA we verified the daemon with, not whatever the reply says.
    let ca = pin
        .matched()
        .ok_or_else(|| anyhow!("internal: handshake verified without a CA"))?;
    let sent_ca = CertificateDer::from_pem_slice(ca_pem.as_bytes()).ok();
    if sent_ca.as_ref() != Some(&ca) {
        bail!("the daemon's reply carries a CA other than the pinned one; not installing");
    }
    files
        .install(&key_pem, &cert_pem, Some(&ca_pem))
        .with_context(|| {
            format!(
                "cannot write the certificate files next to {}",
                files.cert.display()
            )
        })?;
    Ok(Enrolled {
        agent_id,
        not_after,
        files,
    })
}

/// Renews the agent's certificate over `conn` (a live task connection), installs it,
/// and returns the new identity.
pub async fn renew(
    conn: &quinn::Connection,
    files: &CertFiles,
    agent_id: &str,
) -> anyhow::Result<(Identity, SystemTime)> {
    let (key_pem, csr) = new_request(agent_id)?;
    let (cert_pem, _ca) = request_certificate(conn, &CertRequest { token: None, csr }).await?;
    let not_after = check_issued(&cert_pem, &key_pem, agent_id)?;
    files
        .install(&key_pem, &cert_pem, None)
        .with_context(|| format!("cannot write {}", files.cert.display()))?;
    Ok((files.load()?, not_after))
}

/// When to renew a certificate valid from `not_before` to `not_after`: `renew_before`
/// its end (default a third of its lifetime). A certificate that is already due when it
/// arrives (the daemon issues ones shorter than `renew_before`) is renewed at half its
/// remaining time instead, so renewals never spin: `issued` is when this one came.
pub fn renew_at(
    not_before: SystemTime,
    not_after: SystemTime,
    renew_before: Option<Duration>,
    issued: SystemTime,
) -> SystemTime {
    let life = not_after.duration_since(not_before).unwrap_or_default();
    let before = renew_before.unwrap_or(life / 3);
    let at = not_after.checked_sub(before).unwrap_or(not_before);
    if at > issued {
        return at;
    }
    let left = not_after.duration_since(issued).unwrap_or_default();
    issued + left / 2
}

/// The message for an expired certificate: what to run, where.
pub fn expired_message(files: &CertFiles, not_after: SystemTime) -> String {
    format!(
        "the agent certificate {} expired at {}; daemons refuse it and tasks run on the board only. To rejoin: on the daemon host run `updraftd token create`, then here `updraft-agent enroll --server HOST:PORT --token TOKEN --ca-sha256 FINGERPRINT --force` and restart the agent",
        files.cert.display(),
        humantime::format_rfc3339_seconds(not_after)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_time() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let day = Duration::from_secs(86400);
        // Default: a third of the lifetime before the end.
        assert_eq!(renew_at(t0, t0 + 90 * day, None, t0), t0 + 60 * day);
        assert_eq!(
            renew_at(t0, t0 + 90 * day, Some(10 * day), t0),
            t0 + 80 * day
        );
        // Due on arrival: half the time left, never now.
        let now = t0 + day;
        assert_eq!(renew_at(t0, t0 + 3 * day, Some(10 * day), now), now + day);
    }

    #[test]
    fn a_half_done_swap_is_finished() {
        let d = tempfile::tempdir().unwrap();
        let files = CertFiles {
            ca: d.path().join("ca.pem"),
            cert: d.path().join("agent.pem"),
            key: d.path().join("agent.key"),
        };
        std::fs::write(&files.cert, "old cert").unwrap();
        std::fs::write(&files.key, "old key").unwrap();
        // Crash after staging both, before any rename.
        std::fs::write(files::sibling(&files.key, "new"), "new key").unwrap();
        std::fs::write(files::sibling(&files.cert, "new"), "new cert").unwrap();
        assert!(files.finish_swap().unwrap());
        assert_eq!(std::fs::read_to_string(&files.key).unwrap(), "new key");
        assert_eq!(std::fs::read_to_string(&files.cert).unwrap(), "new cert");
        // Crash after the key was staged but before the certificate: the old pair stays.
        std::fs::write(files::sibling(&files.key, "new"), "newer key").unwrap();
        assert!(!files.finish_swap().unwrap());
        assert_eq!(std::fs::read_to_string(&files.key).unwrap(), "new key");
        assert!(!files::sibling(&files.key, "new").exists());
    }

    #[test]
    fn requests_name_the_agent() {
        let (key, csr) = new_request("board-3").unwrap();
        assert!(key.contains("PRIVATE KEY"));
        let parsed = rcgen::CertificateSigningRequestParams::from_pem(&csr).unwrap();
        assert!(matches!(
            parsed.params.distinguished_name.get(&DnType::CommonName),
            Some(rcgen::DnValue::Utf8String(s)) if s == "board-3"
        ));
    }
}
