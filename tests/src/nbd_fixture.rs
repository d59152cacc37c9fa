//! An in-process nas-server on an ephemeral loopback port, for tests that drive it with real
//! NBD clients (qemu-io, qemu-img, nbdinfo, nbdcopy, the `nbd` crate).
use std::{net::SocketAddr, path::Path, sync::Arc, thread};

use nas_server::{
    export::{file::FileExport, hashing::HashingExport, Export, ExportEntry, Exports},
    index::{build::hash_file, BlockIndex},
    server::{Listen, NbdServer},
};
use tokio::sync::watch;

/// A running server; dropping it shuts it down and waits for the drain.
pub struct NbdFixture {
    pub addr: SocketAddr,
    /// The block index; export `i` of `start`'s list has id `i + 1`.
    pub index: Arc<BlockIndex>,
    stop: watch::Sender<bool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl NbdFixture {
    /// Serves `exports` as (name, path, read_only).
    /// Each export is indexed and wrapped in the hashing layer, as the binary does.
    pub fn start(exports: &[(&str, &Path, bool)]) -> Self {
        let index = Arc::new(BlockIndex::new());
        let entries = (1..)
            .zip(exports)
            .map(|(id, (name, path, ro))| {
                let file = FileExport::open(path, *ro)
                    .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
                index.install(
                    id,
                    hash_file(file.file(), file.size()).expect("index export"),
                );
                ExportEntry {
                    name: name.to_string(),
                    description: String::new(),
                    export: Arc::new(HashingExport::new(file, index.clone(), id)),
                }
            })
            .collect();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let listen = [Listen::Tcp("127.0.0.1:0".parse().unwrap())];
        let server = runtime
            .block_on(NbdServer::bind(Exports::new(entries), &listen, 64))
            .expect("bind loopback");
        let Listen::Tcp(addr) = server.local_addrs()[0].clone() else {
            unreachable!("bound TCP")
        };
        let (stop, stop_rx) = watch::channel(false);
        let thread = thread::spawn(move || runtime.block_on(server.run(stop_rx)));
        Self {
            addr,
            index,
            stop,
            thread: Some(thread),
        }
    }

    /// `nbd://127.0.0.1:PORT/NAME`.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.addr)
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
