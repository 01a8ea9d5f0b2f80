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
use rcgen::{CertificateParams, DnType, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};
use updraft_proto::{CertReply, CertRequest, ErrorCode, FrameKind};
use updraft_shared::files;
use updraft_shared::tls::{self, Identity, PinnedCa, TlsError};
use updraft_shared::wire::{write_frame, FrameReader, WireError};

/// How long the daemon may take to answer the handshake, and then a certificate
/// request: it signs one certificate, which takes milliseconds, so this covers a slow
/// or lossy link with room for QUIC's retransmissions, yet an operator who typed a
/// wrong address hears so within a quarter minute.
const REPLY_TIMEOUT: Duration = Duration::from_secs(15);

/// How long `enroll` waits, after closing its connection, for the daemon to take the
/// close: long enough for one round trip on a slow link, short enough that a daemon
/// that has gone away does not hold up the command.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// An error and its causes, each after `: `, the way operators and tests have always
/// read them.
struct Causes<'a>(&'a dyn std::error::Error);

impl std::fmt::Display for Causes<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(e) = cause {
            write!(f, ": {e}")?;
            cause = e.source();
        }
        Ok(())
    }
}

/// Why a certificate request on a daemon connection brought no certificate.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RequestError {
    /// The connection would not open a stream.
    #[error(transparent)]
    Connection(#[from] quinn::ConnectionError),
    /// The request could not be sent.
    #[error(transparent)]
    Send(#[from] quinn::WriteError),
    /// The answer could not be read.
    #[error(transparent)]
    Receive(#[from] WireError),
    /// The daemon closed the stream without an answer.
    #[error("the daemon closed the stream without an answer")]
    NoAnswer,
    /// The daemon answered with a frame of another kind: it may predate enrollment.
    #[error("the daemon answered with a {0:?} frame; it may be older than this agent")]
    UnexpectedFrame(FrameKind),
    /// The daemon's answer is not a valid certificate reply: the peer misbehaved.
    #[error(transparent)]
    Malformed(#[from] updraft_proto::DecodeError),
    /// No answer within [`REPLY_TIMEOUT`].
    #[error("no answer from the daemon within {REPLY_TIMEOUT:?}")]
    TimedOut,
    /// The daemon refused to issue a certificate.
    #[error("refused ({code}): {message}")]
    Refused {
        /// Its machine-readable reason.
        code: ErrorCode,
        /// Its operator-readable reason.
        message: String,
    },
}

/// Why enrolling or renewing failed.
///
/// Each message is the operator's whole explanation, causes included (as `cause: its
/// cause`), so `source()` is left empty: a report that walks the chain would say the
/// cause twice.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EnrollError {
    /// `--ca-sha256` is not a SHA-256 fingerprint.
    #[error("--ca-sha256: {0}")]
    Fingerprint(tls::FingerprintError),
    /// No agent id was given and the host name could not be read.
    #[error("cannot read the host name; set agent_id in agent.toml or pass --agent-id: {}", Causes(.0))]
    HostName(std::io::Error),
    /// The agent id is not one a certificate may name.
    #[error("{0}; set agent_id in agent.toml or pass --agent-id")]
    AgentId(tls::AgentIdError),
    /// A certificate still valid is installed and `--force` was not given.
    #[error(
        "{} is already a valid certificate (for `{agent_id}`, until {}); pass --force to replace it",
        .path.display(),
        rfc3339(.not_after)
    )]
    AlreadyEnrolled {
        /// The certificate file.
        path: PathBuf,
        /// The agent id it names.
        agent_id: String,
        /// When it expires.
        not_after: SystemTime,
    },
    /// `--server` is not `host:port` (and no `--server-name` says what to verify).
    #[error("--server `{0}` is not host:port")]
    ServerAddress(String),
    /// The daemon's address did not resolve.
    #[error("cannot resolve {server}: {}", Causes(.error))]
    Resolve {
        /// `--server`.
        server: String,
        /// The resolver's error.
        error: std::io::Error,
    },
    /// The daemon's name resolved to nothing.
    #[error("{0} resolves to no address")]
    NoAddress(String),
    /// The local UDP socket could not be opened.
    #[error("{}", Causes(.0))]
    Socket(std::io::Error),
    /// TLS material could not be loaded or used (the pinned client config, the
    /// issued certificate, the renewed identity).
    #[error("{}", Causes(.0))]
    Tls(TlsError),
    /// quinn refused to start the connection.
    #[error("cannot connect to {server}: {error}")]
    Connect {
        /// `--server`.
        server: String,
        /// quinn's reason.
        error: quinn::ConnectError,
    },
    /// The handshake got no answer within [`REPLY_TIMEOUT`].
    #[error("no answer from {0} within {REPLY_TIMEOUT:?}: is updraftd listening there, and UDP let through?")]
    Unreachable(String),
    /// The daemon has the pinned CA but its certificate does not name the host we
    /// verified it as; nothing was sent.
    #[error(
        "the daemon at {server} has the pinned CA, but its certificate does not name `{name}`: it names {}. Pass --server-name with one of those, or set server_name for address \"{server}\" in [[cloud]] of agent.toml; nothing was sent",
        names_or_none(.names)
    )]
    WrongName {
        /// `--server`.
        server: String,
        /// The name it was verified as.
        name: String,
        /// The names its certificate carries.
        names: Vec<String>,
    },
    /// The daemon's CA is not the pinned one: a wrong address, or someone else's
    /// daemon; nothing was sent.
    #[error(
        "the daemon at {server} is not the one you meant: its CA has fingerprint {} but --ca-sha256 says {pinned}; nothing was sent. Check the fingerprint `updraftd ca init` printed",
        .seen.join(" or ")
    )]
    WrongCa {
        /// `--server`.
        server: String,
        /// The fingerprints the daemon offered.
        seen: Vec<String>,
        /// `--ca-sha256` as given.
        pinned: String,
    },
    /// The TLS handshake failed for another reason.
    #[error("TLS handshake with {server} (as `{name}`) failed: {error}")]
    Handshake {
        /// `--server`.
        server: String,
        /// The name it was verified as.
        name: String,
        /// quinn's reason.
        error: quinn::ConnectionError,
    },
    /// A key could not be generated.
    #[error("cannot generate a key: {}", Causes(.0))]
    KeyGen(rcgen::Error),
    /// The certificate request could not be made.
    #[error("cannot make a certificate request: {}", Causes(.0))]
    Csr(rcgen::Error),
    /// A key or request could not be written or read as PEM.
    #[error("{}", Causes(.0))]
    Pem(rcgen::Error),
    /// The daemon did not enroll this agent (`enroll`).
    #[error("the daemon at {server} did not enroll this agent: {error}")]
    NotEnrolled {
        /// `--server`.
        server: String,
        /// Why.
        error: RequestError,
    },
    /// The daemon did not renew the certificate (`renew`).
    #[error("{}", Causes(.0))]
    NotRenewed(RequestError),
    /// The certificate the daemon sent is not PEM.
    #[error("the daemon sent an unreadable certificate: {0}")]
    CertificatePem(rustls::pki_types::pem::Error),
    /// The certificate the daemon sent is not X.509.
    #[error("the daemon sent an unreadable certificate: {0}")]
    CertificateDer(updraft_shared::x509::X509Error),
    /// The daemon's certificate names another agent: the peer misbehaved.
    #[error("the daemon's certificate names `{named}`, not `{agent_id}`")]
    WrongAgent {
        /// The id the certificate names.
        named: String,
        /// The id this agent asked for.
        agent_id: String,
    },
    /// The daemon's certificate is for another key: the peer misbehaved.
    #[error("the daemon's certificate is not for the key this agent made")]
    WrongKey,
    /// The handshake passed, yet the pin recorded no CA: a bug of ours.
    #[error("internal: handshake verified without a CA")]
    NoPinnedCa,
    /// The reply's CA is not the one the daemon was verified with; nothing installed.
    #[error("the daemon's reply carries a CA other than the pinned one; not installing")]
    CaMismatch,
    /// The enrolled files could not be written.
    #[error("cannot write the certificate files next to {}: {}", .path.display(), Causes(.error))]
    Install {
        /// The certificate file.
        path: PathBuf,
        /// The file system's error.
        error: std::io::Error,
    },
    /// The renewed files could not be written.
    #[error("cannot write {}: {}", .path.display(), Causes(.error))]
    InstallRenewed {
        /// The certificate file.
        path: PathBuf,
        /// The file system's error.
        error: std::io::Error,
    },
}

/// A time as the operator reads it in a message.
fn rfc3339(t: &SystemTime) -> humantime::Rfc3339Timestamp {
    humantime::format_rfc3339_seconds(*t)
}

/// The names a certificate carries, for a message.
fn names_or_none(names: &[String]) -> String {
    if names.is_empty() {
        "no host at all".to_string()
    } else {
        names.join(", ")
    }
}

impl From<TlsError> for EnrollError {
    fn from(e: TlsError) -> Self {
        Self::Tls(e)
    }
}

/// Where the agent's CA, certificate and key live.
#[derive(Debug, Clone)]
pub(crate) struct CertFiles {
    /// CA certificate the daemons chain to.
    pub ca: PathBuf,
    /// The agent's certificate.
    pub cert: PathBuf,
    /// The agent's private key.
    pub key: PathBuf,
}

impl CertFiles {
    /// The `[tls]` paths of a config (default: `state_dir/ca.pem agent.pem agent.key`).
    pub(crate) fn of(config: &AgentConfig) -> Self {
        Self {
            ca: config.tls_ca.clone(),
            cert: config.tls_cert.clone(),
            key: config.tls_key.clone(),
        }
    }

    /// Finishes a replacement a crash interrupted. The new key is renamed into place
    /// before the new certificate, so a staged certificate means the pair is not done.
    pub(crate) fn finish_swap(&self) -> std::io::Result<bool> {
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
    pub(crate) fn install(
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
    pub(crate) fn load(&self) -> Result<Identity, tls::TlsError> {
        Identity::load(&self.ca, &self.cert, &self.key)
    }
}

/// A fresh key and a certificate request for `agent_id`, both PEM.
pub(crate) fn new_request(agent_id: &str) -> Result<(String, String), EnrollError> {
    let key = KeyPair::generate().map_err(EnrollError::KeyGen)?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, agent_id);
    let csr = params
        .serialize_request(&key)
        .map_err(EnrollError::Csr)?
        .pem()
        .map_err(EnrollError::Pem)?;
    Ok((key.serialize_pem(), csr))
}

/// Checks that a certificate the daemon sent names `agent_id` and carries the public
/// key of `key_pem`, and returns when it expires.
fn check_issued(cert_pem: &str, key_pem: &str, agent_id: &str) -> Result<SystemTime, EnrollError> {
    let der =
        CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(EnrollError::CertificatePem)?;
    let named = tls::agent_id_of(&der)?;
    if named != agent_id {
        return Err(EnrollError::WrongAgent {
            named,
            agent_id: agent_id.to_string(),
        });
    }
    let key = KeyPair::from_pem(key_pem).map_err(EnrollError::Pem)?;
    let cert = updraft_shared::x509::parse(&der).map_err(EnrollError::CertificateDer)?;
    if cert.public_key() != key.public_key_raw() {
        return Err(EnrollError::WrongKey);
    }
    Ok(tls::validity_of(&der)?.1)
}

/// Sends one certificate request on a new stream of `conn` and reads the answer.
async fn request_certificate(
    conn: &quinn::Connection,
    request: &CertRequest,
) -> Result<(String, String), RequestError> {
    let exchange = async {
        let (mut send, recv) = conn.open_bi().await?;
        write_frame(&mut send, &request.to_frame()).await?;
        let _ = send.finish();
        let mut reader = FrameReader::new(recv);
        let frame = reader.next().await?.ok_or(RequestError::NoAnswer)?;
        if frame.kind != FrameKind::CertReply {
            return Err(RequestError::UnexpectedFrame(frame.kind));
        }
        Ok(CertReply::from_frame(&frame)?)
    };
    match tokio::time::timeout(REPLY_TIMEOUT, exchange).await {
        Err(_) => Err(RequestError::TimedOut),
        Ok(Err(e)) => Err(e),
        Ok(Ok(CertReply::Issued { cert, ca })) => Ok((cert, ca)),
        Ok(Ok(CertReply::Rejected { code, message })) => {
            Err(RequestError::Refused { code, message })
        }
    }
}

/// This board's agent id: `--agent-id`, else `agent_id` in the config, else the host
/// name, made unique with the machine id when it is a name boards ship with (see
/// [`id_of_host`]).
pub(crate) fn agent_id_for(
    config: &AgentConfig,
    flag: Option<&str>,
) -> Result<String, EnrollError> {
    let id = match flag.map(str::to_string).or_else(|| config.agent_id.clone()) {
        Some(id) => id,
        None => {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map_err(EnrollError::HostName)?;
            let machine_id = std::fs::read_to_string(MACHINE_ID).ok();
            id_of_host(host.trim(), machine_id.as_deref())
        }
    };
    tls::check_agent_id(&id).map_err(EnrollError::AgentId)?;
    Ok(id)
}

/// The machine id systemd gives every installation (stable across reboots, unique per
/// installed image once first-booted).
const MACHINE_ID: &str = "/etc/machine-id";

/// Host names images ship with: a fleet of boards all answers to them, so none of them
/// can be an agent id alone.
const DEFAULT_HOST_NAMES: &[&str] = &[
    "raspberrypi",
    "raspberry",
    "localhost",
    "localhost.localdomain",
    "debian",
    "ubuntu",
    "dietpi",
    "armbian",
    "orangepi",
    "rockpi",
    "beaglebone",
    "jetson",
    "nvidia-desktop",
    "pi",
];

/// The agent id a board with host name `host` and machine id `machine_id` takes: the
/// host name, or for a host name boards ship with (`raspberrypi`, `localhost`, `debian`,
/// `ubuntu`, ...) `HOST-` and the first 12 hex digits of the machine id, e.g.
/// `raspberrypi-3f2a9c1e4b7d`. Without a readable machine id it stays the host name.
pub(crate) fn id_of_host(host: &str, machine_id: Option<&str>) -> String {
    let host = host.trim();
    let shipped = DEFAULT_HOST_NAMES
        .iter()
        .any(|d| d.eq_ignore_ascii_case(host));
    let mid = machine_id
        .map(str::trim)
        .filter(|m| m.len() >= 12 && m.bytes().all(|b| b.is_ascii_hexdigit()));
    match mid {
        Some(m) if shipped => format!("{host}-{}", m[..12].to_ascii_lowercase()),
        _ => host.to_string(),
    }
}

/// What `enroll` did.
#[derive(Debug)]
pub(crate) struct Enrolled {
    /// The agent id the certificate names.
    pub agent_id: String,
    /// When the certificate expires (the agent renews it before then).
    pub not_after: SystemTime,
    /// Where the files went.
    pub files: CertFiles,
}

/// The name to verify in the daemon's certificate: `--server-name`, else the
/// `server_name` of the `[[cloud]]` entry with this address, else the host part.
pub(crate) fn server_name_for(
    config: &AgentConfig,
    server: &str,
    flag: Option<&str>,
) -> Result<String, EnrollError> {
    if let Some(name) = flag {
        return Ok(name.to_string());
    }
    if let Some(cloud) = config.clouds.iter().find(|c| c.address == server) {
        return Ok(cloud.server_name.clone());
    }
    let (host, _) = server
        .rsplit_once(':')
        .filter(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
        .ok_or_else(|| EnrollError::ServerAddress(server.to_string()))?;
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
    error: quinn::ConnectionError,
) -> EnrollError {
    if let Some(names) = pin.wrong_name() {
        return EnrollError::WrongName {
            server: server.to_string(),
            name: name.to_string(),
            names,
        };
    }
    let seen = pin.seen();
    if !pin.pin_offered() && !seen.is_empty() {
        return EnrollError::WrongCa {
            server: server.to_string(),
            seen,
            pinned: ca_sha256.to_string(),
        };
    }
    EnrollError::Handshake {
        server: server.to_string(),
        name: name.to_string(),
        error,
    }
}

/// Enrolls this board with the daemon at `server` (`host:port`), verifying it as
/// `server_name` (see [`server_name_for`]).
pub(crate) async fn enroll(
    config: &AgentConfig,
    server: &str,
    server_name: Option<&str>,
    token: &str,
    ca_sha256: &str,
    agent_id: Option<&str>,
    force: bool,
) -> Result<Enrolled, EnrollError> {
    let pin = PinnedCa::new(ca_sha256).map_err(EnrollError::Fingerprint)?;
    let agent_id = agent_id_for(config, agent_id)?;
    let files = CertFiles::of(config);
    files.finish_swap().ok();
    if !force {
        refuse_to_replace(&files)?;
    }
    let host = server_name_for(config, server, server_name)?;
    let (endpoint, conn) = connect_pinned(&pin, server, &host, ca_sha256).await?;
    let (key_pem, csr) = new_request(&agent_id)?;
    let request = CertRequest {
        token: Some(token.trim().to_string()),
        csr,
    };
    let answer = request_certificate(&conn, &request).await;
    conn.close(0u32.into(), b"enrolled");
    let _ = tokio::time::timeout(CLOSE_GRACE, endpoint.wait_idle()).await;
    let (cert_pem, ca_pem) = answer.map_err(|error| EnrollError::NotEnrolled {
        server: server.to_string(),
        error,
    })?;
    let not_after = check_issued(&cert_pem, &key_pem, &agent_id)?;
    // The CA we verified the daemon with, not whatever the reply says.
    let ca = pin.matched().ok_or(EnrollError::NoPinnedCa)?;
    let sent_ca = CertificateDer::from_pem_slice(ca_pem.as_bytes()).ok();
    if sent_ca.as_ref() != Some(&ca) {
        return Err(EnrollError::CaMismatch);
    }
    files
        .install(&key_pem, &cert_pem, Some(&ca_pem))
        .map_err(|error| EnrollError::Install {
            path: files.cert.clone(),
            error,
        })?;
    Ok(Enrolled {
        agent_id,
        not_after,
        files,
    })
}

/// `Err` when `files` already hold a certificate that is still valid: replacing it
/// takes `--force`.
fn refuse_to_replace(files: &CertFiles) -> Result<(), EnrollError> {
    let Ok(certs) = tls::load_certs(&files.cert) else {
        return Ok(());
    };
    match tls::validity_of(&certs[0]) {
        Ok((_, not_after)) if not_after > SystemTime::now() => Err(EnrollError::AlreadyEnrolled {
            path: files.cert.clone(),
            agent_id: tls::agent_id_of(&certs[0]).unwrap_or_default(),
            not_after,
        }),
        _ => Ok(()),
    }
}

/// Connects to the daemon at `server` as `host`, trusting only the CA `pin` names.
/// The endpoint comes back too: the caller waits on it for the close to be sent.
async fn connect_pinned(
    pin: &std::sync::Arc<PinnedCa>,
    server: &str,
    host: &str,
    ca_sha256: &str,
) -> Result<(quinn::Endpoint, quinn::Connection), EnrollError> {
    let addr = tokio::net::lookup_host(server)
        .await
        .map_err(|error| EnrollError::Resolve {
            server: server.to_string(),
            error,
        })?
        .next()
        .ok_or_else(|| EnrollError::NoAddress(server.to_string()))?;
    let bind: std::net::SocketAddr = if addr.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    }
    .parse()
    .expect("literal address");
    let endpoint = quinn::Endpoint::client(bind).map_err(EnrollError::Socket)?;
    let client = quinn::ClientConfig::new(pin.quic_client()?);
    let connecting =
        endpoint
            .connect_with(client, addr, host)
            .map_err(|error| EnrollError::Connect {
                server: server.to_string(),
                error,
            })?;
    match tokio::time::timeout(REPLY_TIMEOUT, connecting).await {
        Err(_) => Err(EnrollError::Unreachable(server.to_string())),
        Ok(Err(e)) => Err(handshake_error(pin, server, host, ca_sha256, e)),
        Ok(Ok(conn)) => Ok((endpoint, conn)),
    }
}

/// Renews the agent's certificate over `conn` (a live task connection), installs it,
/// and returns the new identity.
pub(crate) async fn renew(
    conn: &quinn::Connection,
    files: &CertFiles,
    agent_id: &str,
) -> Result<(Identity, SystemTime), EnrollError> {
    let (key_pem, csr) = new_request(agent_id)?;
    let (cert_pem, _ca) = request_certificate(conn, &CertRequest { token: None, csr })
        .await
        .map_err(EnrollError::NotRenewed)?;
    let not_after = check_issued(&cert_pem, &key_pem, agent_id)?;
    files
        .install(&key_pem, &cert_pem, None)
        .map_err(|error| EnrollError::InstallRenewed {
            path: files.cert.clone(),
            error,
        })?;
    Ok((files.load()?, not_after))
}

/// When to renew a certificate valid from `not_before` to `not_after`: `renew_before`
/// its end (default a third of its lifetime). A certificate that is already due when it
/// arrives (the daemon issues ones shorter than `renew_before`) is renewed at half its
/// remaining time instead, so renewals never spin: `issued` is when this one came.
pub(crate) fn renew_at(
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
pub(crate) fn expired_message(files: &CertFiles, not_after: SystemTime) -> String {
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
    fn messages_read_as_operators_have_always_read_them() {
        use updraft_proto::DecodeError;
        let wire = || WireError::PeerMisbehaved(DecodeError::UnknownKind(9));
        // A renewal's failure is told with all its causes.
        assert_eq!(
            EnrollError::NotRenewed(RequestError::Receive(wire())).to_string(),
            "peer misbehaved: unknown frame kind 9: unknown frame kind 9"
        );
        // Enrolling names the daemon and tells the request's failure without its causes.
        assert_eq!(
            EnrollError::NotEnrolled {
                server: "cloud:4433".into(),
                error: RequestError::Receive(wire()),
            }
            .to_string(),
            "the daemon at cloud:4433 did not enroll this agent: peer misbehaved: unknown frame kind 9"
        );
        let io = || std::io::Error::new(std::io::ErrorKind::PermissionDenied, "no way");
        assert_eq!(
            EnrollError::Install {
                path: "/s/agent.pem".into(),
                error: io(),
            }
            .to_string(),
            "cannot write the certificate files next to /s/agent.pem: no way"
        );
        assert_eq!(
            EnrollError::Resolve {
                server: "nowhere:1".into(),
                error: io(),
            }
            .to_string(),
            "cannot resolve nowhere:1: no way"
        );
        assert_eq!(
            EnrollError::WrongName {
                server: "10.0.0.2:4433".into(),
                name: "10.0.0.2".into(),
                names: vec![],
            }
            .to_string(),
            "the daemon at 10.0.0.2:4433 has the pinned CA, but its certificate does not name `10.0.0.2`: it names no host at all. Pass --server-name with one of those, or set server_name for address \"10.0.0.2:4433\" in [[cloud]] of agent.toml; nothing was sent"
        );
        // Nothing is said twice when the error is reported with its chain.
        let e = anyhow::Error::from(EnrollError::NotRenewed(RequestError::TimedOut));
        assert_eq!(format!("{e:#}"), "no answer from the daemon within 15s");
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

    #[test]
    fn a_shipped_host_name_is_made_unique_by_the_machine_id() {
        let mid = "3F2A9C1E4B7D4E0A9C1E4B7D4E0A9C1E\n";
        assert_eq!(
            id_of_host("raspberrypi", Some(mid)),
            "raspberrypi-3f2a9c1e4b7d"
        );
        assert_eq!(id_of_host("Ubuntu\n", Some(mid)), "Ubuntu-3f2a9c1e4b7d");
        assert_eq!(id_of_host("greenhouse-7", Some(mid)), "greenhouse-7");
        // No machine id (or a damaged one): the host name, as before.
        assert_eq!(id_of_host("raspberrypi", None), "raspberrypi");
        assert_eq!(id_of_host("raspberrypi", Some("not-hex")), "raspberrypi");
        // What comes out is a valid agent id.
        tls::check_agent_id(&id_of_host("localhost.localdomain", Some(mid))).unwrap();
    }
}
