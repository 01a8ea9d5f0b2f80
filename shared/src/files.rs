//! Writing the small files the services keep (certificates, keys, tokens) so that a
//! crash or power cut leaves either the old file or the new one, never half of one.
//!
//! Commands that write them (`updraftd token create`, `updraft-agent enroll`) usually
//! run as root, while the services run as their own user: a file written as root into
//! a directory the service owns is handed to the directory's owner, so the service can
//! read its own key.

use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Writes `data` to `path` with permission `mode`, flushed to disk, owned like its
/// directory. Replaces an existing file in place; see [`write_atomic`] for a rename.
pub fn write_synced(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()?;
    own_like_directory(path);
    Ok(())
}

/// Writes `data` to `path` through `path.tmp` and a rename, then flushes the directory.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let tmp = sibling(path, "tmp");
    write_synced(&tmp, data, mode)?;
    std::fs::rename(&tmp, path)?;
    sync_dir(path)
}

/// `path` with `.suffix` appended to its file name.
pub fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".");
    name.push(suffix);
    path.with_file_name(name)
}

/// Flushes the directory holding `path`, so a rename into it survives a power cut.
pub fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

/// Gives `path` the owner and group of its directory when they differ (only root may;
/// for anyone else this is a no-op or refused, and either way harmless).
pub fn own_like_directory(path: &Path) {
    let Some(dir) = path.parent() else { return };
    let (Ok(d), Ok(f)) = (std::fs::metadata(dir), std::fs::metadata(path)) else {
        return;
    };
    if (d.uid(), d.gid()) != (f.uid(), f.gid()) {
        let _ = std::os::unix::fs::chown(path, Some(d.uid()), Some(d.gid()));
    }
}

/// SHA-256 of `data`, 64 lowercase hex digits: how files and certificates are named
/// by content (a policy's hash, a CA's fingerprint).
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn atomic_write_replaces_and_keeps_mode() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("agent.key");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(!sibling(&p, "tmp").exists());
        assert_eq!(sibling(&p, "new"), d.path().join("agent.key.new"));
    }
}
