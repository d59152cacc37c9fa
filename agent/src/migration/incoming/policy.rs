//! Which registered incoming addresses the target agent connects to: an operator's
//! registration (the libvirt path, see [`super::expect`]) names the address its target QEMU
//! listens on, and this policy bounds it. The target QEMU runs on the same host as the agent,
//! so by default only loopback TCP addresses are accepted (`127.0.0.0/8`, `::1`,
//! `localhost`); unix sockets only where the operator names their directories, and only
//! sockets (not links to elsewhere) whose real directory is inside one of them. TCP addresses
//! of other hosts need an explicit opt-in.
use std::{
    net::SocketAddr,
    os::unix::fs::FileTypeExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpStream, UnixStream},
};

/// Which incoming addresses the target agent delivers to.
#[derive(Clone, Debug, Default)]
pub struct IncomingPolicy {
    /// Directories in which unix sockets may be named; none by default (unix refused).
    pub unix_dirs: Vec<PathBuf>,
    /// TCP addresses that are not loopback are accepted too (a target QEMU listening on
    /// another address of this host).
    pub any_host: bool,
}

/// Why an incoming address was refused or could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum IncomingError {
    #[error("unsupported incoming address {0:?} (use tcp:HOST:PORT or unix:PATH)")]
    Unsupported(String),
    #[error(
        "incoming address {0:?} is not on loopback: this agent delivers only to a QEMU on this \
         host's loopback (start the target agent with --incoming-any-host to allow other addresses)"
    )]
    NotLoopback(String),
    #[error(
        "incoming unix socket {0:?} is not a socket in a directory this agent allows (start \
         the target agent with --incoming-dir DIR)"
    )]
    UnixNotAllowed(String),
    #[error("cannot reach the target QEMU at {uri}: {source}")]
    Connect { uri: String, source: std::io::Error },
}

/// An incoming address the policy accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Incoming {
    /// `HOST:PORT`, as given.
    Tcp(String),
    Unix(PathBuf),
}

impl Incoming {
    /// QEMU's spelling: `tcp:HOST:PORT` or `unix:PATH`.
    pub fn uri(&self) -> String {
        match self {
            Incoming::Tcp(a) => format!("tcp:{a}"),
            Incoming::Unix(p) => format!("unix:{}", p.display()),
        }
    }
}

impl IncomingPolicy {
    /// Parses `uri` (`tcp:HOST:PORT` or `unix:PATH`) and checks it against the policy.
    pub fn check(&self, uri: &str) -> Result<Incoming, IncomingError> {
        if let Some(addr) = uri.strip_prefix("tcp:") {
            let loopback = match addr.parse::<SocketAddr>() {
                Ok(a) => a.ip().is_loopback(),
                Err(_) => addr
                    .rsplit_once(':')
                    .is_some_and(|(host, port)| host == "localhost" && port.parse::<u16>().is_ok()),
            };
            if loopback || self.any_host {
                return Ok(Incoming::Tcp(addr.to_string()));
            }
            return Err(IncomingError::NotLoopback(uri.to_string()));
        }
        if let Some(path) = uri.strip_prefix("unix:") {
            let path = Path::new(path);
            return match self.unix_allowed(path) {
                true => Ok(Incoming::Unix(path.to_path_buf())),
                false => Err(IncomingError::UnixNotAllowed(uri.to_string())),
            };
        }
        Err(IncomingError::Unsupported(uri.to_string()))
    }

    /// A socket itself (not a link), whose directory, links resolved, is inside an allowed
    /// one.
    fn unix_allowed(&self, path: &Path) -> bool {
        let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
        let (Some(dir), Some(_)) = (path.parent(), path.file_name()) else {
            return false;
        };
        let Ok(dir) = std::fs::canonicalize(dir) else {
            return false;
        };
        is_socket && within(&dir, &self.unix_dirs)
    }
}

/// Whether `real`, a path with its links already resolved, lies inside one of `dirs` (each
/// resolved too): the one check behind every path the operator allows by directory.
pub fn within(real: &Path, dirs: &[PathBuf]) -> bool {
    dirs.iter()
        .filter_map(|d| std::fs::canonicalize(d).ok())
        .any(|d| real.starts_with(d))
}

/// A connection to the target QEMU's incoming channel.
pub trait Conn: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Conn for T {}

/// Connects to an accepted incoming address, retrying for a while the target QEMU may take
/// to start listening (10 s).
pub async fn connect(incoming: &Incoming) -> Result<Box<dyn Conn>, IncomingError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let attempt = match incoming {
            Incoming::Tcp(addr) => TcpStream::connect(addr)
                .await
                .map(|s| Box::new(s) as Box<dyn Conn>),
            Incoming::Unix(path) => UnixStream::connect(path)
                .await
                .map(|s| Box::new(s) as Box<dyn Conn>),
        };
        match attempt {
            Ok(c) => return Ok(c),
            Err(source) if Instant::now() > deadline => {
                let uri = incoming.uri();
                return Err(IncomingError::Connect { uri, source });
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(policy: &IncomingPolicy, uri: &str) -> String {
        policy
            .check(uri)
            .expect_err(&format!("{uri} should be refused"))
            .to_string()
    }

    #[test]
    fn tcp_is_loopback_only_unless_the_operator_allows_more() {
        let strict = IncomingPolicy::default();
        for ok in [
            "tcp:127.0.0.1:4444",
            "tcp:127.1.2.3:4444",
            "tcp:[::1]:4444",
            "tcp:localhost:4444",
        ] {
            assert!(strict.check(ok).is_ok(), "{ok}");
        }
        for bad in [
            "tcp:192.0.2.1:4444",
            "tcp:[2001:db8::1]:4444",
            "tcp:0.0.0.0:4444",
            "tcp:example.net:4444",
            "tcp:localhost.example.net:4444",
            "tcp:localhost:notaport",
        ] {
            assert!(refused(&strict, bad).contains("not on loopback"), "{bad}");
        }
        let open = IncomingPolicy {
            any_host: true,
            ..IncomingPolicy::default()
        };
        assert_eq!(
            open.check("tcp:192.0.2.1:4444").unwrap(),
            Incoming::Tcp("192.0.2.1:4444".into())
        );
        assert!(refused(&open, "udp:127.0.0.1:1").contains("unsupported"));
        assert!(refused(&open, "exec:cat").contains("unsupported"));
    }

    #[test]
    fn unix_sockets_only_in_allowed_directories() {
        let base = ::testkit::Scratch::new("incoming-policy");
        let (allowed, other) = (base.path("allowed"), base.path("other"));
        for d in [&allowed, &other] {
            std::fs::create_dir_all(d).unwrap();
        }
        let sock = allowed.join("vm1.sock");
        let outside = other.join("daemon.sock");
        let _listeners = [
            std::os::unix::net::UnixListener::bind(&sock).unwrap(),
            std::os::unix::net::UnixListener::bind(&outside).unwrap(),
        ];
        // A link in the allowed directory to a socket elsewhere, a plain file, and a path
        // that climbs out of the directory.
        let link = allowed.join("link.sock");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        let file = allowed.join("file");
        std::fs::write(&file, b"").unwrap();
        let climbing = allowed.join("../other/daemon.sock");

        let none = IncomingPolicy::default();
        let uri = |p: &Path| format!("unix:{}", p.display());
        assert!(refused(&none, &uri(&sock)).contains("--incoming-dir"));
        let policy = IncomingPolicy {
            unix_dirs: vec![allowed.clone()],
            any_host: false,
        };
        assert_eq!(policy.check(&uri(&sock)).unwrap(), Incoming::Unix(sock));
        for bad in [
            &outside,
            &link,
            &file,
            &climbing,
            &allowed.join("missing.sock"),
        ] {
            assert!(
                refused(&policy, &uri(bad)).contains("not a socket in a directory"),
                "{}",
                bad.display()
            );
        }
    }
}
