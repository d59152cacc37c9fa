//! The fetch stage: mapped pages read from the storage (over NBD, coalesced and pipelined, or
//! from a shared image file; see [`super::storage`]), several rounds in parallel, each verified against the hash the source sent; a page that cannot be
//! read or does not verify is asked of the source (FALLBACK_REQ).
use std::{collections::HashMap, sync::Arc};

use blockhash::multi::hash_present;
use nas_proto::Endpoint;
use tokio::sync::mpsc;

use super::{
    deliver::Cell,
    storage::{self, BlockSource},
    TargetConfig,
};
use crate::migration::{
    link::{Hash, LinkFrame},
    report::Counters,
    stream::PAGE_SIZE,
};

pub(super) struct Fetch {
    pub(super) seq: u64,
    pub(super) export: u32,
    pub(super) offset: u64,
    pub(super) hash: Hash,
    pub(super) cell: Arc<Cell>,
}

/// Fetches mapped pages from the NAS, verifies them, and asks the source for any it cannot
/// get or verify.
pub(super) async fn fetch_loop(
    requests: Arc<tokio::sync::Mutex<mpsc::Receiver<Fetch>>>,
    nas: Option<Endpoint>,
    names: HashMap<u32, String>,
    back: mpsc::Sender<LinkFrame>,
    counters: Arc<Counters>,
    config: TargetConfig,
) {
    let mut clients: HashMap<u32, Option<BlockSource>> = HashMap::new();
    loop {
        let round = {
            let mut queue = requests.lock().await;
            let Some(first) = queue.recv().await else {
                return;
            };
            let mut round = vec![first];
            while round.len() < 256 {
                match queue.try_recv() {
                    Ok(f) => round.push(f),
                    Err(_) => break,
                }
            }
            round
        };
        let mut by_export: HashMap<u32, Vec<Fetch>> = HashMap::new();
        for f in round {
            by_export.entry(f.export).or_default().push(f);
        }
        for (export, fetches) in by_export {
            counters.fetches.begin();
            let client = match clients.get_mut(&export) {
                Some(c) => c,
                None => {
                    let c = match names.get(&export) {
                        Some(name) => {
                            let opened = storage::open(name, nas.as_ref(), &config);
                            match tokio::time::timeout(config.fetch_timeout, opened).await {
                                Ok(Ok(c)) => Some(c),
                                Ok(Err(e)) => {
                                    tracing::warn!("export {name}: {e}; using fallbacks");
                                    None
                                }
                                Err(_) => {
                                    tracing::warn!("export {name}: connect timed out");
                                    None
                                }
                            }
                        }
                        None => None,
                    };
                    clients.entry(export).or_insert(c)
                }
            };
            let results = match client.as_mut() {
                Some(c) => {
                    let ranges: Vec<(u64, u32)> = fetches
                        .iter()
                        .map(|f| (f.offset, PAGE_SIZE as u32))
                        .collect();
                    match tokio::time::timeout(
                        config.fetch_timeout,
                        c.read_many(&ranges, config.fetch_window),
                    )
                    .await
                    {
                        Ok(Ok(r)) => Some(r),
                        Ok(Err(e)) => {
                            tracing::warn!(export, "NAS read failed: {e}; using fallbacks");
                            None
                        }
                        Err(_) => {
                            tracing::warn!(export, "NAS read timed out; using fallbacks");
                            None
                        }
                    }
                }
                None => None,
            };
            if results.is_none() {
                // A broken connection is not reused.
                clients.insert(export, None);
            }
            // Every page that arrived whole is hashed, the round's pages together.
            let mut data: Vec<Option<Vec<u8>>> = results
                .map(|r| {
                    r.into_iter()
                        .map(|d| d.ok().filter(|d| d.len() == PAGE_SIZE))
                })
                .into_iter()
                .flatten()
                .collect();
            let mut hashes = Vec::new();
            {
                let whole: Vec<Option<&[u8; PAGE_SIZE]>> = data
                    .iter()
                    .map(|d| {
                        d.as_deref()
                            .map(|d| d.try_into().expect("kept only whole pages"))
                    })
                    .collect();
                hash_present(&whole, &mut hashes);
            }
            for (i, f) in fetches.into_iter().enumerate() {
                let verified = data
                    .get_mut(i)
                    .and_then(Option::take)
                    .filter(|_| hashes[i] == Some(f.hash))
                    .and_then(|d| Box::<[u8; PAGE_SIZE]>::try_from(d).ok());
                match verified {
                    Some(page) => {
                        Counters::add(&counters.nas_bytes, PAGE_SIZE as u64);
                        f.cell.set(page);
                    }
                    None => {
                        Counters::add(&counters.fallbacks, 1);
                        if back
                            .send(LinkFrame::FallbackReq { seq: f.seq })
                            .await
                            .is_err()
                        {
                            counters.fetches.end(1);
                            return;
                        }
                    }
                }
            }
            counters.fetches.end(1);
        }
    }
}
