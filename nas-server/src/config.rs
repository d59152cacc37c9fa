//! Server configuration: command-line flags, optionally layered over a TOML file.
//!
//! ```toml
//! listen = ["127.0.0.1:10809", "unix:/run/nas-server.sock"]
//! metrics = "127.0.0.1:9188"
//! max_connections = 1024
//! index_dir = "/var/lib/nas-server"
//! index_listen = ["127.0.0.1:10810"]
//! hot_blocks = 262144
//! tls_creds = "/etc/pki/qemu"     # QEMU's tls-creds-x509 layout
//! tls = "require"                 # require | optional | off (default: require with creds)
//!
//! [[export]]
//! name = "vm1"
//! path = "/srv/vm1.raw"
//! read_only = false
//! allow = ["host-a.example"]      # TLS client identities that may use it (default: any)
//! ```
//! Flags add to the file: `--listen` replaces the file's listeners, `--export` adds exports.
use std::{net::SocketAddr, path::PathBuf};

use serde::Deserialize;

use nas_proto::Endpoint;

/// Default NBD listener: the IANA port, loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:10809";

/// Errors in configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--export {0:?}: expected NAME=PATH[,ro][,shared][,noindex][,allow=IDENTITY]...")]
    ExportSyntax(String),
    #[error(
        "--export {spec:?}: unknown option {option:?} (known: ro, shared, noindex, allow=IDENTITY)"
    )]
    ExportOption { spec: String, option: String },
    #[error("--tls {0}: TLS needs credentials (--tls-creds DIR)")]
    TlsWithoutCreds(TlsMode),
    #[error(
        "export {0:?} allows only some TLS identities, but TLS is off: clients could not prove \
         who they are"
    )]
    AllowWithoutTls(String),
    #[error("export name {0:?} is used twice")]
    DuplicateExport(String),
    #[error("export name {0:?} is longer than 4096 bytes")]
    LongName(String),
    #[error("no exports configured: pass --export NAME=PATH or list them in --config")]
    NoExports,
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Toml {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("{path}: listen {value:?}: {reason}")]
    Listen {
        path: PathBuf,
        value: String,
        reason: nas_proto::endpoint::EndpointError,
    },
}

/// One export.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportSpec {
    pub name: String,
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    /// Searched by every index session, not just those naming it (e.g. a golden base image).
    #[serde(default)]
    pub shared: bool,
    /// Served without the block index (scratch or swap disks that agents never look up).
    #[serde(default)]
    pub noindex: bool,
    #[serde(default)]
    pub description: String,
    /// TLS client identities (certificate names) that may use it; empty: any client. Over
    /// plaintext, an export with such a list is refused (NBD_REP_ERR_TLS_REQD).
    #[serde(default)]
    pub allow: Vec<String>,
}

/// Whether the NBD server offers TLS (NBD_OPT_STARTTLS) and insists on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// No TLS: STARTTLS is answered NBD_REP_ERR_UNSUP.
    Off,
    /// Clients may upgrade; exports with an allow-list need it.
    Optional,
    /// Every option before STARTTLS is answered NBD_REP_ERR_TLS_REQD.
    Require,
}

impl std::fmt::Display for TlsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TlsMode::Off => "off",
            TlsMode::Optional => "optional",
            TlsMode::Require => "require",
        })
    }
}

impl std::str::FromStr for ExportSpec {
    type Err = ConfigError;

    /// `NAME=PATH[,ro][,shared][,noindex]`.
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let (name, rest) = spec
            .split_once('=')
            .ok_or_else(|| ConfigError::ExportSyntax(spec.into()))?;
        let mut parts = rest.split(',');
        let path = parts.next().unwrap_or_default();
        if name.is_empty() || path.is_empty() {
            return Err(ConfigError::ExportSyntax(spec.into()));
        }
        let mut out = ExportSpec {
            name: name.into(),
            path: path.into(),
            read_only: false,
            shared: false,
            noindex: false,
            description: String::new(),
            allow: Vec::new(),
        };
        for option in parts {
            if let Some(identity) = option.strip_prefix("allow=") {
                out.allow.push(identity.into());
                continue;
            }
            match option {
                "ro" => out.read_only = true,
                "shared" => out.shared = true,
                "noindex" => out.noindex = true,
                _ => {
                    return Err(ConfigError::ExportOption {
                        spec: spec.into(),
                        option: option.into(),
                    })
                }
            }
        }
        Ok(out)
    }
}

/// The TOML file's shape.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    listen: Vec<String>,
    metrics: Option<SocketAddr>,
    max_connections: Option<usize>,
    index_dir: Option<PathBuf>,
    #[serde(default)]
    index_listen: Vec<String>,
    hot_blocks: Option<usize>,
    tls_creds: Option<PathBuf>,
    tls: Option<TlsMode>,
    #[serde(default)]
    export: Vec<ExportSpec>,
}

/// The effective configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub listen: Vec<Endpoint>,
    pub exports: Vec<ExportSpec>,
    pub metrics: Option<SocketAddr>,
    pub max_connections: usize,
    /// Where the block index is persisted; `None` keeps it in memory only.
    pub index_dir: Option<PathBuf>,
    /// Where the index service listens.
    pub index_listen: Vec<Endpoint>,
    /// Capacity of each export's hot set, in 4 KiB blocks.
    pub hot_blocks: usize,
    /// TLS credentials, QEMU's tls-creds-x509 layout (NBD and the index service).
    pub tls_creds: Option<PathBuf>,
    pub tls: TlsMode,
}

/// Default index-service listener: loopback only.
pub const DEFAULT_INDEX_LISTEN: &str = "127.0.0.1:10810";
/// Default hot-set capacity: 1 GiB of guest RAM in 4 KiB blocks.
pub const DEFAULT_HOT_BLOCKS: usize = 262_144;

/// Settings given on the command line, which win over the file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub listen: Vec<Endpoint>,
    pub exports: Vec<ExportSpec>,
    pub metrics: Option<SocketAddr>,
    pub max_connections: Option<usize>,
    pub index_dir: Option<PathBuf>,
    pub index_listen: Vec<Endpoint>,
    pub hot_blocks: Option<usize>,
    pub tls_creds: Option<PathBuf>,
    pub tls: Option<TlsMode>,
}

impl Config {
    /// Merges flags over an optional TOML file and checks the result.
    pub fn build(file: Option<&std::path::Path>, flags: Overrides) -> Result<Self, ConfigError> {
        let Overrides {
            listen,
            exports,
            metrics,
            max_connections,
            index_dir,
            index_listen,
            hot_blocks,
            tls_creds,
            tls,
        } = flags;
        let from_file = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.into(),
                    source,
                })?;
                Self::parse_file(path, &text)?
            }
            None => (
                Config {
                    listen: Vec::new(),
                    exports: Vec::new(),
                    metrics: None,
                    max_connections: 1024,
                    index_dir: None,
                    index_listen: Vec::new(),
                    hot_blocks: DEFAULT_HOT_BLOCKS,
                    tls_creds: None,
                    tls: TlsMode::Off,
                },
                None,
            ),
        };
        let (from_file, file_tls) = from_file;
        let tls_creds = tls_creds.or(from_file.tls_creds.clone());
        // With credentials and no word on it, TLS is required.
        let tls = tls.or(file_tls).unwrap_or(match tls_creds {
            Some(_) => TlsMode::Require,
            None => TlsMode::Off,
        });
        let mut config = Config {
            listen: if listen.is_empty() {
                from_file.listen
            } else {
                listen
            },
            exports: from_file.exports.into_iter().chain(exports).collect(),
            metrics: metrics.or(from_file.metrics),
            max_connections: max_connections.unwrap_or(from_file.max_connections),
            index_dir: index_dir.or(from_file.index_dir),
            index_listen: if index_listen.is_empty() {
                from_file.index_listen
            } else {
                index_listen
            },
            hot_blocks: hot_blocks.unwrap_or(from_file.hot_blocks),
            tls_creds,
            tls,
        };
        if config.listen.is_empty() {
            config
                .listen
                .push(DEFAULT_LISTEN.parse().expect("default is valid"));
        }
        if config.index_listen.is_empty() {
            config
                .index_listen
                .push(DEFAULT_INDEX_LISTEN.parse().expect("default is valid"));
        }
        config.check()?;
        Ok(config)
    }

    /// The file's settings, and the TLS mode if it names one.
    fn parse_file(
        path: &std::path::Path,
        text: &str,
    ) -> Result<(Self, Option<TlsMode>), ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|source| ConfigError::Toml {
            path: path.into(),
            source,
        })?;
        let parse = |values: &[String]| -> Result<Vec<Endpoint>, ConfigError> {
            values
                .iter()
                .map(|l| {
                    l.parse().map_err(|reason| ConfigError::Listen {
                        path: path.into(),
                        value: l.clone(),
                        reason,
                    })
                })
                .collect()
        };
        let listen = parse(&file.listen)?;
        let index_listen = parse(&file.index_listen)?;
        let config = Config {
            listen,
            exports: file.export,
            metrics: file.metrics,
            max_connections: file.max_connections.unwrap_or(1024),
            index_dir: file.index_dir,
            index_listen,
            hot_blocks: file.hot_blocks.unwrap_or(DEFAULT_HOT_BLOCKS),
            tls_creds: file.tls_creds,
            tls: TlsMode::Off,
        };
        Ok((config, file.tls))
    }

    fn check(&self) -> Result<(), ConfigError> {
        if self.exports.is_empty() {
            return Err(ConfigError::NoExports);
        }
        if self.tls != TlsMode::Off && self.tls_creds.is_none() {
            return Err(ConfigError::TlsWithoutCreds(self.tls));
        }
        if let Some(e) = self.exports.iter().find(|e| !e.allow.is_empty()) {
            if self.tls == TlsMode::Off {
                return Err(ConfigError::AllowWithoutTls(e.name.clone()));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for e in &self.exports {
            if e.name.len() > 4096 {
                return Err(ConfigError::LongName(e.name.clone()));
            }
            if !seen.insert(&e.name) {
                return Err(ConfigError::DuplicateExport(e.name.clone()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_export_flags() {
        let e: ExportSpec = "vm1=/srv/vm1.raw,ro".parse().unwrap();
        assert_eq!(e.name, "vm1");
        assert_eq!(e.path, PathBuf::from("/srv/vm1.raw"));
        assert!(e.read_only);
        assert!(!e.shared);
        assert!(!"vm1=/x".parse::<ExportSpec>().unwrap().read_only);
        assert!("base=/b,ro,shared".parse::<ExportSpec>().unwrap().shared);
        assert!("swap=/s,noindex".parse::<ExportSpec>().unwrap().noindex);
        assert!(matches!(
            "vm1".parse::<ExportSpec>(),
            Err(ConfigError::ExportSyntax(_))
        ));
        assert!(matches!(
            "=x".parse::<ExportSpec>(),
            Err(ConfigError::ExportSyntax(_))
        ));
        assert!(matches!(
            "a=/x,rw".parse::<ExportSpec>(),
            Err(ConfigError::ExportOption { .. })
        ));
    }

    #[test]
    fn merges_file_and_flags() {
        let dir = std::env::temp_dir().join(format!("nas-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(
            &path,
            "listen = [\"unix:/tmp/x.sock\"]\n[[export]]\nname = \"a\"\npath = \"/a\"\n",
        )
        .unwrap();
        let flags = |exports: &[&str]| Overrides {
            exports: exports.iter().map(|e| e.parse().unwrap()).collect(),
            ..Overrides::default()
        };
        let c = Config::build(Some(&path), flags(&["b=/b,ro"])).unwrap();
        assert_eq!(c.listen, vec![Endpoint::Unix("/tmp/x.sock".into())]);
        assert_eq!(c.exports.len(), 2);
        assert_eq!(c.max_connections, 1024);
        let dup = Config::build(Some(&path), flags(&["a=/c"]));
        assert!(matches!(dup, Err(ConfigError::DuplicateExport(_))));
        std::fs::write(&path, "bogus = 1\n").unwrap();
        assert!(matches!(
            Config::build(Some(&path), flags(&[])),
            Err(ConfigError::Toml { .. })
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn defaults_to_loopback() {
        let one = Overrides {
            exports: vec!["a=/a".parse().unwrap()],
            ..Overrides::default()
        };
        let c = Config::build(None, one).unwrap();
        assert_eq!(
            c.listen,
            vec![Endpoint::Tcp("127.0.0.1:10809".parse().unwrap())]
        );
        assert_eq!(c.index_dir, None);
        assert_eq!(
            c.index_listen,
            vec![Endpoint::Tcp("127.0.0.1:10810".parse().unwrap())]
        );
        assert_eq!(c.hot_blocks, DEFAULT_HOT_BLOCKS);
        assert!(matches!(
            Config::build(None, Overrides::default()),
            Err(ConfigError::NoExports)
        ));
    }
}
