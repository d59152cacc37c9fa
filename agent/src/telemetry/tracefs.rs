//! Tracepoint record layouts, read from tracefs instead of hard-coded.
//!
//! The kernel publishes each tracepoint's record layout in
//! `<tracefs>/events/<category>/<name>/format`. Reading it at load time keeps the eBPF programs
//! correct across kernels whose records differ.
use std::{collections::HashMap, fs, io, path::PathBuf};

/// Where tracefs is usually mounted, newest convention first.
const TRACEFS_ROOTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// Errors reading a tracepoint's format.
#[derive(Debug, thiserror::Error)]
pub enum TracefsError {
    /// No tracefs mount has the tracepoint.
    #[error("tracepoint {category}:{name} not found under {roots:?} (is tracefs mounted?)")]
    NotFound {
        category: String,
        name: String,
        roots: Vec<PathBuf>,
    },
    /// The format file exists but could not be read.
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    /// tracefs is mounted nowhere, and mounting it failed.
    #[error("tracefs is not mounted and mounting it on {path} failed: {source}")]
    Mount { path: PathBuf, source: io::Error },
    /// A `field:` line did not have the expected shape.
    #[error("malformed field line in tracepoint format: {line:?}")]
    Malformed { line: String },
    /// The record lacks a field the program needs.
    #[error("tracepoint {tracepoint} has no field {field:?}")]
    MissingField { tracepoint: String, field: String },
}

/// Mounts tracefs on `/sys/kernel/tracing` when no usual place has it (a host where nothing
/// has mounted it yet, as systemd does on first use). Needs root.
pub fn ensure_mounted() -> Result<(), TracefsError> {
    if TRACEFS_ROOTS
        .iter()
        .any(|root| PathBuf::from(root).join("events").is_dir())
    {
        return Ok(());
    }
    // SAFETY: every pointer is a NUL-terminated string literal; tracefs takes no data.
    let rc = unsafe {
        libc::mount(
            c"nodev".as_ptr(),
            c"/sys/kernel/tracing".as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    // Read before anything else can touch errno.
    let failed = (rc != 0).then(io::Error::last_os_error);
    let path = PathBuf::from(TRACEFS_ROOTS[0]);
    if let Some(source) = failed {
        return Err(TracefsError::Mount { path, source });
    }
    tracing::info!("mounted tracefs on {}", path.display());
    Ok(())
}

/// Offset and size of one field in a tracepoint record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub offset: u32,
    pub size: u32,
}

/// The fields of one tracepoint record, by name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Format {
    tracepoint: String,
    fields: HashMap<String, Field>,
}

impl Format {
    /// Reads and parses the format of `category:name` from the first tracefs mount holding it.
    pub fn read(category: &str, name: &str) -> Result<Self, TracefsError> {
        let roots: Vec<PathBuf> = TRACEFS_ROOTS.iter().map(PathBuf::from).collect();
        for root in &roots {
            let path = root.join("events").join(category).join(name).join("format");
            match fs::read_to_string(&path) {
                Ok(text) => return Self::parse(&format!("{category}:{name}"), &text),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => return Err(TracefsError::Read { path, source }),
            }
        }
        Err(TracefsError::NotFound {
            category: category.into(),
            name: name.into(),
            roots,
        })
    }

    /// Parses the text of a format file.
    pub fn parse(tracepoint: &str, text: &str) -> Result<Self, TracefsError> {
        let mut fields = HashMap::new();
        for line in text.lines().map(str::trim) {
            let Some(rest) = line.strip_prefix("field:") else {
                continue;
            };
            let (name, field) = parse_field(rest).ok_or_else(|| TracefsError::Malformed {
                line: line.to_string(),
            })?;
            fields.insert(name, field);
        }
        Ok(Self {
            tracepoint: tracepoint.to_string(),
            fields,
        })
    }

    /// The named field, or an error naming the tracepoint.
    pub fn field(&self, name: &str) -> Result<Field, TracefsError> {
        self.fields
            .get(name)
            .copied()
            .ok_or_else(|| TracefsError::MissingField {
                tracepoint: self.tracepoint.clone(),
                field: name.to_string(),
            })
    }
}

/// Parses `dev_t dev;\toffset:8;\tsize:4;\tsigned:0;` into ("dev", Field { 8, 4 }).
fn parse_field(rest: &str) -> Option<(String, Field)> {
    let mut parts = rest.split(';').map(str::trim);
    let decl = parts.next()?;
    // The name is the declaration's last word, without an array suffix: `char comm[16]`.
    let name = decl.split_whitespace().last()?;
    let name = name.split('[').next()?.to_string();
    let mut offset = None;
    let mut size = None;
    for part in parts {
        if let Some(v) = part.strip_prefix("offset:") {
            offset = v.parse().ok();
        } else if let Some(v) = part.strip_prefix("size:") {
            size = v.parse().ok();
        }
    }
    Some((
        name,
        Field {
            offset: offset?,
            size: size?,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLOCK_RQ_ISSUE: &str = "name: block_rq_issue\nID: 2104\nformat:\n\
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\n\
\tfield:dev_t dev;\toffset:8;\tsize:4;\tsigned:0;\n\
\tfield:unsigned int bytes;\toffset:28;\tsize:4;\tsigned:0;\n\
\tfield:char comm[16];\toffset:44;\tsize:16;\tsigned:0;\n\
\tfield:__data_loc char[] cmd;\toffset:60;\tsize:4;\tsigned:0;\n\n\
print fmt: \"%d,%d\", REC->dev\n";

    #[test]
    fn parses_kernel_6_18_block_rq_issue() {
        let f = Format::parse("block:block_rq_issue", BLOCK_RQ_ISSUE).unwrap();
        assert_eq!(f.field("dev").unwrap(), Field { offset: 8, size: 4 });
        assert_eq!(
            f.field("bytes").unwrap(),
            Field {
                offset: 28,
                size: 4
            }
        );
        assert_eq!(
            f.field("comm").unwrap(),
            Field {
                offset: 44,
                size: 16
            }
        );
        assert_eq!(
            f.field("cmd").unwrap(),
            Field {
                offset: 60,
                size: 4
            }
        );
    }

    #[test]
    fn missing_field_names_the_tracepoint() {
        let f = Format::parse("block:block_rq_issue", BLOCK_RQ_ISSUE).unwrap();
        let err = f.field("sector").unwrap_err().to_string();
        assert!(
            err.contains("block:block_rq_issue") && err.contains("sector"),
            "{err}"
        );
    }

    #[test]
    fn malformed_line_is_an_error() {
        let err = Format::parse("x:y", "\tfield:int a;\toffset:zz;\tsize:4;\n").unwrap_err();
        assert!(matches!(err, TracefsError::Malformed { .. }), "{err}");
    }
}
