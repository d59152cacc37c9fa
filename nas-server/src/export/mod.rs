//! Exports: what an NBD connection reads and writes.
//!
//! [`Export`] is the layer boundary. [`file::FileExport`] serves a raw image file; layers such
//! as the hashing layer that keeps the block index exact wrap an `Export` and are themselves
//! one, so the transmission code never knows which layers are stacked. Methods are synchronous
//! (positioned I/O on a file) and are called from tokio's blocking pool.
use std::io;

pub mod file;
pub mod hashing;

/// One extent of a block-status answer: `length` bytes with `flags`
/// ([`nas_proto::nbd::STATE_HOLE`] | [`nas_proto::nbd::STATE_ZERO`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    pub flags: u32,
}

/// A block device served over NBD. Offsets and lengths are already validated against
/// [`Export::size`] by the caller.
pub trait Export: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Whether writes are refused.
    fn read_only(&self) -> bool;
    /// Fills `buf` from `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Fills `buf` only if that cannot block (the data is cached); `Ok(false)` means the
    /// caller must use [`Export::read_at`] from a thread that may block.
    fn try_read_cached(&self, _buf: &mut [u8], _offset: u64) -> io::Result<bool> {
        Ok(false)
    }
    /// Writes `data` at `offset`; with `fua`, it is durable when this returns.
    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> io::Result<()>;
    /// Makes every completed write, from any connection, durable.
    fn flush(&self) -> io::Result<()>;
    /// Discards a range; it may read back as anything, here zeroes.
    fn trim(&self, offset: u64, length: u64, fua: bool) -> io::Result<()>;
    /// Zeroes a range; `may_punch` allows freeing the space (no NBD_CMD_FLAG_NO_HOLE).
    fn write_zeroes(&self, offset: u64, length: u64, may_punch: bool, fua: bool) -> io::Result<()>;
    /// Hints that a range will be read soon.
    fn cache(&self, offset: u64, length: u64) -> io::Result<()>;
    /// Allocation status of `[offset, offset + length)`, at least one extent, covering at most
    /// that range.
    fn block_status(&self, offset: u64, length: u64) -> io::Result<Vec<Extent>>;
}

/// A named export as clients see it.
pub struct ExportEntry {
    pub name: String,
    pub description: String,
    pub export: std::sync::Arc<dyn Export>,
    /// TLS client identities that may use it; empty: any client (see [`crate::access`]).
    pub allow: Vec<String>,
}

/// The exports a server offers, by name, in configuration order.
#[derive(Default, Clone)]
pub struct Exports {
    entries: Vec<std::sync::Arc<ExportEntry>>,
}

impl Exports {
    pub fn new(entries: Vec<ExportEntry>) -> Self {
        Self {
            entries: entries.into_iter().map(std::sync::Arc::new).collect(),
        }
    }

    /// The export called `name`. The empty name selects the only export when there is exactly
    /// one, as `nbd://host:port` without a path does.
    pub fn resolve(&self, name: &str) -> Option<std::sync::Arc<ExportEntry>> {
        if name.is_empty() && self.entries.len() == 1 {
            return self.entries.first().cloned();
        }
        self.entries.iter().find(|e| e.name == name).cloned()
    }

    pub fn iter(&self) -> impl Iterator<Item = &std::sync::Arc<ExportEntry>> {
        self.entries.iter()
    }
}
