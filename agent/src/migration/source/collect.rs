//! The collect stage: the parser's output for one read of QEMU's stream becomes a [`Batch`]
//! of items (verbatim ranges and pages), its pages hashed together and resolved against the
//! hot-set replica where it can. A read taken whole (the guest paused, the link keeping up)
//! keeps its pages' bytes as verbatim ranges instead: nothing to hash, match or fetch.
use std::{
    sync::{Arc, Mutex, PoisonError},
    time::Instant,
};

use blockhash::multi::hash_blocks;
use nas_client::index::HotReplica;
use nas_proto::index::Found;

use crate::migration::{
    link::Hash,
    pagemap::{Claim, PageMap},
    report::Counters,
    stream::{Sink, PAGE_SIZE},
};

/// Where a page's payload is: in the batch's read buffer, or (for a page that straddled two
/// reads) in its side buffer.
#[derive(Clone, Copy)]
pub(super) enum At {
    Input(usize),
    Side(usize),
}

pub(super) enum Item {
    /// Verbatim bytes, a range of the batch's side buffer.
    Raw(std::ops::Range<usize>),
    Page {
        hash: Hash,
        at: At,
        found: Option<Found>,
        needs_lookup: bool,
        /// The memory-to-disk map's claim for the page, until it is checked.
        claim: Option<Claim>,
        /// `found` came from the map (a checked claim), not the index.
        from_map: bool,
    },
}

/// Collects parser output into items; [`Collector::finish`] then hashes the read's pages
/// together. Payloads are referred to, not copied, wherever they lie whole in the read.
pub(super) struct Collector<'a> {
    pub(super) items: Vec<Item>,
    pub(super) side: Vec<u8>,
    pub(super) counters: &'a Counters,
    pub(super) replica: Option<&'a Mutex<HotReplica>>,
    pub(super) remote: bool,
    /// The memory-to-disk map, and the link's export id of each of the source's exports.
    pub(super) map: Option<(&'a dyn PageMap, &'a [Option<u32>])>,
    /// The claim for the page the parser is about to hand over.
    pub(super) claim: Option<Claim>,
    /// Pages go out as QEMU sent them, with the bytes around them.
    pub(super) whole: bool,
    /// Pages kept whole so far.
    pub(super) whole_pages: u64,
}

impl<'a> Collector<'a> {
    /// A collector that only frames: no replica, index, map or whole-page form.
    pub(super) fn new(counters: &'a Counters) -> Self {
        Self {
            items: Vec::new(),
            side: Vec::new(),
            counters,
            replica: None,
            remote: false,
            map: None,
            claim: None,
            whole: false,
            whole_pages: 0,
        }
    }

    /// A page kept as QEMU sent it: a full page on the link, counted as one.
    fn whole_page(&mut self, payload: &[u8; PAGE_SIZE]) {
        self.claim = None;
        self.whole_pages += 1;
        self.verbatim(payload);
    }

    pub(super) fn add_page(&mut self, at: At) {
        let claim = self.claim.take();
        self.items.push(Item::Page {
            hash: [0; 32],
            at,
            needs_lookup: false,
            found: None,
            claim,
            from_map: false,
        });
    }

    /// Hashes every page of the read (several per SIMD pass), then resolves what the hot-set
    /// replica knows and marks the rest for a lookup.
    pub(super) fn finish(mut self, input: Vec<u8>) -> Batch {
        let started = Instant::now();
        let mut hashes = Vec::new();
        {
            let pages: Vec<&[u8; PAGE_SIZE]> = self
                .items
                .iter()
                .filter_map(|item| match item {
                    Item::Page { at, .. } => Some(page_at(&input, &self.side, *at)),
                    Item::Raw(_) => None,
                })
                .collect();
            hash_blocks(&pages, &mut hashes);
        }
        Counters::add(&self.counters.hash_ns, started.elapsed().as_nanos() as u64);
        let whole = self.whole_pages;
        Counters::add(&self.counters.pages_full, hashes.len() as u64 + whole);
        Counters::add(&self.counters.pages_sent, whole);
        Counters::add(&self.counters.pages_verbatim, whole);
        let mut places = Vec::with_capacity(hashes.len());
        match self.replica.filter(|_| !hashes.is_empty()) {
            Some(replica) => replica
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get_many(&hashes, &mut places),
            None => places.resize(hashes.len(), None),
        }
        let mut resolved = hashes.into_iter().zip(places);
        let mut map_stale = 0;
        for item in &mut self.items {
            if let Item::Page {
                hash,
                found,
                needs_lookup,
                claim,
                from_map,
                ..
            } = item
            {
                (*hash, *found) = resolved.next().expect("one digest per page");
                // A claim counts only if the page still hashes to what the map recorded.
                if let (Some(c), Some((_, ids))) = (claim.take(), self.map) {
                    match ids.get(c.export).copied().flatten() {
                        Some(export) if c.hash == *hash => {
                            *found = Some(Found {
                                export,
                                offset: c.offset,
                            });
                            *from_map = true;
                        }
                        Some(_) => map_stale += 1,
                        None => {}
                    }
                }
                *needs_lookup = found.is_none() && self.remote;
            }
        }
        Counters::add(&self.counters.pages_map_stale, map_stale);
        Batch {
            input: Arc::new(input),
            side: self.side,
            items: self.items,
            lookup: None,
        }
    }
}

impl Sink for Collector<'_> {
    fn verbatim(&mut self, bytes: &[u8]) {
        let start = self.side.len();
        self.side.extend_from_slice(bytes);
        match self.items.last_mut() {
            Some(Item::Raw(range)) if range.end == start => range.end = self.side.len(),
            _ => self.items.push(Item::Raw(start..self.side.len())),
        }
    }

    fn page(&mut self, payload: &[u8; PAGE_SIZE]) {
        if self.whole {
            return self.whole_page(payload);
        }
        let at = At::Side(self.side.len());
        self.side.extend_from_slice(payload);
        self.add_page(at);
    }

    fn page_in_input(&mut self, offset: usize, payload: &[u8; PAGE_SIZE]) {
        if self.whole {
            return self.whole_page(payload);
        }
        self.add_page(At::Input(offset));
    }

    fn page_at(&mut self, block: &str, offset: u64) {
        if !self.whole {
            self.claim = self.map.and_then(|(map, _)| map.claim(block, offset));
        }
    }
}

/// One read from QEMU and what the parser found in it.
pub(super) struct Batch {
    /// Shared with the unacked store, which keeps mapped pages in place.
    pub(super) input: Arc<Vec<u8>>,
    pub(super) side: Vec<u8>,
    pub(super) items: Vec<Item>,
    /// Lookup in flight: (request id, indexes of the items it answers).
    pub(super) lookup: Option<(u32, Vec<usize>)>,
}

impl Batch {
    pub(super) fn page(&self, at: At) -> &[u8; PAGE_SIZE] {
        page_at(&self.input, &self.side, at)
    }
}

pub(super) fn page_at<'a>(input: &'a [u8], side: &'a [u8], at: At) -> &'a [u8; PAGE_SIZE] {
    let bytes = match at {
        At::Input(o) => &input[o..o + PAGE_SIZE],
        At::Side(o) => &side[o..o + PAGE_SIZE],
    };
    bytes.try_into().expect("a page is PAGE_SIZE bytes")
}
