//! A raw image file as an export: positioned reads and writes through the page cache,
//! `fdatasync` for FLUSH and FUA, `fallocate` for TRIM and WRITE_ZEROES, and
//! `SEEK_DATA`/`SEEK_HOLE` for block status.
//!
//! One `FileExport` is shared by every connection to the export, so a FLUSH on any connection
//! covers writes completed on all of them (what NBD_FLAG_CAN_MULTI_CONN promises).
use std::{
    fs::{File, OpenOptions},
    io,
    os::{fd::AsRawFd, unix::fs::FileExt},
    path::{Path, PathBuf},
};

use super::{Export, Extent};
use nas_proto::nbd::{STATE_HOLE, STATE_ZERO};

/// A raw image file.
#[derive(Debug)]
pub struct FileExport {
    file: File,
    path: PathBuf,
    size: u64,
    read_only: bool,
}

impl FileExport {
    /// Opens `path`; a read-only export opens the file read-only.
    pub fn open(path: &Path, read_only: bool) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a regular file", path.display()),
            ));
        }
        Ok(Self {
            file,
            path: path.to_path_buf(),
            size: meta.len(),
            read_only,
        })
    }

    /// The open image, for whole-file work such as building the block index.
    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn fallocate(&self, mode: i32, offset: u64, length: u64) -> io::Result<()> {
        // SAFETY: plain syscall on an fd we own; offsets are validated by the caller.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                length as libc::off_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn sync_if(&self, fua: bool) -> io::Result<()> {
        if fua {
            self.file.sync_data()
        } else {
            Ok(())
        }
    }

    /// Writes explicit zeroes, for filesystems without ZERO_RANGE.
    fn write_zero_bytes(&self, mut offset: u64, length: u64) -> io::Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeroes = vec![0u8; CHUNK.min(length) as usize];
        let end = offset + length;
        while offset < end {
            let n = CHUNK.min(end - offset) as usize;
            self.file.write_all_at(&zeroes[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }

    fn seek(&self, offset: u64, whence: i32) -> io::Result<Option<u64>> {
        // SAFETY: lseek on an fd we own; it does not touch memory.
        let rc = unsafe { libc::lseek(self.file.as_raw_fd(), offset as libc::off_t, whence) };
        if rc >= 0 {
            return Ok(Some(rc as u64));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        }
    }
}

impl Export for FileExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn try_read_cached(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        let mut done = 0;
        while done < buf.len() {
            let rest = &mut buf[done..];
            let iov = libc::iovec {
                iov_base: rest.as_mut_ptr().cast(),
                iov_len: rest.len(),
            };
            // SAFETY: one iovec over a live, exclusively borrowed buffer; RWF_NOWAIT makes the
            // kernel return EAGAIN instead of waiting for the disk.
            let n = unsafe {
                libc::preadv2(
                    self.file.as_raw_fd(),
                    &iov,
                    1,
                    (offset + done as u64) as libc::off_t,
                    libc::RWF_NOWAIT,
                )
            };
            match n {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n if n > 0 => done += n as usize,
                _ => {
                    let e = io::Error::last_os_error();
                    return match e.raw_os_error() {
                        Some(libc::EAGAIN) | Some(libc::EOPNOTSUPP) => Ok(false),
                        Some(libc::EINTR) => continue,
                        _ => Err(e),
                    };
                }
            }
        }
        Ok(true)
    }

    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.file.write_all_at(data, offset)?;
        self.sync_if(fua)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn trim(&self, offset: u64, length: u64, fua: bool) -> io::Result<()> {
        self.write_zeroes(offset, length, true, fua)
    }

    fn write_zeroes(&self, offset: u64, length: u64, may_punch: bool, fua: bool) -> io::Result<()> {
        if length == 0 {
            return Ok(());
        }
        let first = if may_punch {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        match self.fallocate(first, offset, length) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                self.write_zero_bytes(offset, length)?
            }
            Err(e) => return Err(e),
        }
        self.sync_if(fua)
    }

    fn cache(&self, offset: u64, length: u64) -> io::Result<()> {
        // SAFETY: advisory syscall on an fd we own.
        let rc = unsafe {
            libc::posix_fadvise(
                self.file.as_raw_fd(),
                offset as libc::off_t,
                length as libc::off_t,
                libc::POSIX_FADV_WILLNEED,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(rc))
        }
    }

    fn block_status(&self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        let end = offset + length;
        let mut extents = Vec::new();
        let mut pos = offset;
        // Bounded answer: a fragmented file reports its first extents, and the client asks
        // again from where the answer stopped.
        while pos < end && extents.len() < 1024 {
            let data = self
                .seek(pos, libc::SEEK_DATA)?
                .unwrap_or(self.size)
                .min(end);
            if data > pos {
                extents.push(Extent {
                    length: data - pos,
                    flags: STATE_HOLE | STATE_ZERO,
                });
                pos = data;
                continue;
            }
            let hole = self
                .seek(pos, libc::SEEK_HOLE)?
                .unwrap_or(self.size)
                .min(end);
            let hole = if hole > pos { hole } else { end };
            extents.push(Extent {
                length: hole - pos,
                flags: 0,
            });
            pos = hole;
        }
        Ok(extents)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str, size: u64) -> PathBuf {
        let path = std::env::temp_dir().join(format!("nas-file-{}-{name}", std::process::id()));
        let f = File::create(&path).unwrap();
        f.set_len(size).unwrap();
        path
    }

    #[test]
    fn write_read_zero_and_status() {
        let path = scratch("rw", 1 << 20);
        let e = FileExport::open(&path, false).unwrap();
        assert_eq!(e.size(), 1 << 20);
        assert_eq!(
            e.block_status(0, 1 << 20).unwrap(),
            vec![Extent {
                length: 1 << 20,
                flags: STATE_HOLE | STATE_ZERO
            }]
        );
        e.write_at(&[7u8; 8192], 65536, true).unwrap();
        let mut buf = [0u8; 8192];
        e.read_at(&mut buf, 65536).unwrap();
        assert_eq!(buf, [7u8; 8192]);
        // Just written, so cached: the non-blocking read succeeds with the same bytes.
        let mut cached = [0u8; 8192];
        assert!(e.try_read_cached(&mut cached, 65536).unwrap());
        assert_eq!(cached, buf);
        let status = e.block_status(0, 1 << 20).unwrap();
        assert_eq!(status.iter().map(|x| x.length).sum::<u64>(), 1 << 20);
        assert!(status.iter().any(|x| x.flags == 0));
        e.write_zeroes(65536, 4096, false, false).unwrap();
        e.trim(69632, 4096, false).unwrap();
        e.read_at(&mut buf, 65536).unwrap();
        assert_eq!(buf, [0u8; 8192]);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn read_only_refuses_writes() {
        let path = scratch("ro", 4096);
        let e = FileExport::open(&path, true).unwrap();
        assert!(e.read_only());
        assert!(e.write_at(&[1], 0, false).is_err());
        std::fs::remove_file(path).unwrap();
    }
}
