//! The path a unix socket of another process is connected to: how the registry matches QEMU's
//! NBD client sockets to `nbd+unix` disks.
//!
//! `/proc` says only that an fd is a socket (and the client end of a unix socket has no path
//! of its own). The daemon, root, takes a copy of the fd with `pidfd_getfd(2)` (Linux 5.6) and
//! asks `getpeername(2)`: for a connected stream socket that is the path the server bound.
//! The copy is closed at once; QEMU's socket is not touched otherwise.
use std::{
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::PathBuf,
};

/// A process whose fds can be copied: one pidfd, opened once for all the fds asked about.
pub struct Process(OwnedFd);

impl Process {
    pub fn open(pid: u32) -> io::Result<Self> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if pidfd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the fd was just returned to us and nothing else owns it.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(pidfd as i32) }))
    }

    /// The bound path of the peer of the process's `fd`, when `fd` is a connected unix
    /// socket whose peer has a path. `None` for every other kind of fd or socket.
    pub fn peer_path(&self, fd: u32) -> io::Result<Option<PathBuf>> {
        let copy = self.copy_fd(fd)?;
        // SAFETY: a zeroed sockaddr_un is valid; getpeername writes at most `len` bytes into it.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        let mut len = size_of::<libc::sockaddr_un>() as libc::socklen_t;
        // SAFETY: `addr` and `len` are valid for the call; the fd is ours.
        let rc = unsafe {
            libc::getpeername(
                copy.as_raw_fd(),
                (&raw mut addr).cast::<libc::sockaddr>(),
                &mut len,
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                // Not a socket, or not connected.
                Some(libc::ENOTSOCK | libc::ENOTCONN) => Ok(None),
                _ => Err(e),
            };
        }
        if i32::from(addr.sun_family) != libc::AF_UNIX {
            return Ok(None);
        }
        let offset = std::mem::offset_of!(libc::sockaddr_un, sun_path);
        let n = (len as usize)
            .saturating_sub(offset)
            .min(addr.sun_path.len());
        // SAFETY: c_char and u8 have the same size; `n` is within the array.
        let raw: &[u8] = unsafe { std::slice::from_raw_parts(addr.sun_path.as_ptr().cast(), n) };
        // Abstract sockets start with a NUL; unnamed ones have no path at all.
        let path = raw.split(|b| *b == 0).next().unwrap_or_default();
        if path.is_empty() {
            return Ok(None);
        }
        Ok(Some(PathBuf::from(std::ffi::OsStr::from_bytes(path))))
    }

    /// A copy of the process's `fd` in this process.
    fn copy_fd(&self, fd: u32) -> io::Result<OwnedFd> {
        // SAFETY: pidfd_getfd takes a pidfd, a target fd and flags, and returns a new fd or -1.
        let copy =
            unsafe { libc::syscall(libc::SYS_pidfd_getfd, self.0.as_raw_fd(), fd as i32, 0) };
        if copy < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above.
        Ok(unsafe { OwnedFd::from_raw_fd(copy as i32) })
    }
}

#[cfg(test)]
mod tests {
    use std::os::{fd::AsRawFd, unix::net::UnixListener};

    use super::*;

    #[test]
    fn a_connected_unix_socket_names_its_peers_path() {
        let dir = std::env::temp_dir().join(format!("unix-peer-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("nbd.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let client = std::os::unix::net::UnixStream::connect(&path).unwrap();
        // Copying one's own fds needs no privilege.
        let me = Process::open(std::process::id()).unwrap();
        let got = me.peer_path(client.as_raw_fd() as u32).unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        let not_socket = me.peer_path(file.as_raw_fd() as u32).unwrap();
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let unnamed = me.peer_path(a.as_raw_fd() as u32).unwrap();
        drop(listener);
        std::fs::remove_dir_all(&dir).ok();
        assert_eq!(got, Some(path));
        assert_eq!(not_socket, None);
        assert_eq!(unnamed, None, "a socketpair's peer has no path");
    }
}
