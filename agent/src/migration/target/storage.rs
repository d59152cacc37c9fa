//! Where the fetch stage reads a mapped page: an NBD export (nas-server, qemu-nbd, nbdkit),
//! or an image file on a filesystem this host shares with the source (map-only mode against
//! shared files). The source names an export; an export named by an absolute path is a file,
//! read only if it lies in one of the directories the operator allowed (`--image-dir`): the
//! network never chooses what this daemon opens. Whatever is read is verified against the
//! source's hash before it reaches QEMU.
use std::{
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use nas_client::nbd::NbdClient;
use nas_proto::Endpoint;

use super::TargetConfig;
use crate::migration::incoming::policy::within;

/// Why a page could not be read from storage (it then comes from the source instead).
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error(transparent)]
    Nbd(#[from] nas_client::nbd::NbdClientError),
    #[error("image {0}: {1}")]
    File(String, std::io::Error),
    #[error("image {0} is not a regular file in a directory this agent may read (--image-dir)")]
    NotAllowed(String),
    #[error("no NBD address for export {0}")]
    NoNas(String),
    #[error("read task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// One export's reader.
pub enum BlockSource {
    Nbd(Box<NbdClient>),
    File(Arc<std::fs::File>),
}

/// The reader for export `name`: its image file when `name` is an allowed path, else the
/// NBD export at `nas`.
pub async fn open(
    name: &str,
    nas: Option<&Endpoint>,
    config: &TargetConfig,
) -> Result<BlockSource, StorageError> {
    if name.starts_with('/') {
        let path = allowed(Path::new(name), &config.image_dirs)
            .ok_or_else(|| StorageError::NotAllowed(name.to_string()))?;
        let file = std::fs::File::open(&path).map_err(|e| StorageError::File(name.into(), e))?;
        return Ok(BlockSource::File(Arc::new(file)));
    }
    let nas = nas.ok_or_else(|| StorageError::NoNas(name.to_string()))?;
    let client = NbdClient::connect_with(nas, name, config.nas_tls.as_deref()).await?;
    Ok(BlockSource::Nbd(Box::new(client)))
}

/// `path`, links resolved, if it is a regular file inside one of `dirs`.
fn allowed(path: &Path, dirs: &[PathBuf]) -> Option<PathBuf> {
    let real = std::fs::canonicalize(path).ok()?;
    let is_file = std::fs::metadata(&real).is_ok_and(|m| m.is_file());
    (is_file && within(&real, dirs)).then_some(real)
}

impl BlockSource {
    /// Reads `ranges`; per range its bytes, or an error code (as NBD's).
    pub async fn read_many(
        &mut self,
        ranges: &[(u64, u32)],
        window: usize,
    ) -> Result<Vec<Result<Vec<u8>, u32>>, StorageError> {
        match self {
            BlockSource::Nbd(c) => Ok(c.read_many(ranges, window).await?),
            BlockSource::File(f) => {
                let (f, ranges) = (f.clone(), ranges.to_vec());
                Ok(tokio::task::spawn_blocking(move || {
                    ranges
                        .iter()
                        .map(|&(offset, len)| {
                            let mut buf = vec![0u8; len as usize];
                            f.read_exact_at(&mut buf, offset)
                                .map(|()| buf)
                                .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO) as u32)
                        })
                        .collect()
                })
                .await?)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_inside_the_allowed_directories() {
        let base = ::testkit::Scratch::new("image-dirs");
        let (shared, other) = (base.path("shared"), base.path("other"));
        for d in [&shared, &other] {
            std::fs::create_dir_all(d).unwrap();
        }
        let image = shared.join("vm1.raw");
        std::fs::write(&image, [1u8; 8192]).unwrap();
        let secret = other.join("secret");
        std::fs::write(&secret, b"x").unwrap();
        let link = shared.join("link.raw");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        let dirs = vec![shared.clone()];
        assert!(allowed(&image, &dirs).is_some());
        for bad in [
            secret.clone(),
            link,
            shared.join("../other/secret"),
            shared.clone(),
            shared.join("missing.raw"),
        ] {
            assert!(allowed(&bad, &dirs).is_none(), "{}", bad.display());
        }
        assert!(allowed(&image, &[]).is_none());
    }
}
