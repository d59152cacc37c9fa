//! The lookup stage: pages the hot-set replica did not know are looked up in batches, one
//! LOOKUP per read, several in flight; replies fill their batch in request order. Losing the
//! index only costs savings.
use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, PoisonError},
};

use nas_client::index::{HotReplica, IndexClient, IndexClientError};
use nas_client::tls::SharedTls;
use nas_proto::{index::Frame, Endpoint};

use super::{
    collect::{Batch, Item},
    error::IndexReplyError,
    SourceError,
};
use crate::migration::report::Counters;

/// The index service went away: pages still waiting for an answer go in full, and no more
/// lookups are made. Only savings are lost; the stream stays exact.
pub(super) fn lose_index(
    index: &mut Option<IndexClient>,
    batches: &mut VecDeque<Batch>,
    e: &IndexClientError,
) {
    tracing::warn!("index service lost ({e}); sending the remaining pages in full");
    *index = None;
    for b in batches.iter_mut() {
        b.lookup = None;
    }
}

/// Fills the front-most pending batch with a lookup reply (replies come in request order).
pub(super) fn resolve(
    batches: &mut VecDeque<Batch>,
    reply: Frame,
    counters: &Counters,
) -> Result<(), SourceError> {
    let Frame::LookupReply { id, found } = reply else {
        return Err(IndexReplyError::Unexpected(format!("{reply:?}")).into());
    };
    let batch = batches
        .iter_mut()
        .find(|b| b.lookup.is_some())
        .ok_or(IndexReplyError::NoRequest)?;
    let (want, indexes) = batch.lookup.take().expect("found above");
    if want != id || indexes.len() != found.len() {
        return Err(IndexReplyError::Mismatch { got: id, want }.into());
    }
    counters.lookups.end(1);
    for (n, f) in indexes.into_iter().zip(found) {
        if let Item::Page { found, .. } = &mut batch.items[n] {
            *found = f;
        }
    }
    Ok(())
}

/// Keeps `replica` in step with the hot sets of `exports` until aborted. Failures only cost
/// savings (misses go to batched lookups), so they are logged, not fatal.
pub(super) async fn follow_hot_set(
    addr: Endpoint,
    exports: Vec<String>,
    replica: Arc<Mutex<HotReplica>>,
    tls: SharedTls,
) {
    let mut client = match IndexClient::connect_with(&addr, &exports, tls.as_deref()).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("hot-set replica unavailable: {e}");
            return;
        }
    };
    if let Err(e) = client.subscribe_hot().await {
        tracing::warn!("hot-set subscription failed: {e}");
        return;
    }
    loop {
        match client.recv().await {
            Ok(frame) => {
                replica
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .apply(&frame);
            }
            Err(e) => {
                tracing::warn!("hot-set stream ended: {e}");
                return;
            }
        }
    }
}
