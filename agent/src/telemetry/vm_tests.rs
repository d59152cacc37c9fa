//! The registry's parsers on QEMU 10's own output, and fd matching on a made-up /proc.
use serde_json::json;

use super::*;

const RAMBLOCKS: &str = "              Block Name    PSize              Offset               Used              Total                HVA  RO
                  pc.ram    4 KiB  0x0000000000000000 0x0000000008000000 0x0000000008000000 0x00007f840be00000  rw
    /rom@etc/acpi/tables    4 KiB  0x0000000008080000 0x0000000000020000 0x0000000000200000 0x00007f840ba00000  ro
                 pc.bios    4 KiB  0x0000000008000000 0x0000000000040000 0x0000000000040000 0x00007f8460c00000  ro
";

#[test]
fn ram_blocks_come_from_the_writable_rows() {
    assert_eq!(
        parse_ramblocks(RAMBLOCKS),
        vec![RamBlock {
            name: "pc.ram".into(),
            host: 0x7f84_0be0_0000,
            len: 128 << 20,
        }]
    );
}

#[test]
fn disks_say_how_they_can_be_followed() {
    let reply = json!([
        {"device": "virtio0", "inserted": {"drv": "raw", "file": "/srv/vm1.raw", "node-name": "#b1"}},
        {"device": "virtio1", "inserted": {"drv": "raw", "file": "nbd://127.0.0.1:10809/vm1", "node-name": "#b2"}},
        {"device": "", "inserted": {"drv": "raw", "node-name": "n3",
            "file": "json:{\"driver\": \"nbd\", \"server\": {\"type\": \"inet\", \"host\": \"10.0.0.5\", \"port\": \"10809\"}, \"export\": \"vm2\", \"tls-creds\": \"tls0\"}"}},
        {"device": "virtio3", "inserted": {"drv": "raw", "file": "nbd+unix:///vm3?socket=/run/nbd.sock"}},
        {"device": "virtio4", "inserted": {"drv": "raw", "node-name": "n5",
            "file": "json:{\"driver\": \"nbd\", \"server\": {\"type\": \"unix\", \"path\": \"/run/q.sock\"}, \"export\": \"vm4\"}"}},
        {"device": "virtio5", "inserted": {"drv": "raw", "file": "nbd+unix://?socket="}},
        {"device": "ide1-cd0"}
    ]);
    let disks = parse_disks(&reply);
    assert_eq!(disks.len(), 6);
    assert_eq!(
        disks[0].path,
        DiskPath::File {
            path: "/srv/vm1.raw".into()
        }
    );
    assert_eq!(
        disks[1].path,
        DiskPath::Nbd {
            server: NbdServer::Tcp("127.0.0.1:10809".parse().unwrap()),
            export: "vm1".into()
        }
    );
    assert_eq!(disks[2].device, "n3");
    assert!(matches!(&disks[2].path, DiskPath::Unfollowable { reason } if reason.contains("TLS")));
    assert_eq!(
        disks[3].path,
        DiskPath::Nbd {
            server: NbdServer::Unix("/run/nbd.sock".into()),
            export: "vm3".into()
        }
    );
    assert_eq!(
        disks[4].path,
        DiskPath::Nbd {
            server: NbdServer::Unix("/run/q.sock".into()),
            export: "vm4".into()
        }
    );
    assert!(
        matches!(&disks[5].path, DiskPath::Unfollowable { reason } if reason.contains("without a path"))
    );
}

#[test]
fn proc_addresses_parse_in_both_families() {
    assert_eq!(
        parse_proc_addr("0100007F:2A49", false),
        Some("127.0.0.1:10825".parse().unwrap())
    );
    assert_eq!(
        parse_proc_addr("0000000000000000FFFF00000100007F:2A49", true),
        Some("127.0.0.1:10825".parse().unwrap())
    );
    assert_eq!(
        parse_proc_addr("00000000000000000000000001000000:0050", true),
        Some("[::1]:80".parse().unwrap())
    );
}

#[test]
fn fds_are_matched_to_disks_by_path_and_by_socket_peer() {
    let dir = std::env::temp_dir().join(format!("vm-fds-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("fd")).unwrap();
    fs::create_dir_all(dir.join("net")).unwrap();
    std::os::unix::fs::symlink("/srv/vm1.raw", dir.join("fd/5")).unwrap();
    std::os::unix::fs::symlink("socket:[4242]", dir.join("fd/9")).unwrap();
    std::os::unix::fs::symlink("socket:[4343]", dir.join("fd/10")).unwrap();
    // Unix sockets: not in net/tcp; their peers come from the callback.
    std::os::unix::fs::symlink("socket:[4444]", dir.join("fd/11")).unwrap();
    std::os::unix::fs::symlink("socket:[4545]", dir.join("fd/12")).unwrap();
    std::os::unix::fs::symlink("/dev/null", dir.join("fd/0")).unwrap();
    fs::write(
        dir.join("net/tcp"),
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
         0: 0100007F:D431 0100007F:2A49 01 00000000:00000000 00:00000000 00000000     0        0 4242 1\n\
         1: 0100007F:D432 0100007F:0016 01 00000000:00000000 00:00000000 00000000     0        0 4343 1\n",
    )
    .unwrap();
    let disks = vec![
        Disk {
            device: "a".into(),
            path: DiskPath::File {
                path: "/srv/vm1.raw".into(),
            },
        },
        Disk {
            device: "b".into(),
            path: DiskPath::Nbd {
                server: NbdServer::Tcp("127.0.0.1:10825".parse().unwrap()),
                export: "x".into(),
            },
        },
        Disk {
            device: "c".into(),
            path: DiskPath::Nbd {
                server: NbdServer::Unix("/run/nbd.sock".into()),
                export: "y".into(),
            },
        },
    ];
    let peer = |fd: u32| match fd {
        11 => Some(PathBuf::from("/run/nbd.sock")),
        12 => Some(PathBuf::from("/run/other.sock")),
        _ => None,
    };
    let fds = match_fds(&dir, &disks, peer);
    fs::remove_dir_all(&dir).ok();
    assert_eq!(fds, HashMap::from([(5, 0), (9, 1), (11, 2)]));
}
