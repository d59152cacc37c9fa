//! The one address type of the product: where a server listens and where a client connects.
use std::{net::SocketAddr, path::PathBuf};

/// A socket address of either kind: `HOST:PORT` or `unix:PATH`. Every listener and every
/// client in the product names its peer with this one type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// Why a string is not an [`Endpoint`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    #[error("unix: needs a socket path")]
    NoPath,
    #[error("{given:?} is neither HOST:PORT nor unix:PATH: {reason}")]
    Neither {
        given: String,
        reason: std::net::AddrParseError,
    },
}

impl std::str::FromStr for Endpoint {
    type Err = EndpointError;

    /// `HOST:PORT` or `unix:PATH`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(EndpointError::NoPath);
            }
            return Ok(Self::Unix(path.into()));
        }
        s.parse()
            .map(Self::Tcp)
            .map_err(|reason| EndpointError::Neither {
                given: s.to_string(),
                reason,
            })
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "{a}"),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_endpoints() {
        assert_eq!(
            "127.0.0.1:10809".parse::<Endpoint>().unwrap(),
            Endpoint::Tcp("127.0.0.1:10809".parse().unwrap())
        );
        assert_eq!(
            "unix:/run/nas.sock".parse::<Endpoint>().unwrap(),
            Endpoint::Unix("/run/nas.sock".into())
        );
        assert!("unix:".parse::<Endpoint>().is_err());
        assert!("nowhere".parse::<Endpoint>().is_err());
    }
}
