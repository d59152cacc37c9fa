//! Finding, patching and loading the eBPF object, and wiring aya-log into `tracing`.
//!
//! The object is embedded at build time when `cargo xtask build-ebpf` ran before the agent was
//! built; otherwise `--ebpf-object PATH` (or `$AGENT_EBPF_OBJECT`) names it. Each failure mode
//! (no object, not root, a refused program) has its own error saying what to do.
use std::{io, path::PathBuf};

use aya::{Ebpf, EbpfLoader};
use tokio::{
    io::{unix::AsyncFd, Interest},
    task::JoinHandle,
};

use super::tracefs::TracefsError;

/// The eBPF object carried by this binary, if it was built after `cargo xtask build-ebpf`.
#[cfg(embedded_ebpf)]
pub fn embedded_object() -> Option<&'static [u8]> {
    Some(aya::include_bytes_aligned!(concat!(
        env!("OUT_DIR"),
        "/agent-ebpf"
    )))
}

/// The eBPF object carried by this binary, if it was built after `cargo xtask build-ebpf`.
#[cfg(not(embedded_ebpf))]
pub fn embedded_object() -> Option<&'static [u8]> {
    None
}

/// Errors setting up kernel telemetry.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error(
        "loading eBPF programs needs root (or CAP_BPF with CAP_PERFMON); this process runs as \
         uid {euid}"
    )]
    NotRoot { euid: u32 },
    #[error(
        "this agent binary carries no eBPF object: run `cargo xtask build-ebpf` and rebuild the \
         agent, or pass --ebpf-object PATH (env AGENT_EBPF_OBJECT)"
    )]
    NoObject,
    #[error("cannot read the eBPF object {path}: {source}")]
    ReadObject { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Tracefs(#[from] TracefsError),
    #[error("the kernel refused the eBPF object's maps or relocations: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the eBPF object has no {kind} named {name:?}; it is older than this agent")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error(
        "the kernel refused program {name}: {source} (this kernel runs under lockdown: kprobes \
         and fentry are refused, tracepoints are allowed)"
    )]
    ProgramLoad {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("cannot attach {name} to tracepoint {tracepoint}: {source}")]
    Attach {
        name: &'static str,
        tracepoint: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("cannot read map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("cannot read program statistics: {0}")]
    Stats(String),
}

/// Where to take the eBPF object from.
#[derive(Clone, Debug, Default)]
pub enum ObjectSource {
    /// The copy embedded at build time.
    #[default]
    Embedded,
    /// A file, e.g. `target/bpfel-unknown-none/release/agent-ebpf`.
    File(PathBuf),
}

impl ObjectSource {
    /// `Some(path)` selects a file; `None` the embedded object.
    pub fn from_option(path: Option<PathBuf>) -> Self {
        path.map_or(Self::Embedded, Self::File)
    }

    fn bytes(&self) -> Result<Vec<u8>, TelemetryError> {
        match self {
            Self::Embedded => embedded_object()
                .map(<[u8]>::to_vec)
                .ok_or(TelemetryError::NoObject),
            Self::File(path) => std::fs::read(path).map_err(|source| TelemetryError::ReadObject {
                path: path.clone(),
                source,
            }),
        }
    }
}

/// Fails with [`TelemetryError::NotRoot`] unless the effective uid is 0.
pub fn require_root() -> Result<(), TelemetryError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        Ok(())
    } else {
        Err(TelemetryError::NotRoot { euid })
    }
}

/// Loads the object with `globals` patched in. Programs are not loaded into the kernel yet.
pub fn load_object(
    source: &ObjectSource,
    globals: &[(&'static str, u32)],
) -> Result<Ebpf, TelemetryError> {
    require_root()?;
    raise_memlock_limit();
    let bytes = source.bytes()?;
    let mut loader = EbpfLoader::new();
    for (name, value) in globals {
        loader.override_global(name, value, true);
    }
    Ok(loader.load(&bytes)?)
}

/// Loads program `name` of `ebpf` into the kernel and attaches it to `category:tracepoint`.
pub fn attach_tracepoint(
    ebpf: &mut Ebpf,
    name: &'static str,
    category: &'static str,
    tracepoint: &'static str,
) -> Result<(), TelemetryError> {
    let program = loaded(ebpf, name, aya::programs::TracePoint::load)?;
    program
        .attach(category, tracepoint)
        .map_err(|source| TelemetryError::Attach {
            name,
            tracepoint,
            source,
        })?;
    Ok(())
}

/// Loads program `name` of `ebpf` into the kernel and attaches it to raw tracepoint
/// `tracepoint` (its arguments are the tracepoint's `TP_PROTO`, not the record's fields).
pub fn attach_raw_tracepoint(
    ebpf: &mut Ebpf,
    name: &'static str,
    tracepoint: &'static str,
) -> Result<(), TelemetryError> {
    let program = loaded(ebpf, name, aya::programs::RawTracePoint::load)?;
    program
        .attach(tracepoint)
        .map_err(|source| TelemetryError::Attach {
            name,
            tracepoint,
            source,
        })?;
    Ok(())
}

/// Program `name` of `ebpf` as its type `P`, loaded into the kernel by `load`.
fn loaded<'a, P>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
    load: impl FnOnce(&mut P) -> Result<(), aya::programs::ProgramError>,
) -> Result<&'a mut P, TelemetryError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program: &mut P = ebpf
        .program_mut(name)
        .ok_or(TelemetryError::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(|source| TelemetryError::ProgramLoad { name, source })?;
    load(program).map_err(|source| TelemetryError::ProgramLoad { name, source })?;
    Ok(program)
}

/// Takes map `name` out of `ebpf`.
pub fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, TelemetryError> {
    ebpf.take_map(name)
        .ok_or(TelemetryError::Missing { kind: "map", name })
}

/// Takes map `name` out of `ebpf` as the type `convert` makes of it.
pub fn typed_map<T>(
    ebpf: &mut Ebpf,
    name: &'static str,
    convert: impl FnOnce(aya::maps::Map) -> Result<T, aya::maps::MapError>,
) -> Result<T, TelemetryError> {
    convert(take_map(ebpf, name)?).map_err(|source| TelemetryError::Map { name, source })
}

/// A map removal's result, where a key that was not there is no error.
pub fn forget(
    r: Result<(), aya::maps::MapError>,
    name: &'static str,
) -> Result<(), TelemetryError> {
    match r {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.kind() == io::ErrorKind::NotFound =>
        {
            Ok(())
        }
        Err(source) => Err(TelemetryError::Map { name, source }),
    }
}

/// The kernel's run statistics of program `name` so far: (runs, run time).
pub fn program_runs(
    ebpf: &Ebpf,
    name: &'static str,
) -> Result<(u64, std::time::Duration), TelemetryError> {
    let program = ebpf.program(name).ok_or(TelemetryError::Missing {
        kind: "program",
        name,
    })?;
    let info = program
        .info()
        .map_err(|e| TelemetryError::Stats(e.to_string()))?;
    Ok((info.run_count(), info.run_time()))
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; lift it so maps fit.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a valid rlimit struct; failure only means the old limit stays.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!("could not lift RLIMIT_MEMLOCK; kernels >= 5.11 do not need it");
    }
}

/// Forwards the eBPF programs' aya-log records to the `log` facade, which tracing-subscriber
/// picks up. The returned task owns the logger: it must outlive the programs, because dropping
/// the logger closes a map fd that later program loads still refer to.
pub fn spawn_logger(ebpf: &mut Ebpf) -> Option<JoinHandle<()>> {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => logger,
        Err(e) => {
            tracing::warn!("eBPF logs will not be shown: {e}");
            return None;
        }
    };
    // SAFETY: the logger owns its ring buffer's fd for its whole life and always returns that
    // same fd; the AsyncFd takes ownership of the logger, so the fd outlives the registration.
    let mut logger = match unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!("eBPF logs will not be shown: cannot poll the log buffer: {e}");
            return None;
        }
    };
    Some(tokio::spawn(async move {
        loop {
            match logger.readable_mut().await {
                Ok(mut guard) => {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
                Err(e) => {
                    tracing::warn!("eBPF log buffer stopped: {e}");
                    return;
                }
            }
        }
    }))
}
