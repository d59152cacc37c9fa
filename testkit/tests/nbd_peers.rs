//! nas-server against real NBD peers: qemu-io, qemu-img, nbdinfo, nbdcopy and the `nbd`
//! crate's independent client.
use std::{
    io::{Read, Seek, SeekFrom, Write},
    net::TcpStream,
    process::Command,
};

use testkit::{nbd_fixture::NbdFixture, pattern, require_tool, run_ok, Scratch};

const MIB: u64 = 1 << 20;

fn qemu_io(uri: &str, commands: &[&str]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    cmd.arg(uri);
    let out = run_ok(&mut cmd);
    // qemu-io reports per-command failures on stdout and still exits 0.
    for bad in ["Pattern verification failed", "failed:", "error"] {
        assert!(
            !out.contains(bad),
            "qemu-io {commands:?} reported {bad:?}:\n{out}"
        );
    }
    out
}

#[test]
fn qemu_io_patterns_unaligned_large_discard_zero() {
    require_tool("qemu-io");
    let dir = Scratch::new("qemu-io");
    let image = dir.image("disk.raw", 128 * MIB);
    let server = NbdFixture::start(&[("disk", &image, false)]);
    let uri = server.uri("disk");
    qemu_io(
        &uri,
        &[
            "write -P 0xa5 0 4k",
            "read -P 0xa5 0 4k",
            // Unaligned offset and length.
            "write -P 0x3c 4097 12345",
            "read -P 0x3c 4097 12345",
            "read -P 0xa5 0 4096",
            // Larger than the 32 MiB maximum payload: qemu splits it.
            "write -P 0x77 16M 40M",
            "read -P 0x77 16M 40M",
            "discard 16M 4M",
            "read -P 0 16M 4M",
            "write -z 24M 1M",
            "read -P 0 24M 1M",
            "write -z -u 25M 1M",
            "read -P 0 25M 1M",
            "read -P 0x77 26M 30M",
            "flush",
        ],
    );
    drop(server);
    let bytes = std::fs::read(&image).unwrap();
    assert!(
        bytes[..4096].iter().all(|&b| b == 0xa5),
        "first block not on disk"
    );
    assert!(bytes[4097..4097 + 12345].iter().all(|&b| b == 0x3c));
    assert!(bytes[(26 * MIB) as usize..(56 * MIB) as usize]
        .iter()
        .all(|&b| b == 0x77));
    assert!(bytes[(16 * MIB) as usize..(20 * MIB) as usize]
        .iter()
        .all(|&b| b == 0));
}

#[test]
fn qemu_img_convert_in_and_out_then_compare() {
    require_tool("qemu-img");
    let dir = Scratch::new("qemu-img");
    let source = dir.path("source.raw");
    let mut data = pattern(42, (24 * MIB) as usize);
    // Leave zero runs so sparse handling is exercised too.
    data[(4 * MIB) as usize..(8 * MIB) as usize].fill(0);
    std::fs::write(&source, &data).unwrap();
    let target = dir.image("target.raw", 24 * MIB);
    let server = NbdFixture::start(&[("vm", &target, false)]);
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&source)
            .arg(server.uri("vm")),
    );
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&source)
            .arg(server.uri("vm")),
    );
    let copy = dir.path("copy.raw");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(server.uri("vm"))
            .arg(&copy),
    );
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&source)
            .arg(&copy),
    );
    drop(server);
    assert_eq!(std::fs::read(&target).unwrap(), data);
}

#[test]
fn nbdinfo_lists_exports_and_maps_allocation() {
    require_tool("nbdinfo");
    require_tool("qemu-io");
    let dir = Scratch::new("nbdinfo");
    let a = dir.image("a.raw", 16 * MIB);
    let b = dir.image("b.raw", 8 * MIB);
    let server = NbdFixture::start(&[("alpha", &a, false), ("beta", &b, true)]);
    let list = run_ok(
        Command::new("nbdinfo")
            .args(["--list", "--json"])
            .arg(format!("nbd://{}", server.addr)),
    );
    assert!(list.contains("\"export-name\": \"alpha\""), "{list}");
    assert!(list.contains("\"export-name\": \"beta\""), "{list}");
    let info = run_ok(Command::new("nbdinfo").arg(server.uri("beta")));
    assert!(info.contains("is_read_only: true"), "{info}");
    assert!(info.contains("can_multi_conn: true"), "{info}");
    assert!(info.contains("block_size_maximum: 33554432"), "{info}");
    qemu_io(&server.uri("alpha"), &["write -P 1 1M 2M"]);
    let map = run_ok(
        Command::new("nbdinfo")
            .arg("--map")
            .arg(server.uri("alpha")),
    );
    let rows: Vec<(u64, u64, String)> = map
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[3..].join(" "),
            )
        })
        .collect();
    assert_eq!(rows.iter().map(|r| r.1).sum::<u64>(), 16 * MIB, "{map}");
    assert!(
        rows.iter()
            .any(|(off, len, kind)| kind == "data" && *off <= MIB && off + len >= 3 * MIB),
        "written range not reported as data:\n{map}"
    );
    assert!(rows.iter().any(|(_, _, kind)| kind == "hole,zero"), "{map}");
}

#[test]
fn nbdcopy_round_trip() {
    require_tool("nbdcopy");
    let dir = Scratch::new("nbdcopy");
    let source = dir.path("src.raw");
    let data = pattern(7, (20 * MIB) as usize);
    std::fs::write(&source, &data).unwrap();
    let disk = dir.image("disk.raw", 20 * MIB);
    let server = NbdFixture::start(&[("d", &disk, false)]);
    run_ok(Command::new("nbdcopy").arg(&source).arg(server.uri("d")));
    let back = dir.path("back.raw");
    run_ok(Command::new("nbdcopy").arg(server.uri("d")).arg(&back));
    assert_eq!(std::fs::read(&back).unwrap(), data);
}

fn nbd_client(server: &NbdFixture, export: &str) -> nbd::client::NbdClient<TcpStream> {
    let mut tcp = TcpStream::connect(server.addr).expect("connect");
    let export = nbd::client::handshake(&mut tcp, export.as_bytes()).expect("nbd crate handshake");
    nbd::client::NbdClient::new(tcp, &export)
}

#[test]
fn nbd_crate_client_reads_and_writes() {
    let dir = Scratch::new("nbd-crate");
    let disk = dir.image("disk.raw", 4 * MIB);
    let server = NbdFixture::start(&[("d", &disk, false)]);
    let mut c = nbd_client(&server, "d");
    let data = pattern(9, 64 * 1024);
    c.seek(SeekFrom::Start(MIB)).unwrap();
    c.write_all(&data).unwrap();
    c.flush().unwrap();
    let mut back = vec![0u8; data.len()];
    c.seek(SeekFrom::Start(MIB)).unwrap();
    c.read_exact(&mut back).unwrap();
    assert_eq!(back, data);
    assert_eq!(c.seek(SeekFrom::End(0)).unwrap(), 4 * MIB);
}

#[test]
fn multi_conn_writes_and_flushes_are_visible_everywhere() {
    let dir = Scratch::new("multi-conn");
    let disk = dir.image("disk.raw", 8 * MIB);
    let server = NbdFixture::start(&[("d", &disk, false)]);
    let writers: Vec<_> = (0..2u64)
        .map(|i| {
            let mut c = nbd_client(&server, "d");
            std::thread::spawn(move || {
                for j in 0..16u64 {
                    let block = pattern(i * 100 + j, 64 * 1024);
                    c.seek(SeekFrom::Start((i * 16 + j) * 65536)).unwrap();
                    c.write_all(&block).unwrap();
                }
                c.flush().unwrap();
            })
        })
        .collect();
    for w in writers {
        w.join().expect("writer thread");
    }
    // A third connection sees every write once both flushes were acknowledged.
    let mut reader = nbd_client(&server, "d");
    for i in 0..2u64 {
        for j in 0..16u64 {
            let mut got = vec![0u8; 65536];
            reader.seek(SeekFrom::Start((i * 16 + j) * 65536)).unwrap();
            reader.read_exact(&mut got).unwrap();
            assert_eq!(got, pattern(i * 100 + j, 65536), "block {i}/{j}");
        }
    }
    let on_disk = std::fs::read(&disk).unwrap();
    assert_eq!(&on_disk[..65536], &pattern(0, 65536)[..]);
}

#[test]
fn read_only_export_refuses_writes() {
    require_tool("qemu-io");
    let dir = Scratch::new("ro");
    let disk = dir.image("disk.raw", 4 * MIB);
    let server = NbdFixture::start(&[("ro", &disk, true)]);
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 4k"])
        .arg(server.uri("ro"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success()
            || text.contains("read-only")
            || text.contains("Operation not permitted"),
        "write to a read-only export was not refused: {text}"
    );
    assert!(std::fs::read(&disk).unwrap().iter().all(|&b| b == 0));
}
