//! Persisting the block index in an embedded store (redb), so a restart does not rehash.
//!
//! Per export the store keeps its block table (`blocks/<name>`: block number -> BLAKE3) and a
//! record of the image it describes (size, mtime, inode) with a `clean` flag. At start-up:
//!
//! ```text
//! no record                          -> hash everything               (Recovery::Fresh)
//! clean, same size/mtime/inode       -> load, hash nothing            (Recovery::Clean)
//! not clean, journal from this boot  -> load, rehash journal regions  (Recovery::Journal)
//! anything else                      -> hash everything               (Recovery::Rebuilt)
//! ```
//! The record is then marked not clean and a fresh [`Journal`] is started; a clean shutdown
//! writes the journal's regions back and marks the record clean again.
use std::{
    fs::File,
    io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{
    build::{hash_file, hash_range},
    journal::{Journal, REGION},
    Hash, BLOCK,
};

const EXPORTS: TableDefinition<&str, &str> = TableDefinition::new("exports");

/// Errors of the persisted index.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("index store: {0}")]
    Redb(#[from] redb::Error),
    #[error("index store I/O: {0}")]
    Io(#[from] io::Error),
    #[error("index store record for {export:?} is corrupt: {reason}")]
    Corrupt { export: String, reason: String },
}

fn redb_err(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Redb(e.into())
}

/// How an export's table was obtained at start-up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recovery {
    /// No record: hashed from scratch.
    Fresh,
    /// Clean record of the same image: loaded, nothing hashed.
    Clean,
    /// Unclean stop within this boot: loaded, and these regions rehashed.
    Journal { regions: usize },
    /// The image changed behind the store's back, or the journal is untrusted: hashed again.
    Rebuilt { reason: &'static str },
}

/// What identifies an image's contents for the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Identity {
    size: u64,
    mtime_ns: i128,
    ino: u64,
    dev: u64,
}

impl Identity {
    fn of(file: &File) -> io::Result<Self> {
        let m = file.metadata()?;
        Ok(Self {
            size: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ino: m.ino(),
            dev: m.dev(),
        })
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Record {
    identity: Identity,
    clean: bool,
}

/// The on-disk index of every export of one server.
pub struct IndexStore {
    db: Database,
    dir: PathBuf,
}

impl IndexStore {
    /// Opens (or creates) `dir/index.redb`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)?;
        let db = Database::create(dir.join("index.redb")).map_err(redb_err)?;
        Ok(Self {
            db,
            dir: dir.to_path_buf(),
        })
    }

    fn journal_path(&self, export: &str) -> PathBuf {
        // Export names may hold any characters; the file name is derived, not copied.
        let tag = blockhash::hex(&blockhash::hash(export.as_bytes()));
        self.dir.join(format!("{}.journal", &tag[..16]))
    }

    fn record(&self, export: &str) -> Result<Option<Record>, StoreError> {
        let txn = self.db.begin_read().map_err(redb_err)?;
        let table = match txn.open_table(EXPORTS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(redb_err(e)),
        };
        let Some(json) = table.get(export).map_err(redb_err)? else {
            return Ok(None);
        };
        serde_json::from_str(json.value())
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                export: export.into(),
                reason: e.to_string(),
            })
    }

    fn load_table(&self, export: &str, blocks: u64) -> Result<Vec<Option<Hash>>, StoreError> {
        let name = format!("blocks/{export}");
        let def: TableDefinition<u64, Hash> = TableDefinition::new(&name);
        let txn = self.db.begin_read().map_err(redb_err)?;
        let mut table = vec![None; blocks as usize];
        let stored = match txn.open_table(def) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(table),
            Err(e) => return Err(redb_err(e)),
        };
        for entry in stored.iter().map_err(redb_err)? {
            let (block, hash) = entry.map_err(redb_err)?;
            let slot =
                table
                    .get_mut(block.value() as usize)
                    .ok_or_else(|| StoreError::Corrupt {
                        export: export.into(),
                        reason: format!("block {} beyond the image", block.value()),
                    })?;
            *slot = Some(hash.value());
        }
        Ok(table)
    }

    /// Writes `table` (all of it, or only `regions`) and the record, durably.
    fn save(
        &self,
        export: &str,
        table: &[Option<Hash>],
        regions: Option<&[u64]>,
        record: &Record,
    ) -> Result<(), StoreError> {
        let name = format!("blocks/{export}");
        let def: TableDefinition<u64, Hash> = TableDefinition::new(&name);
        let txn = self.db.begin_write().map_err(redb_err)?;
        {
            if regions.is_none() {
                txn.delete_table(def).map_err(redb_err)?;
            }
            let mut stored = txn.open_table(def).map_err(redb_err)?;
            let blocks_per_region = REGION / BLOCK;
            let ranges: Vec<(u64, u64)> = match regions {
                None => vec![(0, table.len() as u64)],
                Some(rs) => rs
                    .iter()
                    .map(|r| {
                        let first = r * blocks_per_region;
                        (first, (first + blocks_per_region).min(table.len() as u64))
                    })
                    .collect(),
            };
            for (first, end) in ranges {
                for block in first..end {
                    match table[block as usize] {
                        Some(h) => {
                            stored.insert(block, h).map_err(redb_err)?;
                        }
                        None => {
                            stored.remove(block).map_err(redb_err)?;
                        }
                    }
                }
            }
            let mut exports = txn.open_table(EXPORTS).map_err(redb_err)?;
            let json = serde_json::to_string(record).expect("record serialises");
            exports.insert(export, json.as_str()).map_err(redb_err)?;
        }
        txn.commit().map_err(redb_err)?;
        Ok(())
    }

    /// Produces the exact table of `file` for `export`, rehashing as little as the store
    /// allows, marks the record in use and starts a fresh journal.
    pub fn prepare(
        &self,
        export: &str,
        file: &File,
    ) -> Result<(Vec<Option<Hash>>, Journal, Recovery), StoreError> {
        let identity = Identity::of(file)?;
        let blocks = identity.size / BLOCK;
        let journal_path = self.journal_path(export);
        let record = self.record(export)?;
        let (table, recovery, dirty): (_, _, Option<Vec<u64>>) = match record {
            None => (hash_file(file, identity.size)?, Recovery::Fresh, None),
            Some(r) if r.clean && r.identity == identity => (
                self.load_table(export, blocks)?,
                Recovery::Clean,
                Some(vec![]),
            ),
            Some(r) if r.clean => (
                hash_file(file, identity.size)?,
                Recovery::Rebuilt {
                    reason: "the image changed while the server was stopped",
                },
                None,
            ),
            Some(r) if r.identity.size != identity.size || r.identity.ino != identity.ino => (
                hash_file(file, identity.size)?,
                Recovery::Rebuilt {
                    reason: "the image was replaced or resized after an unclean stop",
                },
                None,
            ),
            Some(_) => match Journal::recover(&journal_path, identity.size)? {
                Some(regions) => {
                    let mut table = self.load_table(export, blocks)?;
                    for &r in &regions {
                        let first = r * (REGION / BLOCK);
                        let end = (first + REGION / BLOCK).min(blocks);
                        if first < end {
                            let fresh = hash_range(file, first, end)?;
                            table[first as usize..end as usize].copy_from_slice(&fresh);
                        }
                    }
                    let recovery = Recovery::Journal {
                        regions: regions.len(),
                    };
                    (table, recovery, Some(regions))
                }
                None => (
                    hash_file(file, identity.size)?,
                    Recovery::Rebuilt {
                        reason: "unclean stop and no journal from this boot",
                    },
                    None,
                ),
            },
        };
        let in_use = Record {
            identity,
            clean: false,
        };
        self.save(export, &table, dirty.as_deref(), &in_use)?;
        let journal = Journal::reset(&journal_path, identity.size)?;
        Ok((table, journal, recovery))
    }

    /// After the export is flushed and no write is in flight: writes back the regions the
    /// journal marked and records the image as clean.
    pub fn finish(
        &self,
        export: &str,
        file: &File,
        table: &[Option<Hash>],
        journal: &Journal,
    ) -> Result<(), StoreError> {
        let record = Record {
            identity: Identity::of(file)?,
            clean: true,
        };
        self.save(export, table, Some(&journal.marked()), &record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        export::{file::FileExport, hashing::HashingExport, Export},
        index::BlockIndex,
    };
    use std::sync::Arc;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            std::fs::remove_dir_all(&self.0).ok();
        }
    }

    fn setup(tag: &str) -> (Dir, PathBuf) {
        let dir = std::env::temp_dir().join(format!("nas-store-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let image = dir.join("disk.raw");
        let data: Vec<u8> = (0..(3 * REGION + 8192))
            .map(|i| (i / 4096 % 251) as u8)
            .collect();
        std::fs::write(&image, data).unwrap();
        (Dir(dir), image)
    }

    /// One server lifetime: prepare, apply `writes` through the hashing layer, and finish
    /// cleanly unless `crash`.
    fn lifetime(dir: &Path, image: &Path, writes: &[(u64, u8, usize)], crash: bool) -> Recovery {
        let store = IndexStore::open(&dir.join("idx")).unwrap();
        let file = FileExport::open(image, false).unwrap();
        let (table, journal, recovery) = store.prepare("disk", file.file()).unwrap();
        assert_eq!(
            table,
            hash_file(file.file(), file.size()).unwrap(),
            "{recovery:?}"
        );
        let index = Arc::new(BlockIndex::new());
        index.install(1, table);
        let e = HashingExport::new(file, index.clone(), 1).with_journal(journal);
        for &(offset, byte, len) in writes {
            e.write_at(&vec![byte; len], offset, false).unwrap();
        }
        e.flush().unwrap();
        if !crash {
            store
                .finish(
                    "disk",
                    e.inner().file(),
                    &index.table(1).unwrap(),
                    e.journal().unwrap(),
                )
                .unwrap();
        }
        recovery
    }

    #[test]
    fn restarts_load_rehash_only_what_changed() {
        let (dir, image) = setup("restart");
        let d = &dir.0;
        assert_eq!(
            lifetime(d, &image, &[(5000, 1, 100)], false),
            Recovery::Fresh
        );
        assert_eq!(
            lifetime(d, &image, &[(2 * REGION, 2, 4096)], false),
            Recovery::Clean
        );
        // Crash after writes in two regions: the next start rehashes just those.
        assert_eq!(
            lifetime(d, &image, &[(10, 3, 10), (REGION + 7, 4, 9000)], true),
            Recovery::Clean
        );
        assert_eq!(
            lifetime(d, &image, &[], false),
            Recovery::Journal { regions: 2 }
        );
        assert_eq!(lifetime(d, &image, &[], false), Recovery::Clean);
        // Changed behind the server's back while stopped.
        std::thread::sleep(std::time::Duration::from_millis(10));
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[9u8; 4096], 0).unwrap();
        drop(f);
        assert!(matches!(
            lifetime(d, &image, &[], false),
            Recovery::Rebuilt { .. }
        ));
        // A crash whose journal was lost (as after a reboot) is not trusted.
        lifetime(d, &image, &[(0, 5, 4096)], true);
        let store = IndexStore::open(&d.join("idx")).unwrap();
        std::fs::remove_file(store.journal_path("disk")).unwrap();
        drop(store);
        assert!(matches!(
            lifetime(d, &image, &[], false),
            Recovery::Rebuilt { .. }
        ));
    }
}
