//! A spool for task output (and detached input): memory up to a limit, then an
//! unnamed temporary file in `state_dir`, so a 64 MiB result costs the agent no more
//! than the limit in RAM. The file disappears when the spool is dropped.

use bytes::Bytes;
use std::io;
use std::path::PathBuf;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use updraft_shared::exec::{Input, Output};

/// Bytes written so far, in memory or on disk.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    memory_limit: usize,
    mem: Vec<Bytes>,
    mem_len: usize,
    file: Option<(tempfile::TempPath, tokio::fs::File)>,
    len: u64,
    disk_full: bool,
}

/// Linux's `ENOSPC` (no space left on device) and `EDQUOT` (disk quota exceeded).
const ENOSPC: i32 = 28;
const EDQUOT: i32 = 122;

/// True when `e` says the filesystem (or the user's quota on it) is full.
pub(crate) fn is_disk_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(ENOSPC | EDQUOT))
}

impl Spool {
    /// An empty spool that spills into `dir` past `memory_limit` bytes.
    pub fn new(dir: PathBuf, memory_limit: usize) -> Self {
        Self {
            dir,
            memory_limit,
            mem: Vec::new(),
            mem_len: 0,
            file: None,
            len: 0,
            disk_full: false,
        }
    }

    /// True once a write or flush failed because the filesystem under `dir` is full.
    pub fn disk_full(&self) -> bool {
        self.disk_full
    }

    fn note<T>(&mut self, r: io::Result<T>) -> io::Result<T> {
        if r.as_ref().is_err_and(is_disk_full) {
            self.disk_full = true;
        }
        r
    }

    /// Total bytes spooled.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Everything spooled, when it is all in memory (it never spilled to the file).
    pub fn in_memory(&self) -> Option<&[Bytes]> {
        self.file.is_none().then_some(self.mem.as_slice())
    }

    /// True when nothing was spooled.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Makes everything written so far visible to readers.
    pub async fn flush(&mut self) -> io::Result<()> {
        let r = match self.file.as_mut() {
            Some((_, f)) => f.flush().await,
            None => Ok(()),
        };
        self.note(r)
    }

    /// A reader from the start; the spool can be read any number of times.
    /// Call [`Spool::flush`] after the last write first.
    pub async fn reader(&self) -> io::Result<SpoolReader> {
        let file = match &self.file {
            Some((path, _)) => Some(tokio::fs::File::open(path).await?),
            None => None,
        };
        Ok(SpoolReader {
            mem: self.mem.clone().into_iter(),
            file,
        })
    }
}

impl Output for Spool {
    async fn write(&mut self, chunk: Bytes) -> io::Result<()> {
        let r = self.write_chunk(chunk).await;
        self.note(r)
    }
}

impl Spool {
    async fn write_chunk(&mut self, chunk: Bytes) -> io::Result<()> {
        self.len += chunk.len() as u64;
        if self.file.is_none() && self.mem_len + chunk.len() <= self.memory_limit {
            self.mem_len += chunk.len();
            self.mem.push(chunk);
            return Ok(());
        }
        if self.file.is_none() {
            std::fs::create_dir_all(&self.dir)?;
            let named = tempfile::Builder::new()
                .prefix("spool-")
                .tempfile_in(&self.dir)
                .map_err(|e| {
                    if is_disk_full(&e) {
                        self.disk_full = true;
                    }
                    io::Error::new(
                        e.kind(),
                        format!("cannot spool output in {}: {e}", self.dir.display()),
                    )
                })?;
            let (f, path) = named.into_parts();
            // Memory already held stays in memory and is read first; only the rest spills.
            self.file = Some((path, tokio::fs::File::from_std(f)));
        }
        let (_, f) = self.file.as_mut().expect("file exists");
        f.write_all(&chunk).await
    }
}

impl Spool {
    /// A blocking reader over everything written (call [`Spool::flush`] first), for
    /// copying a spool into the journal from a blocking thread. It keeps the spool, and
    /// so its file, alive.
    pub fn into_blocking_reader(self) -> io::Result<BlockingSpoolReader> {
        let file = match &self.file {
            Some((path, _)) => Some(std::fs::File::open(path)?),
            None => None,
        };
        Ok(BlockingSpoolReader {
            mem: self.mem.clone().into_iter(),
            current: Bytes::new(),
            file,
            _spool: self,
        })
    }
}

/// See [`Spool::into_blocking_reader`].
#[derive(Debug)]
pub struct BlockingSpoolReader {
    mem: std::vec::IntoIter<Bytes>,
    current: Bytes,
    file: Option<std::fs::File>,
    _spool: Spool,
}

impl std::io::Read for BlockingSpoolReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.mem.next() {
                Some(b) => self.current = b,
                None => {
                    return match self.file.as_mut() {
                        Some(f) => f.read(buf),
                        None => Ok(0),
                    }
                }
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// Reads a spool back: memory chunks first, then the file.
#[derive(Debug)]
pub struct SpoolReader {
    mem: std::vec::IntoIter<Bytes>,
    file: Option<tokio::fs::File>,
}

impl Input for SpoolReader {
    async fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        if let Some(b) = self.mem.next() {
            return Ok(Some(b));
        }
        let Some(f) = self.file.as_mut() else {
            return Ok(None);
        };
        let mut buf = bytes::BytesMut::with_capacity(64 * 1024);
        let n = f.read_buf(&mut buf).await?;
        if n == 0 {
            self.file = None;
            return Ok(None);
        }
        Ok(Some(buf.freeze()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn spills_past_the_limit_and_reads_back_in_order() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Spool::new(d.path().to_path_buf(), 10);
        for part in [&b"hello"[..], b"world", b"!!", b"more bytes"] {
            s.write(Bytes::copy_from_slice(part)).await.unwrap();
        }
        assert_eq!(s.len(), 22);
        s.flush().await.unwrap();
        for _ in 0..2 {
            let mut r = s.reader().await.unwrap();
            let mut all = Vec::new();
            while let Some(c) = r.next_chunk().await.unwrap() {
                all.extend_from_slice(&c);
            }
            assert_eq!(all, b"helloworld!!more bytes");
        }
        let mut blocking = Vec::new();
        std::io::Read::read_to_end(&mut s.into_blocking_reader().unwrap(), &mut blocking).unwrap();
        assert_eq!(blocking, b"helloworld!!more bytes");
    }
}
