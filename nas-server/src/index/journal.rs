//! The dirty-region journal: which 1 MiB regions of an export changed since the last
//! checkpoint of its persisted index.
//!
//! A region's bit is written to the journal file *before* the first write into that region
//! reaches the image. The journal is not fsynced: it lives in the page cache exactly as long as
//! unflushed image data does, so after a crash of the process (kill -9) the kernel still holds
//! both and the bits name every region to rehash. A reboot can lose either, so the file records
//! the boot id it was written under; a journal from another boot is not trusted and the whole
//! image is rehashed.
//!
//! ```text
//! offset 0   magic "NASJRNL1"
//!        8   boot id (16 bytes, /proc/sys/kernel/random/boot_id)
//!       24   bitmap, bit r = region r (byte r/8, bit r%8)
//! ```
use std::{
    fs::{File, OpenOptions},
    io,
    os::unix::fs::FileExt,
    path::Path,
    sync::{
        atomic::{AtomicU8, Ordering},
        Mutex, PoisonError,
    },
};

/// Bytes per region.
pub const REGION: u64 = 1 << 20;
const MAGIC: &[u8; 8] = b"NASJRNL1";
const HEADER: u64 = 24;

/// An open journal for one export.
pub struct Journal {
    file: File,
    /// In-memory copy of the bitmap, so a region already marked costs nothing.
    bits: Vec<AtomicU8>,
    /// Serialises byte writes, so a later write of a byte always carries every earlier bit.
    write: Mutex<()>,
}

/// The current boot's id, as 16 bytes.
pub fn boot_id() -> io::Result<[u8; 16]> {
    let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?;
    parse_boot_id(text.trim())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed boot_id"))
}

fn parse_boot_id(s: &str) -> Option<[u8; 16]> {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Journal {
    /// Regions recorded in an existing journal, if it was written during this boot. `None`
    /// means it cannot be trusted (missing, malformed, or from an earlier boot).
    pub fn recover(path: &Path, image_size: u64) -> io::Result<Option<Vec<u64>>> {
        let data = match std::fs::read(path) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(decode(&data, &boot_id()?, regions(image_size)))
    }

    /// Creates an empty journal for this boot, replacing any previous one.
    pub fn reset(path: &Path, image_size: u64) -> io::Result<Self> {
        let n = regions(image_size);
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(true)
            .open(path)?;
        let mut header = MAGIC.to_vec();
        header.extend_from_slice(&boot_id()?);
        file.write_all_at(&header, 0)?;
        file.set_len(HEADER + n.div_ceil(8))?;
        Ok(Self {
            file,
            bits: (0..n.div_ceil(8)).map(|_| AtomicU8::new(0)).collect(),
            write: Mutex::new(()),
        })
    }

    /// Records that bytes `[offset, offset + len)` are about to change. Returns once the bits
    /// are in the file (the page cache), so the caller may then write the image.
    pub fn mark(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let (first, last) = (offset / REGION, (offset + len - 1) / REGION);
        for region in first..=last {
            let byte = (region / 8) as usize;
            let Some(slot) = self.bits.get(byte) else {
                break;
            };
            let bit = 1u8 << (region % 8);
            let before = slot.fetch_or(bit, Ordering::AcqRel);
            if before & bit == 0 {
                // Under the lock the byte loaded holds every bit set before the lock was taken,
                // so whichever write lands last carries them all.
                let _serial = self.write.lock().unwrap_or_else(PoisonError::into_inner);
                let now = slot.load(Ordering::Acquire);
                self.file.write_all_at(&[now], HEADER + byte as u64)?;
            }
        }
        Ok(())
    }
}

impl Journal {
    /// Regions marked since [`Journal::reset`].
    pub fn marked(&self) -> Vec<u64> {
        (0..self.bits.len() as u64 * 8)
            .filter(|r| self.bits[(r / 8) as usize].load(Ordering::Acquire) & (1 << (r % 8)) != 0)
            .collect()
    }
}

fn regions(image_size: u64) -> u64 {
    image_size.div_ceil(REGION).max(1)
}

/// Decodes a journal: the set regions, if the header is valid and from `boot`.
fn decode(data: &[u8], boot: &[u8; 16], regions: u64) -> Option<Vec<u64>> {
    if data.len() < HEADER as usize || &data[..8] != MAGIC || data[8..24] != boot[..] {
        return None;
    }
    let bitmap = &data[HEADER as usize..];
    if (bitmap.len() as u64) < regions.div_ceil(8) {
        return None;
    }
    Some(
        (0..regions)
            .filter(|r| bitmap[(r / 8) as usize] & (1 << (r % 8)) != 0)
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_boot_ids() {
        let id = parse_boot_id("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0").unwrap();
        assert_eq!(id[0], 0x0f);
        assert_eq!(id[15], 0xf0);
        assert!(parse_boot_id("nope").is_none());
        assert!(boot_id().is_ok(), "this kernel exposes boot_id");
    }

    #[test]
    fn marks_survive_reopen_within_a_boot() {
        let path = std::env::temp_dir().join(format!("nas-journal-{}", std::process::id()));
        let size = 10 * REGION + 5;
        let j = Journal::reset(&path, size).unwrap();
        j.mark(REGION - 1, 2).unwrap();
        j.mark(9 * REGION, 1).unwrap();
        j.mark(10 * REGION + 1, 1).unwrap();
        j.mark(0, 0).unwrap();
        drop(j);
        assert_eq!(
            Journal::recover(&path, size).unwrap(),
            Some(vec![0, 1, 9, 10])
        );
        // A fresh journal forgets everything.
        Journal::reset(&path, size).unwrap();
        assert_eq!(Journal::recover(&path, size).unwrap(), Some(vec![]));
        std::fs::remove_file(&path).unwrap();
        assert_eq!(Journal::recover(&path, size).unwrap(), None);
    }

    #[test]
    fn foreign_boot_or_garbage_is_not_trusted() {
        let mut data = MAGIC.to_vec();
        data.extend_from_slice(&[1u8; 16]);
        data.push(0b101);
        assert_eq!(decode(&data, &[1u8; 16], 3), Some(vec![0, 2]));
        assert_eq!(decode(&data, &[2u8; 16], 3), None);
        assert_eq!(decode(&data, &[1u8; 16], 9), None, "bitmap too short");
        assert_eq!(decode(b"garbage", &[1u8; 16], 1), None);
    }
}
