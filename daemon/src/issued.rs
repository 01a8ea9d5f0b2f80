//! The certificates this daemon's CA issued, per agent id, and the ones revoked when an
//! id was enrolled again.
//!
//! `state_dir/agents/ID.json` lists the unexpired certificates issued for agent id `ID`
//! (serial and expiry, at most [`KEEP_PER_ID`], newest last), written at enrollment,
//! renewal and `updraftd cert issue --state-dir`. An id with an unexpired certificate is
//! *held*: an unbound token may not enroll it. `state_dir/revoked/SERIAL.json` is the
//! deny list the handshake checks: a re-enrolled id's previous certificates go there and
//! stop working; an entry is dropped once its certificate has expired anyway.
//!
//! Every file is written whole through a rename (crash-safe); the files are bounded by
//! the ids enrolled (each needs a token) times [`KEEP_PER_ID`].

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use updraft_shared::files::write_atomic;

/// Most certificates remembered for one agent id (renewals add one each).
pub(crate) const KEEP_PER_ID: usize = 8;

/// One read-modify-write at a time (enrollments and renewals run concurrently).
static WRITING: Mutex<()> = Mutex::new(());

/// Why an issued-certificate record could not be read or written; logged, and sent
/// (as an `internal` refusal) to an agent whose enrollment it stopped.
#[derive(Debug, thiserror::Error)]
pub enum IssuedError {
    /// The certificate just issued is not PEM.
    #[error("unreadable certificate: {0}")]
    Pem(rustls::pki_types::pem::Error),
    /// The certificate just issued does not parse as X.509.
    #[error("{0}")]
    Certificate(updraft_shared::tls::TlsError),
    /// An agent's record is not the JSON this daemon writes.
    #[error("{} is damaged ({error}); remove it to forget the agent's certificates", .path.display())]
    Damaged {
        /// The record file.
        path: PathBuf,
        /// The JSON parser's complaint.
        error: serde_json::Error,
    },
    /// A file could not be read.
    #[error("cannot read {}: {error}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// A file could not be written.
    #[error("cannot write {}: {error}", .path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// A directory of records could not be made.
    #[error("cannot create {}: {error}", .path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
}

/// A certificate issued for an agent id.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IssuedCert {
    /// Serial number, lowercase hex of its DER bytes.
    pub serial: String,
    /// When it expires, ms since the Unix epoch.
    pub not_after_ms: u64,
    /// When it was issued, ms since the Unix epoch.
    pub issued_ms: u64,
}

impl IssuedCert {
    /// The serial and expiry of a certificate (PEM) just issued at `now`.
    pub fn of_pem(pem: &str, now: SystemTime) -> Result<Self, IssuedError> {
        use rustls::pki_types::pem::PemObject;
        let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
            .map_err(IssuedError::Pem)?;
        let serial = updraft_shared::tls::serial_of(&der).map_err(IssuedError::Certificate)?;
        let (_, not_after) =
            updraft_shared::tls::validity_of(&der).map_err(IssuedError::Certificate)?;
        Ok(Self {
            serial,
            not_after_ms: unix_ms(not_after),
            issued_ms: unix_ms(now),
        })
    }

    /// When it expires.
    pub fn not_after(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.not_after_ms)
    }
}

/// The certificates issued to one agent id, newest last.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct IdRecord {
    certs: Vec<IssuedCert>,
}

impl IdRecord {
    /// The newest certificate still valid at `now_ms`, if any: the id is held.
    pub(crate) fn live(&self, now_ms: u64) -> Option<IssuedCert> {
        self.certs
            .iter()
            .filter(|c| c.not_after_ms > now_ms)
            .max_by_key(|c| c.not_after_ms)
            .cloned()
    }

    /// Whether the certificate with `serial` is in the record.
    pub(crate) fn has(&self, serial: &str) -> bool {
        self.certs.iter().any(|c| c.serial == serial)
    }

    /// Adds `cert`; expired ones and the oldest past [`KEEP_PER_ID`] are dropped.
    pub(crate) fn add(&mut self, cert: IssuedCert, now_ms: u64) {
        self.certs.retain(|c| c.not_after_ms > now_ms);
        self.certs.push(cert);
        let excess = self.certs.len().saturating_sub(KEEP_PER_ID);
        self.certs.drain(..excess);
    }

    /// Makes `cert` the only certificate; returns the unexpired ones it replaces.
    pub(crate) fn replace(&mut self, cert: IssuedCert, now_ms: u64) -> Vec<IssuedCert> {
        let old = std::mem::replace(&mut self.certs, vec![cert]);
        old.into_iter()
            .filter(|c| c.not_after_ms > now_ms)
            .collect()
    }
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Revoked {
    agent_id: String,
    not_after_ms: u64,
    revoked_ms: u64,
    /// Why: [`Revocation::Replaced`] when absent (records written before operators
    /// could revoke).
    #[serde(default)]
    why: Revocation,
}

/// Why a certificate is on the deny list.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Revocation {
    /// Its agent id was enrolled again with a token bound to it.
    #[default]
    Replaced,
    /// An operator revoked the agent (`updraftd agent revoke`).
    Operator,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The issued-certificate records of one state directory.
#[derive(Debug, Clone)]
pub struct Issued {
    agents: PathBuf,
    revoked: PathBuf,
}

impl Issued {
    /// The records in `state_dir`.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            agents: state_dir.join("agents"),
            revoked: state_dir.join("revoked"),
        }
    }

    fn id_path(&self, agent_id: &str) -> PathBuf {
        // Agent ids are letters, digits, '-', '_', '.': no separator, and the suffix
        // keeps "." and ".." from naming directories.
        self.agents.join(format!("{agent_id}.json"))
    }

    fn read(&self, agent_id: &str) -> Result<IdRecord, IssuedError> {
        let path = self.id_path(agent_id);
        match std::fs::read(&path) {
            Ok(data) => {
                serde_json::from_slice(&data).map_err(|error| IssuedError::Damaged { path, error })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(IdRecord::default()),
            Err(error) => Err(IssuedError::Read { path, error }),
        }
    }

    fn write(&self, agent_id: &str, record: &IdRecord) -> Result<(), IssuedError> {
        ensure_dir(&self.agents)?;
        write_json(&self.id_path(agent_id), record)
    }

    /// The newest certificate of `agent_id` still valid at `now`, if any: the id is held.
    pub fn live(&self, agent_id: &str, now: SystemTime) -> Result<Option<IssuedCert>, IssuedError> {
        Ok(self.read(agent_id)?.live(unix_ms(now)))
    }

    /// Adds a certificate issued for `agent_id` (enrollment of a free id, renewal,
    /// `cert issue`); expired ones and the oldest past [`KEEP_PER_ID`] are dropped.
    pub fn record(
        &self,
        agent_id: &str,
        cert: IssuedCert,
        now: SystemTime,
    ) -> Result<(), IssuedError> {
        let _one = WRITING.lock().unwrap_or_else(|e| e.into_inner());
        let mut record = self.read(agent_id)?;
        record.add(cert, unix_ms(now));
        self.write(agent_id, &record)
    }

    /// `agent_id` was enrolled again with a token bound to it: its unexpired
    /// certificates go on the deny list and `cert` becomes its only one. Returns the
    /// revoked ones.
    pub fn replace(
        &self,
        agent_id: &str,
        cert: IssuedCert,
        now: SystemTime,
    ) -> Result<Vec<IssuedCert>, IssuedError> {
        let _one = WRITING.lock().unwrap_or_else(|e| e.into_inner());
        let now_ms = unix_ms(now);
        let mut record = self.read(agent_id).unwrap_or_default();
        let old = record.replace(cert, now_ms);
        self.prune_revoked(now_ms);
        ensure_dir(&self.revoked)?;
        for c in &old {
            let entry = Revoked {
                agent_id: agent_id.into(),
                not_after_ms: c.not_after_ms,
                revoked_ms: now_ms,
                why: Revocation::Replaced,
            };
            write_json(&self.revoked_path(&c.serial), &entry)?;
        }
        self.write(agent_id, &record)?;
        Ok(old)
    }

    /// An operator revoked `agent_id`: every unexpired certificate issued to it, and
    /// `also` (the serials and expiry times of certificates it was seen with, which
    /// another daemon or `cert issue` may have made), go on the deny list. The id stays
    /// held until those certificates expire: only a token bound to it (`updraftd token
    /// create --agent-id ID`) enrolls it again. Returns the serials now denied, each
    /// with its expiry (Unix milliseconds).
    pub fn revoke(
        &self,
        agent_id: &str,
        also: &[(String, u64)],
        now: SystemTime,
    ) -> Result<Vec<(String, u64)>, IssuedError> {
        let _one = WRITING.lock().unwrap_or_else(|e| e.into_inner());
        let now_ms = unix_ms(now);
        let mut serials: Vec<(String, u64)> = self
            .read(agent_id)
            .unwrap_or_default()
            .certs
            .into_iter()
            .map(|c| (c.serial, c.not_after_ms))
            .chain(also.iter().cloned())
            .filter(|(serial, not_after)| {
                *not_after > now_ms
                    && !serial.is_empty()
                    && serial.bytes().all(|b| b.is_ascii_hexdigit())
            })
            .collect();
        serials.sort();
        serials.dedup_by(|a, b| a.0 == b.0);
        self.prune_revoked(now_ms);
        ensure_dir(&self.revoked)?;
        for (serial, not_after_ms) in &serials {
            let entry = Revoked {
                agent_id: agent_id.into(),
                not_after_ms: *not_after_ms,
                revoked_ms: now_ms,
                why: Revocation::Operator,
            };
            write_json(&self.revoked_path(serial), &entry)?;
        }
        Ok(serials)
    }

    /// Puts one certificate of `agent_id` on the deny list (a revocation another
    /// cluster replica made); false when it has expired anyway, or the serial is not
    /// lowercase hex.
    pub fn deny(
        &self,
        agent_id: &str,
        serial: &str,
        not_after_ms: u64,
        why: Revocation,
    ) -> Result<bool, IssuedError> {
        let now_ms = unix_ms(SystemTime::now());
        if not_after_ms <= now_ms
            || serial.is_empty()
            || !serial.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Ok(false);
        }
        let _one = WRITING.lock().unwrap_or_else(|e| e.into_inner());
        ensure_dir(&self.revoked)?;
        let entry = Revoked {
            agent_id: agent_id.into(),
            not_after_ms,
            revoked_ms: now_ms,
            why,
        };
        write_json(&self.revoked_path(serial), &entry)?;
        Ok(true)
    }

    /// Why the certificate with this serial is on the deny list, if it is.
    pub fn revocation(&self, serial: &str) -> Option<Revocation> {
        if !self.is_revoked(serial) {
            return None;
        }
        let data = std::fs::read(self.revoked_path(serial)).ok()?;
        Some(
            serde_json::from_slice::<Revoked>(&data)
                .map(|r| r.why)
                .unwrap_or_default(),
        )
    }

    fn revoked_path(&self, serial: &str) -> PathBuf {
        self.revoked.join(format!("{serial}.json"))
    }

    /// Whether the certificate with this serial was revoked (its id re-enrolled).
    pub fn is_revoked(&self, serial: &str) -> bool {
        serial.bytes().all(|b| b.is_ascii_hexdigit())
            && !serial.is_empty()
            && self.revoked_path(serial).is_file()
    }

    /// Drops deny-list entries of certificates that have expired anyway.
    fn prune_revoked(&self, now_ms: u64) {
        let Ok(entries) = std::fs::read_dir(&self.revoked) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            let expired = std::fs::read(&p)
                .ok()
                .and_then(|d| serde_json::from_slice::<Revoked>(&d).ok())
                .is_some_and(|r| r.not_after_ms <= now_ms);
            if expired {
                let _ = std::fs::remove_file(&p);
            }
        }
    }
}

/// Writes `value` as JSON to `path`, whole through a rename, readable by the owner only.
fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), IssuedError> {
    let json = serde_json::to_vec(value).expect("records always serialize");
    write_atomic(path, &json, 0o600).map_err(|error| IssuedError::Write {
        path: path.to_path_buf(),
        error,
    })
}

fn ensure_dir(dir: &Path) -> Result<(), IssuedError> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|error| IssuedError::CreateDir {
            path: dir.to_path_buf(),
            error,
        })?;
    updraft_shared::files::own_like_directory(dir);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(serial: &str, not_after_s: u64) -> IssuedCert {
        IssuedCert {
            serial: serial.into(),
            not_after_ms: not_after_s * 1000,
            issued_ms: 0,
        }
    }

    #[test]
    fn held_ids_expire_and_replacement_revokes() {
        let d = tempfile::tempdir().unwrap();
        let issued = Issued::new(d.path());
        let at = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
        assert_eq!(issued.live("board-1", at(10)).unwrap(), None);
        issued.record("board-1", cert("aa01", 100), at(10)).unwrap();
        issued.record("board-1", cert("aa02", 200), at(50)).unwrap();
        assert_eq!(
            issued.live("board-1", at(60)).unwrap().unwrap().serial,
            "aa02"
        );
        assert_eq!(
            issued.live("board-1", at(200)).unwrap(),
            None,
            "expired frees the id"
        );
        // Bounded: only the newest KEEP_PER_ID stay.
        for i in 0..20 {
            issued
                .record("board-2", cert(&format!("b{i:03}"), 1000 + i), at(10))
                .unwrap();
        }
        assert_eq!(issued.read("board-2").unwrap().certs.len(), KEEP_PER_ID);
        // Replacement revokes every unexpired certificate of the id.
        let old = issued
            .replace("board-1", cert("cc03", 300), at(60))
            .unwrap();
        assert_eq!(old.len(), 2);
        assert!(issued.is_revoked("aa01") && issued.is_revoked("aa02"));
        assert!(!issued.is_revoked("cc03"));
        assert!(!issued.is_revoked("../agents/board-1"));
        assert_eq!(
            issued.live("board-1", at(60)).unwrap().unwrap().serial,
            "cc03"
        );
        // A later replacement prunes deny-list entries that expired anyway.
        issued
            .replace("board-1", cert("dd04", 400), at(250))
            .unwrap();
        assert!(!issued.is_revoked("aa01") && !issued.is_revoked("aa02"));
        assert!(issued.is_revoked("cc03"));
        // Odd but valid agent ids stay inside the directory.
        issued.record("..", cert("ee05", 100), at(10)).unwrap();
        assert!(d.path().join("agents/...json").is_file());
    }

    #[test]
    fn record_errors_name_the_file_and_what_to_do() {
        let d = tempfile::tempdir().unwrap();
        let issued = Issued::new(d.path());
        std::fs::create_dir_all(d.path().join("agents")).unwrap();
        let record = d.path().join("agents/board-1.json");
        std::fs::write(&record, "{").unwrap();
        let e = issued.live("board-1", UNIX_EPOCH).unwrap_err();
        let IssuedError::Damaged { error, .. } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(
            e.to_string(),
            format!(
                "{} is damaged ({error}); remove it to forget the agent's certificates",
                record.display()
            )
        );
        std::fs::remove_file(&record).unwrap();
        std::fs::create_dir(&record).unwrap();
        let e = issued.live("board-1", UNIX_EPOCH).unwrap_err();
        let IssuedError::Read { error, .. } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(
            e.to_string(),
            format!("cannot read {}: {error}", record.display())
        );
        let e = IssuedCert::of_pem("not a certificate", UNIX_EPOCH).unwrap_err();
        assert!(matches!(e, IssuedError::Pem(_)), "{e:?}");
        assert!(e.to_string().starts_with("unreadable certificate: "), "{e}");
        // A file where the deny list's directory belongs.
        let blocked = tempfile::tempdir().unwrap();
        let revoked = blocked.path().join("revoked");
        std::fs::write(&revoked, "").unwrap();
        let e = Issued::new(blocked.path())
            .replace("board-1", cert("aa01", 100), UNIX_EPOCH)
            .unwrap_err();
        let IssuedError::CreateDir { error, .. } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(
            e.to_string(),
            format!("cannot create {}: {error}", revoked.display())
        );
        let denied = || std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let write = IssuedError::Write {
            path: PathBuf::from("/var/lib/updraft/agents/b.json"),
            error: denied(),
        };
        assert_eq!(
            write.to_string(),
            format!("cannot write /var/lib/updraft/agents/b.json: {}", denied())
        );
    }
}
