//! Passing a file descriptor to QEMU over its QMP socket: `getfd` takes the descriptor that
//! arrives with the command's bytes (SCM_RIGHTS), under a name later commands refer to
//! (`fd:NAME` URIs). The agent hands the target QEMU its end of a socket pair this way, so
//! no address anyone else could reach is ever involved.
use std::os::fd::{AsRawFd, BorrowedFd};

use tokio::{io::Interest, net::UnixStream};

/// Sends `bytes` on `stream` with `fd` attached to the first byte; returns how many bytes
/// went (the rest, if any, is sent without the descriptor).
pub(super) async fn send_with_fd(
    stream: &UnixStream,
    bytes: &[u8],
    fd: BorrowedFd<'_>,
) -> std::io::Result<usize> {
    loop {
        stream.writable().await?;
        match stream.try_io(Interest::WRITABLE, || {
            sendmsg(stream.as_raw_fd(), bytes, fd)
        }) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            other => return other,
        }
    }
}

/// One `sendmsg` with an SCM_RIGHTS control message carrying `fd`.
fn sendmsg(socket: i32, bytes: &[u8], fd: BorrowedFd<'_>) -> std::io::Result<usize> {
    let raw = fd.as_raw_fd();
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(size_of::<i32>() as u32) } as usize;
    // u64 elements keep the control buffer aligned for cmsghdr.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: an all-zero msghdr is valid; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points at `space` bytes, room for one header and one descriptor;
    // CMSG_FIRSTHDR is then non-null and CMSG_DATA inside that buffer.
    let n = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<i32>() as u32) as _;
        std::ptr::copy_nonoverlapping(
            (&raw as *const i32).cast::<u8>(),
            libc::CMSG_DATA(cmsg),
            size_of::<i32>(),
        );
        libc::sendmsg(socket, &msg, libc::MSG_NOSIGNAL)
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};

    use super::*;

    /// The descriptor arrives, and it is the same socket: bytes written to the passed end
    /// come out of its peer.
    #[tokio::test]
    async fn the_descriptor_arrives_with_the_bytes() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        b.set_nonblocking(false).unwrap();
        let a = UnixStream::from_std({
            a.set_nonblocking(true).unwrap();
            a
        })
        .unwrap();
        let (passed, mut kept) = std::os::unix::net::UnixStream::pair().unwrap();
        let n = send_with_fd(&a, b"getfd\n", passed.as_fd()).await.unwrap();
        assert_eq!(n, 6);
        drop(passed);

        // Receive with recvmsg and take the descriptor out.
        let mut data = [0u8; 16];
        let mut control = [0u64; 8];
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = size_of_val(&control) as _;
        let got = unsafe { libc::recvmsg(b.as_raw_fd(), &mut msg, 0) };
        assert_eq!(&data[..got as usize], b"getfd\n");
        let received = unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            assert!(!cmsg.is_null());
            assert_eq!((*cmsg).cmsg_type, libc::SCM_RIGHTS);
            let mut fd = 0i32;
            std::ptr::copy_nonoverlapping(
                libc::CMSG_DATA(cmsg),
                (&mut fd as *mut i32).cast::<u8>(),
                4,
            );
            OwnedFd::from_raw_fd(fd)
        };
        let mut received = std::os::unix::net::UnixStream::from(received);
        use std::io::{Read, Write};
        received.write_all(b"through").unwrap();
        let mut buf = [0u8; 7];
        kept.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"through");
    }
}
