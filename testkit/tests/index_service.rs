//! The index service and the library's clients against a running server: scoped lookups,
//! shared exports, block hashes by offset, the hot-set stream, the refusal of another protocol
//! version, and the async NBD client's coalesced, pipelined reads.
use std::time::Duration;

use blockhash::hash_block;
use nas_client::{
    index::{HotReplica, IndexClient, IndexClientError},
    nbd::NbdClient,
};
use nas_proto::index::{ErrorCode, Found, Frame, VERSION};
use testkit::{
    nbd_fixture::{ExportConf, NbdFixture},
    pattern, Scratch,
};

const MIB: usize = 1 << 20;

fn block(data: &[u8], n: usize) -> &[u8] {
    &data[n * 4096..(n + 1) * 4096]
}

struct World {
    _dir: Scratch,
    server: NbdFixture,
    vm1: Vec<u8>,
    vm2: Vec<u8>,
    base: Vec<u8>,
}

fn world() -> World {
    let dir = Scratch::new("index-service");
    let (vm1, vm2, base) = (
        pattern(1, 4 * MIB),
        pattern(2, 4 * MIB),
        pattern(3, 4 * MIB),
    );
    let paths = ["vm1", "vm2", "base"].map(|n| dir.path(&format!("{n}.raw")));
    for (p, d) in paths.iter().zip([&vm1, &vm2, &base]) {
        std::fs::write(p, d).unwrap();
    }
    let conf = |name, i: usize, shared| ExportConf {
        name,
        path: &paths[i],
        read_only: shared,
        shared,
    };
    let server = NbdFixture::start_with(
        &[
            conf("vm1", 0, false),
            conf("vm2", 1, false),
            conf("base", 2, true),
        ],
        1024,
    );
    World {
        _dir: dir,
        server,
        vm1,
        vm2,
        base,
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn lookups_stay_within_scope_plus_shared_exports() {
    let w = world();
    rt().block_on(async {
        let mut c = IndexClient::connect(&w.server.index_addr, &["vm1".into()])
            .await
            .expect("connect");
        let names: Vec<&str> = c.scope().iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            ["vm1", "base"],
            "scope is the named export plus shared ones"
        );
        let hashes: Vec<_> = [
            block(&w.vm1, 7),
            block(&w.vm2, 7),
            block(&w.base, 9),
            &[0u8; 4096][..],
        ]
        .iter()
        .map(|b| hash_block(b).unwrap_or([0; 32]))
        .collect();
        let found = c.lookup(&hashes).await.expect("lookup");
        assert_eq!(
            found[0],
            Some(Found {
                export: 1,
                offset: 7 * 4096
            })
        );
        assert_eq!(
            found[1], None,
            "vm2's content must not be visible to a vm1 session"
        );
        assert_eq!(
            found[2],
            Some(Found {
                export: 3,
                offset: 9 * 4096
            })
        );
        assert_eq!(found[3], None);
        // Block hashes by offset, within scope; out of scope is refused, and the session goes on.
        let got = c.block_hashes(1, 6, 3).await.expect("block hashes");
        assert_eq!(
            got,
            (6..9)
                .map(|n| hash_block(block(&w.vm1, n)))
                .collect::<Vec<_>>()
        );
        match c.block_hashes(2, 0, 1).await {
            Err(IndexClientError::Refused {
                code: ErrorCode::OutOfScope,
                ..
            }) => {}
            other => panic!("expected OutOfScope, got {other:?}"),
        }
        assert_eq!(c.lookup(&hashes[..1]).await.unwrap()[0], found[0]);
        // An unknown export in HELLO is refused outright.
        match IndexClient::connect(&w.server.index_addr, &["nope".into()]).await {
            Err(IndexClientError::Refused {
                code: ErrorCode::UnknownExport,
                ..
            }) => {}
            other => panic!("expected UnknownExport, got {:?}", other.map(|_| ())),
        }
    });
}

#[test]
fn lookups_see_writes_immediately() {
    let w = world();
    rt().block_on(async {
        let mut c = IndexClient::connect(&w.server.index_addr, &["vm1".into()])
            .await
            .unwrap();
        let fresh = pattern(99, 4096);
        let h = hash_block(&fresh).unwrap();
        let old = hash_block(block(&w.vm1, 3)).unwrap();
        assert_eq!(c.lookup(&[h]).await.unwrap()[0], None);
        testkit::run_ok(
            std::process::Command::new("qemu-io")
                .args(["-f", "raw", "-c", "write -P 0 12288 4096"])
                .arg(w.server.uri("vm1")),
        );
        // Block 3 is now all zeroes: its old hash is gone.
        assert_eq!(c.lookup(&[old]).await.unwrap()[0], None);
        let mut nbd = nbd_crate_client(&w.server, "vm1");
        use std::io::{Seek, SeekFrom, Write};
        nbd.seek(SeekFrom::Start(5 * 4096)).unwrap();
        nbd.write_all(&fresh).unwrap();
        assert_eq!(
            c.lookup(&[h]).await.unwrap()[0],
            Some(Found {
                export: 1,
                offset: 5 * 4096
            })
        );
    });
}

#[test]
fn a_client_of_another_protocol_version_is_refused_with_the_version_error() {
    use std::io::{Read, Write};
    let w = world();
    let nas_proto::Endpoint::Tcp(addr) = w.server.index_addr else {
        panic!("the fixture's index service listens on TCP");
    };
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let hello = Frame::Hello {
        version: VERSION - 1,
        exports: vec!["vm1".into()],
    };
    tcp.write_all(&hello.to_bytes()).unwrap();
    // The server answers with ERROR (code 1, naming its version) and closes.
    let mut reply = Vec::new();
    tcp.read_to_end(&mut reply).unwrap();
    let (frame, used) = Frame::parse(&reply).unwrap();
    assert_eq!(used, reply.len(), "nothing after the ERROR");
    let Frame::Error { code, message, .. } = frame else {
        panic!("expected ERROR, got {frame:?}");
    };
    assert_eq!(code, ErrorCode::Version);
    assert!(message.contains(&format!("version {VERSION}")), "{message}");
}

/// The next frame of a hot-set subscription, which must come within 10 s.
async fn next_change(c: &mut IndexClient) -> Frame {
    tokio::time::timeout(Duration::from_secs(10), c.recv())
        .await
        .expect("hot-set change within 10 s")
        .unwrap()
}

fn nbd_crate_client(
    server: &NbdFixture,
    export: &str,
) -> nbd::client::NbdClient<std::net::TcpStream> {
    let mut tcp = std::net::TcpStream::connect(server.addr).unwrap();
    let e = nbd::client::handshake(&mut tcp, export.as_bytes()).unwrap();
    nbd::client::NbdClient::new(tcp, &e)
}

#[test]
fn hot_set_streams_reads_and_writes() {
    let w = world();
    rt().block_on(async {
        let mut c = IndexClient::connect(&w.server.index_addr, &["vm1".into()])
            .await
            .unwrap();
        c.subscribe_hot().await.unwrap();
        let mut replica = HotReplica::default();
        // Two resets (vm1 and base), both empty.
        for _ in 0..2 {
            let f = c.recv().await.unwrap();
            assert!(matches!(f, Frame::Hot { reset: Some(0), .. }), "{f:?}");
            replica.apply(&f);
        }
        // A guest reads 64 KiB at 1 MiB through NBD.
        let mut nbd = NbdClient::connect(&w.server.listen(), "vm1").await.unwrap();
        let ranges: Vec<(u64, u32)> = (0..16).map(|i| (MIB as u64 + i * 4096, 4096)).collect();
        nbd.read_many(&ranges, 4).await.unwrap();
        while replica.len() < 16 {
            replica.apply(&next_change(&mut c).await);
        }
        let h = hash_block(block(&w.vm1, 256 + 5)).unwrap();
        assert_eq!(
            replica.get(&h),
            Some(Found {
                export: 1,
                offset: (MIB + 5 * 4096) as u64
            })
        );
        // A guest rewrites block 5 of that range and zeroes block 6. Each change names the
        // hash it replaces, so the replica forgets both old contents and learns the new one.
        let old6 = hash_block(block(&w.vm1, 256 + 6)).unwrap();
        let new5 = hash_block(&[0x5a; 4096]).unwrap();
        testkit::run_ok(
            std::process::Command::new("qemu-io")
                .args(["-f", "raw"])
                .args(["-c", &format!("write -P 0x5a {} 4096", MIB + 5 * 4096)])
                .args(["-c", &format!("write -z {} 4096", MIB + 6 * 4096)])
                .arg(w.server.uri("vm1")),
        );
        while replica.get(&new5).is_none() || replica.get(&old6).is_some() {
            replica.apply(&next_change(&mut c).await);
        }
        assert_eq!(replica.get(&h), None, "the rewritten block's old content");
        assert_eq!(
            replica.get(&new5),
            Some(Found {
                export: 1,
                offset: (MIB + 5 * 4096) as u64
            })
        );
        assert_eq!(replica.len(), 15);
        nbd.disconnect().await.unwrap();
    });
}

#[test]
fn nbd_client_reads_coalesced_and_pipelined() {
    let w = world();
    rt().block_on(async {
        let mut nbd = NbdClient::connect(&w.server.listen(), "vm2").await.unwrap();
        assert_eq!(nbd.size(), 4 * MIB as u64);
        // Scattered and adjacent blocks, in no particular order, one past the end.
        let mut ranges: Vec<(u64, u32)> = [9u64, 3, 4, 5, 700, 701, 2, 1000]
            .iter()
            .map(|b| (b * 4096, 4096))
            .collect();
        ranges.push((4 * MIB as u64, 4096));
        let got = nbd.read_many(&ranges, 3).await.unwrap();
        for (i, (offset, _)) in ranges.iter().enumerate().take(8) {
            let n = (*offset / 4096) as usize;
            assert_eq!(got[i].as_deref(), Ok(block(&w.vm2, n)), "block {n}");
        }
        assert_eq!(got[8], Err(22), "a read past the end gets EINVAL");
        nbd.disconnect().await.unwrap();
        assert!(NbdClient::connect(&w.server.listen(), "missing")
            .await
            .is_err());
    });
}
