//! A whole NBD session from untrusted bytes: the handshake, then (if the input negotiated an
//! export) the transmission phase against an in-memory export. Any panic, hang or unbounded
//! allocation is a bug.
#![no_main]

use std::{
    io,
    sync::{Arc, Mutex},
};

use libfuzzer_sys::fuzz_target;
use nas_server::{
    export::{Export, ExportEntry, Exports, Extent},
    nbd::{handshake::handshake, transmission::serve},
};
use tokio::io::AsyncWriteExt;

struct MemExport(Mutex<Vec<u8>>);

impl Export for MemExport {
    fn size(&self) -> u64 {
        self.0.lock().unwrap().len() as u64
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let d = self.0.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, data: &[u8], offset: u64, _fua: bool) -> io::Result<()> {
        let mut d = self.0.lock().unwrap();
        d[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn trim(&self, offset: u64, length: u64, _fua: bool) -> io::Result<()> {
        self.write_zeroes(offset, length, true, false)
    }
    fn write_zeroes(&self, offset: u64, length: u64, _p: bool, _f: bool) -> io::Result<()> {
        let mut d = self.0.lock().unwrap();
        d[offset as usize..(offset + length) as usize].fill(0);
        Ok(())
    }
    fn cache(&self, _offset: u64, _length: u64) -> io::Result<()> {
        Ok(())
    }
    fn block_status(&self, _offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        Ok(vec![Extent { length, flags: 0 }])
    }
}

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let exports = Exports::new(vec![ExportEntry {
            name: "disk".into(),
            description: String::new(),
            export: Arc::new(MemExport(Mutex::new(vec![0; 1 << 16]))),
            allow: Vec::new(),
        }]);
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        let input = data.to_vec();
        let feeder = tokio::spawn(async move {
            // Replies are drained so the server never blocks on a full pipe.
            let (mut rd, mut wr) = tokio::io::split(&mut client);
            let drain = async {
                let mut sink = tokio::io::sink();
                let _ = tokio::io::copy(&mut rd, &mut sink).await;
            };
            let feed = async {
                let _ = wr.write_all(&input).await;
                let _ = wr.shutdown().await;
            };
            tokio::join!(drain, feed);
        });
        if let Ok(n) = handshake(&mut server, &exports).await {
            let (_stop, stop_rx) = tokio::sync::watch::channel(false);
            let _ = serve(server, n, stop_rx).await;
        } else {
            drop(server);
        }
        let _ = feeder.await;
    });
});
