//! Mutual TLS for QUIC: rustls (ring) client and server configs, and
//! [`AuthenticatedPeer`], the agent identity only a verified handshake can produce.

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Why TLS material could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong, and what to check.
        reason: String,
    },
    /// rustls refused the material (key does not match certificate, bad CA, ...).
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    /// The peer's certificate does not name an agent.
    #[error("peer certificate: {0}")]
    PeerIdentity(String),
    /// The private key is not the one the certificate was made for.
    #[error("{key} does not belong to {cert}: the certificate was made for another key (issue the pair again, or point the key setting at the certificate's own key)")]
    KeyMismatch {
        /// The key file.
        key: PathBuf,
        /// The certificate file.
        cert: PathBuf,
    },
}

/// The crypto provider Updraft uses everywhere: ring, one provider for a small binary.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_err = |reason: String| TlsError::File {
        path: path.to_path_buf(),
        reason,
    };
    let data =
        std::fs::read(path).map_err(|e| file_err(format!("cannot read certificate file: {e}")))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(file_err("no CERTIFICATE block in the file".into()));
    }
    Ok(certs)
}

/// Reads a private key (PKCS#8, PKCS#1 or SEC1) from a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let data = std::fs::read(path).map_err(|e| TlsError::File {
        path: path.to_path_buf(),
        reason: format!("cannot read key file: {e}"),
    })?;
    PrivateKeyDer::from_pem_slice(&data).map_err(|e| TlsError::File {
        path: path.to_path_buf(),
        reason: format!("no usable private key in the file: {e}"),
    })
}

/// SHA-256 of a certificate's DER, lowercase hex: the CA fingerprint agents pin.
pub fn fingerprint(der: &[u8]) -> String {
    crate::files::sha256_hex(der)
}

/// Certificates and key one side presents, plus the CA it trusts.
#[derive(Clone)]
pub struct Identity {
    /// CA certificates that peers must chain to.
    pub ca: Vec<CertificateDer<'static>>,
    /// Our certificate chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// Our private key.
    pub key: Arc<PrivateKeyDer<'static>>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("ca", &self.ca.len())
            .field("chain", &self.chain.len())
            .field("key", &"<secret>")
            .finish()
    }
}

impl Identity {
    /// Loads CA, certificate chain and key from PEM files, and checks that the key is
    /// the certificate's own.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let identity = Self {
            ca: load_certs(ca)?,
            chain: load_certs(cert)?,
            key: Arc::new(load_key(key)?),
        };
        let signer = provider()
            .key_provider
            .load_private_key(identity.key.clone_key())
            .map_err(|e| TlsError::File {
                path: key.to_path_buf(),
                reason: format!("unusable private key: {e}"),
            })?;
        match rustls::sign::CertifiedKey::new(identity.chain.clone(), signer).keys_match() {
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
                Err(TlsError::KeyMismatch {
                    key: key.to_path_buf(),
                    cert: cert.to_path_buf(),
                })
            }
            Err(rustls::Error::InconsistentKeys(_)) | Ok(()) => Ok(identity),
            Err(e) => Err(TlsError::File {
                path: cert.to_path_buf(),
                reason: format!("unusable certificate: {e}"),
            }),
        }
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, TlsError> {
        let mut roots = RootCertStore::empty();
        for c in &self.ca {
            roots.add(c.clone())?;
        }
        Ok(Arc::new(roots))
    }

    /// rustls server config: TLS 1.3, ALPNs `updraft/1` and `updraft-enroll/1`. A
    /// client certificate, when presented, must chain to our CA; only enrollment
    /// connections may come without one, which the daemon checks per connection with
    /// [`AuthenticatedPeer::from_connection`]. The CA certificates travel after our own
    /// chain so that an agent enrolling with only the CA fingerprint can verify us.
    pub fn rustls_server(&self) -> Result<rustls::ServerConfig, TlsError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots()?, provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
        let mut chain = self.chain.clone();
        for ca in &self.ca {
            if !chain.contains(ca) {
                chain.push(ca.clone());
            }
        }
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, self.key.clone_key())?;
        cfg.alpn_protocols = vec![
            updraft_proto::ALPN.to_vec(),
            updraft_proto::ENROLL_ALPN.to_vec(),
        ];
        Ok(cfg)
    }

    /// quinn server crypto built from [`Self::rustls_server`].
    pub fn quic_server(&self) -> Result<Arc<QuicServerConfig>, TlsError> {
        let cfg = self.rustls_server()?;
        Ok(Arc::new(
            QuicServerConfig::try_from(cfg).map_err(|e| TlsError::PeerIdentity(e.to_string()))?,
        ))
    }

    /// rustls client config: TLS 1.3, ALPN `updraft/1`, server verified against our CA,
    /// our certificate presented.
    pub fn rustls_client(&self) -> Result<rustls::ClientConfig, TlsError> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = vec![updraft_proto::ALPN.to_vec()];
        Ok(cfg)
    }

    /// quinn client crypto built from [`Self::rustls_client`].
    pub fn quic_client(&self) -> Result<Arc<QuicClientConfig>, TlsError> {
        let cfg = self.rustls_client()?;
        Ok(Arc::new(
            QuicClientConfig::try_from(cfg).map_err(|e| TlsError::PeerIdentity(e.to_string()))?,
        ))
    }
}

/// The ALPN protocol a connection's handshake settled on.
pub fn alpn_of(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

/// When a certificate starts and stops being valid.
pub fn validity_of(der: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime), TlsError> {
    let (from, until) = parse_certificate(der)?.validity();
    let at = |secs: i64| UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0));
    Ok((at(from), at(until)))
}

fn parse_certificate<'a>(
    der: &'a CertificateDer<'_>,
) -> Result<crate::x509::Certificate<'a>, TlsError> {
    crate::x509::parse(der)
        .map_err(|e| TlsError::PeerIdentity(format!("unparseable certificate: {e}")))
}

/// A CA fingerprint given to pin is not 64 hex digits; holds the text given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a SHA-256 fingerprint (64 hex digits, as `updraftd ca init` prints it)")]
pub struct FingerprintError(pub String);

/// The client side of an enrollment: no certificate of our own yet, and no CA file
/// either — only the SHA-256 of the CA's DER, given by the operator. The daemon sends
/// its CA after its own certificate; a CA with the pinned fingerprint must be among the
/// certificates, and the daemon's certificate must chain to it and name the server
/// (full WebPKI checks, with that CA as the only root). Nothing is sent before that holds.
#[derive(Debug)]
pub struct PinnedCa {
    pin: String,
    /// Fingerprints of the certificates the daemon presented besides its own, for the
    /// error message when none matches.
    seen: std::sync::Mutex<Vec<String>>,
    /// The CA that matched, once the handshake verified.
    matched: std::sync::Mutex<Option<CertificateDer<'static>>>,
    /// The names the daemon's certificate has, when it chained to the pinned CA but did
    /// not name the server we asked for.
    wrong_name: std::sync::Mutex<Option<Vec<String>>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl PinnedCa {
    /// Pins `fingerprint` (64 hex digits; `:` separators and case are ignored).
    pub fn new(fingerprint: &str) -> Result<Arc<Self>, FingerprintError> {
        let pin: String = fingerprint
            .chars()
            .filter(|c| *c != ':')
            .collect::<String>()
            .to_ascii_lowercase();
        if pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(FingerprintError(fingerprint.to_string()));
        }
        Ok(Arc::new(Self {
            pin,
            seen: Default::default(),
            matched: Default::default(),
            wrong_name: Default::default(),
            provider: provider(),
        }))
    }

    /// Fingerprints of the CA certificates the daemon offered.
    pub fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether the daemon offered a CA with the pinned fingerprint.
    pub fn pin_offered(&self) -> bool {
        self.seen().contains(&self.pin)
    }

    /// The names in the daemon's certificate, when it chained to the pinned CA but did
    /// not name the server the connection asked for.
    pub fn wrong_name(&self) -> Option<Vec<String>> {
        self.wrong_name
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The pinned CA certificate, once a handshake verified against it.
    pub fn matched(&self) -> Option<CertificateDer<'static>> {
        self.matched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// quinn client crypto for an enrollment connection: TLS 1.3, ALPN
    /// `updraft-enroll/1`, this verifier, no client certificate.
    pub fn quic_client(self: &Arc<Self>) -> Result<Arc<QuicClientConfig>, TlsError> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(self.clone())
            .with_no_client_auth();
        cfg.alpn_protocols = vec![updraft_proto::ENROLL_ALPN.to_vec()];
        Ok(Arc::new(
            QuicClientConfig::try_from(cfg).map_err(|e| TlsError::PeerIdentity(e.to_string()))?,
        ))
    }
}

impl rustls::client::danger::ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let offered: Vec<String> = intermediates.iter().map(|c| fingerprint(c)).collect();
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = offered.clone();
        let Some(ca) = offered
            .iter()
            .position(|f| *f == self.pin)
            .map(|i| intermediates[i].clone().into_owned())
        else {
            return Err(rustls::Error::General(
                "the daemon's CA does not have the pinned fingerprint".into(),
            ));
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone())?;
        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        let verified = webpki
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .inspect_err(|e| {
                if matches!(
                    e,
                    rustls::Error::InvalidCertificate(
                        rustls::CertificateError::NotValidForName
                            | rustls::CertificateError::NotValidForNameContext { .. }
                    )
                ) {
                    *self.wrong_name.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(names_of(end_entity));
                }
            })?;
        *self.matched.lock().unwrap_or_else(|e| e.into_inner()) = Some(ca);
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// An agent whose certificate chained to our CA during the QUIC handshake.
///
/// Only [`AuthenticatedPeer::from_connection`] builds one, from the certificate the TLS
/// layer verified; the agent id never comes from anything the peer *says*.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthenticatedPeer {
    agent_id: String,
    serial: String,
    not_after: SystemTime,
}

impl AuthenticatedPeer {
    /// The agent id: the common name of the verified client certificate.
    pub fn agent_id(&self) -> &str {
        &self.agent_id
    }

    /// The verified certificate's serial number, lowercase hex.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// When the verified certificate expires.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The identity a leaf certificate names. Only for a certificate whose chain was
    /// verified already (the handshake does that; tests hold one the CA just issued).
    pub fn of_verified_cert(leaf: &CertificateDer<'_>) -> Result<Self, TlsError> {
        Ok(Self {
            agent_id: agent_id_of(leaf)?,
            serial: serial_of(leaf)?,
            not_after: validity_of(leaf)?.1,
        })
    }

    /// Reads the identity from a connection whose handshake completed. quinn only
    /// completes a handshake after our client verifier accepted the chain.
    pub fn from_connection(conn: &quinn::Connection) -> Result<Self, TlsError> {
        let identity = conn
            .peer_identity()
            .ok_or_else(|| TlsError::PeerIdentity("no client certificate presented".into()))?;
        let certs = identity
            .downcast::<Vec<CertificateDer<'static>>>()
            .map_err(|_| TlsError::PeerIdentity("unexpected identity type".into()))?;
        let leaf = certs
            .first()
            .ok_or_else(|| TlsError::PeerIdentity("empty certificate chain".into()))?;
        Self::of_verified_cert(leaf)
    }

    #[cfg(test)]
    pub(crate) fn for_tests(id: &str) -> Self {
        Self {
            agent_id: id.into(),
            serial: String::new(),
            not_after: UNIX_EPOCH,
        }
    }
}

/// Whether `id` may be an agent id: 1..=128 letters, digits, '-', '_', '.'.
pub fn valid_agent_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// An agent id that is not one a certificate may name ([`valid_agent_id`]); holds the
/// id given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("agent id `{0}` must be 1..=128 characters of letters, digits, '-', '_', '.'")]
pub struct AgentIdError(pub String);

/// [`valid_agent_id`], with the message that says what an agent id may be.
pub fn check_agent_id(id: &str) -> Result<(), AgentIdError> {
    if valid_agent_id(id) {
        Ok(())
    } else {
        Err(AgentIdError(id.to_string()))
    }
}

/// The host names and IP addresses a certificate names (subject alternative names).
pub fn names_of(der: &CertificateDer<'_>) -> Vec<String> {
    crate::x509::parse(der)
        .and_then(|c| c.subject_alt_names())
        .map(|names| names.iter().map(ToString::to_string).collect())
        .unwrap_or_default()
}

/// A certificate's serial number: lowercase hex of its bytes.
pub fn serial_of(der: &CertificateDer<'_>) -> Result<String, TlsError> {
    Ok(hex::encode(parse_certificate(der)?.serial()))
}

/// The agent id named by a certificate: its subject common name.
pub fn agent_id_of(der: &CertificateDer<'_>) -> Result<String, TlsError> {
    let cn = parse_certificate(der)?.common_name().ok_or_else(|| {
        TlsError::PeerIdentity("certificate has no common name to use as agent id".into())
    })?;
    if cn.is_empty() || cn.len() > 128 {
        return Err(TlsError::PeerIdentity(
            "agent id in certificate is empty or too long".into(),
        ));
    }
    Ok(cn.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pin_is_64_hex_digits_with_optional_colons() {
        let hex = "ab".repeat(32);
        assert!(PinnedCa::new(&hex).is_ok());
        let colons = hex
            .as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap());
        assert!(PinnedCa::new(&colons.collect::<Vec<_>>().join(":").to_uppercase()).is_ok());
        let e = PinnedCa::new("abc").unwrap_err();
        assert_eq!(e, FingerprintError("abc".into()));
        assert_eq!(
            e.to_string(),
            "`abc` is not a SHA-256 fingerprint (64 hex digits, as `updraftd ca init` prints it)"
        );
    }

    #[test]
    fn agent_ids_are_checked_with_their_rule() {
        assert_eq!(check_agent_id("board-1.lab_2"), Ok(()));
        assert!(check_agent_id(&"a".repeat(129)).is_err());
        assert_eq!(
            check_agent_id("a b").unwrap_err().to_string(),
            "agent id `a b` must be 1..=128 characters of letters, digits, '-', '_', '.'"
        );
    }
}
