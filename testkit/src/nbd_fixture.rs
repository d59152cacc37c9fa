//! An in-process nas-server (NBD server and index service) on ephemeral loopback ports, for
//! tests that drive it with real NBD clients (qemu-io, qemu-img, nbdinfo, nbdcopy, the `nbd`
//! crate) and with the index client. It wires exports exactly as the binary does: indexed at
//! start, wrapped in the hashing layer, each with a hot set.
use std::{net::SocketAddr, path::Path, sync::Arc, thread};

use nas_proto::{index::ExportInfo, Endpoint};
use nas_server::{
    export::{file::FileExport, hashing::HashingExport, Export, ExportEntry, Exports},
    index::{build::hash_file, hot::HotSet, BlockIndex},
    server::NbdServer,
    service::server::{CatalogEntry, IndexService},
};
use tokio::sync::watch;

/// One export of a fixture.
pub struct ExportConf<'a> {
    pub name: &'a str,
    pub path: &'a Path,
    pub read_only: bool,
    pub shared: bool,
}

/// A running server; dropping it shuts it down and waits for the drain.
pub struct NbdFixture {
    pub addr: SocketAddr,
    pub index_addr: Endpoint,
    /// The block index; export `i` of the list has id `i + 1`.
    pub index: Arc<BlockIndex>,
    stop: watch::Sender<bool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl NbdFixture {
    /// Serves `exports` as (name, path, read_only), none shared, 65536-block hot sets.
    pub fn start(exports: &[(&str, &Path, bool)]) -> Self {
        let confs: Vec<ExportConf> = exports
            .iter()
            .map(|(name, path, read_only)| ExportConf {
                name,
                path,
                read_only: *read_only,
                shared: false,
            })
            .collect();
        Self::start_with(&confs, 65_536)
    }

    pub fn start_with(exports: &[ExportConf], hot_blocks: usize) -> Self {
        let index = Arc::new(BlockIndex::new());
        let mut entries = Vec::new();
        let mut catalog = Vec::new();
        for (id, conf) in (1..).zip(exports) {
            let file = FileExport::open(conf.path, conf.read_only)
                .unwrap_or_else(|e| panic!("open {}: {e}", conf.path.display()));
            index.install(
                id,
                hash_file(file.file(), file.size()).expect("index export"),
            );
            let hot = Arc::new(HotSet::new(id, hot_blocks));
            let export = HashingExport::new(file, index.clone(), id).with_hot_set(hot.clone());
            catalog.push(CatalogEntry {
                info: ExportInfo {
                    id,
                    size: export.size(),
                    shared: conf.shared,
                    name: conf.name.to_string(),
                },
                hot: Some(hot),
                allow: Vec::new(),
            });
            entries.push(ExportEntry {
                name: conf.name.to_string(),
                description: String::new(),
                export: Arc::new(export),
                allow: Vec::new(),
            });
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let loopback = [Endpoint::Tcp("127.0.0.1:0".parse().unwrap())];
        let (server, service) = runtime.block_on(async {
            (
                NbdServer::bind(Exports::new(entries), &loopback, 64)
                    .await
                    .expect("bind NBD on loopback"),
                IndexService::bind(catalog, index.clone(), &loopback, 64)
                    .await
                    .expect("bind the index service on loopback"),
            )
        });
        let Endpoint::Tcp(addr) = server.local_addrs()[0].clone() else {
            unreachable!("bound TCP")
        };
        let index_addr = service.local_addrs()[0].clone();
        let (stop, stop_rx) = watch::channel(false);
        let thread = thread::spawn(move || {
            runtime.block_on(async {
                tokio::join!(server.run(stop_rx.clone()), service.run(stop_rx));
            })
        });
        Self {
            addr,
            index_addr,
            index,
            stop,
            thread: Some(thread),
        }
    }

    /// `nbd://127.0.0.1:PORT/NAME`.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.addr)
    }

    /// The NBD listener as a [`Listen`], for the library's clients.
    pub fn listen(&self) -> Endpoint {
        Endpoint::Tcp(self.addr)
    }
}

impl Drop for NbdFixture {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            t.join().ok();
        }
    }
}
