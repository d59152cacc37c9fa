//! Protocol violations get the protocol's own errors, the connection stays up where the spec
//! allows, and nothing a client sends brings the server down. Driven by a raw client written
//! here, byte by byte, so each malformed frame is exactly what the test says.
use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use testkit::{nbd_fixture::NbdFixture, pattern, Scratch};

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
const REP_ERR_INVALID: u32 = (1 << 31) | 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) | 6;
const EPERM: u32 = 1;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const SIZE: u64 = 1 << 20;
const MAX_PAYLOAD: u32 = 32 << 20;

struct Raw(TcpStream);

impl Raw {
    /// Connects and completes the greeting with fixed newstyle + no zeroes.
    fn connect(server: &NbdFixture) -> Self {
        let mut s = TcpStream::connect(server.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        assert_eq!(&greeting[8..16], b"IHAVEOPT");
        s.write_all(&3u32.to_be_bytes()).unwrap();
        Raw(s)
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.0.write_all(&b).unwrap();
    }

    /// Reads one option reply: (reply type, data).
    fn option_reply(&mut self) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.0.read_exact(&mut h).unwrap();
        assert_eq!(
            u64::from_be_bytes(h[..8].try_into().unwrap()),
            0x0003_e889_0455_65a9
        );
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        self.0.read_exact(&mut data).unwrap();
        (kind, data)
    }

    /// Reads replies up to the final one and returns its type.
    fn final_reply(&mut self) -> u32 {
        loop {
            let (kind, _) = self.option_reply();
            if kind == REP_ACK || kind & (1 << 31) != 0 {
                return kind;
            }
        }
    }

    fn go(&mut self, name: &str) -> u32 {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        self.option(OPT_GO, &d);
        self.final_reply()
    }

    fn request(&mut self, flags: u16, kind: u16, cookie: u64, offset: u64, length: u32) {
        let mut b = 0x2560_9513u32.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&length.to_be_bytes());
        self.0.write_all(&b).unwrap();
    }

    /// Reads a simple reply: (error, cookie).
    fn simple_reply(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        self.0.read_exact(&mut h).unwrap();
        assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), 0x6744_6698);
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    }

    fn read_ok(&mut self, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        self.request(0, 0, cookie, offset, len);
        assert_eq!(self.simple_reply(), (0, cookie));
        let mut data = vec![0u8; len as usize];
        self.0.read_exact(&mut data).unwrap();
        data
    }

    fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b), Ok(0) | Err(_))
    }
}

fn fixture(dir: &Scratch, read_only: bool) -> NbdFixture {
    let disk = dir.image("disk.raw", SIZE);
    NbdFixture::start(&[("d", &disk, read_only)])
}

#[test]
fn handshake_errors_use_option_reply_codes_and_continue() {
    let dir = Scratch::new("bad-handshake");
    let server = fixture(&dir, false);
    let mut c = Raw::connect(&server);
    c.option(99, b"whatever");
    assert_eq!(c.option_reply().0, REP_ERR_UNSUP);
    c.option(OPT_GO, b"\0\0\0\x09d\0\0");
    assert_eq!(c.final_reply(), REP_ERR_INVALID);
    assert_eq!(c.go("no-such-export"), REP_ERR_UNKNOWN);
    c.option(3, b"x"); // NBD_OPT_LIST takes no data
    assert_eq!(c.final_reply(), REP_ERR_INVALID);
    assert_eq!(c.go("d"), REP_ACK);
    assert_eq!(c.read_ok(1, 0, 512), vec![0u8; 512]);
}

#[test]
fn bad_client_flags_or_option_magic_close_the_connection() {
    let dir = Scratch::new("bad-magic");
    let server = fixture(&dir, false);
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&0x8000_0001u32.to_be_bytes()).unwrap();
    assert!(Raw(s).is_closed());
    let mut c = Raw::connect(&server);
    c.0.write_all(&[0xde; 16]).unwrap();
    assert!(c.is_closed());
}

#[test]
fn transmission_errors_keep_the_connection_up() {
    let dir = Scratch::new("bad-requests");
    let server = fixture(&dir, false);
    let mut c = Raw::connect(&server);
    assert_eq!(c.go("d"), REP_ACK);
    // Read past the end: EINVAL.
    c.request(0, 0, 10, SIZE - 512, 1024);
    assert_eq!(c.simple_reply(), (EINVAL, 10));
    // Write past the end: ENOSPC, and its payload is consumed.
    c.request(0, 1, 11, SIZE, 4096);
    c.0.write_all(&[0xee; 4096]).unwrap();
    assert_eq!(c.simple_reply(), (ENOSPC, 11));
    // Offset + length overflowing u64.
    c.request(0, 0, 12, u64::MAX - 10, 512);
    assert_eq!(c.simple_reply(), (EINVAL, 12));
    // Unknown command, and a flag not valid for READ.
    c.request(0, 42, 13, 0, 0);
    assert_eq!(c.simple_reply(), (EINVAL, 13));
    c.request(1, 0, 14, 0, 512);
    assert_eq!(c.simple_reply(), (EINVAL, 14));
    // BLOCK_STATUS without a negotiated meta context.
    c.request(0, 7, 15, 0, 4096);
    assert_eq!(c.simple_reply(), (EINVAL, 15));
    // Oversized write: the payload is drained unbuffered and the request refused.
    c.request(0, 1, 16, 0, MAX_PAYLOAD + 4096);
    let junk = vec![0x55u8; 1 << 20];
    for _ in 0..(MAX_PAYLOAD as usize + 4096).div_ceil(junk.len()) - 1 {
        c.0.write_all(&junk).unwrap();
    }
    c.0.write_all(&junk[..(MAX_PAYLOAD as usize + 4096) % junk.len()])
        .unwrap();
    assert_eq!(c.simple_reply(), (EINVAL, 16));
    // The connection still works and nothing was written.
    assert_eq!(c.read_ok(17, 0, 4096), vec![0u8; 4096]);
    let data = pattern(3, 4096);
    c.request(0, 1, 18, 8192, 4096);
    c.0.write_all(&data).unwrap();
    assert_eq!(c.simple_reply(), (0, 18));
    assert_eq!(c.read_ok(19, 8192, 4096), data);
    // Bad request magic ends the connection, as the spec requires.
    c.0.write_all(&[0u8; 28]).unwrap();
    assert!(c.is_closed());
}

#[test]
fn read_only_export_answers_eperm() {
    let dir = Scratch::new("ro-eperm");
    let server = fixture(&dir, true);
    let mut c = Raw::connect(&server);
    assert_eq!(c.go("d"), REP_ACK);
    c.request(0, 1, 1, 0, 512);
    c.0.write_all(&[1u8; 512]).unwrap();
    assert_eq!(c.simple_reply(), (EPERM, 1));
    c.request(0, 4, 2, 0, 512);
    assert_eq!(c.simple_reply(), (EPERM, 2));
    assert_eq!(c.read_ok(3, 0, 512), vec![0u8; 512]);
}

#[test]
fn random_garbage_never_takes_the_server_down() {
    let dir = Scratch::new("garbage");
    let server = fixture(&dir, false);
    for seed in 1..=64u64 {
        let junk = pattern(seed, 64 + (seed as usize * 37) % 4096);
        if let Ok(mut s) = TcpStream::connect(server.addr) {
            s.set_read_timeout(Some(Duration::from_millis(200))).ok();
            let mut greeting = [0u8; 18];
            s.read_exact(&mut greeting).ok();
            if seed % 2 == 0 {
                // Valid flags, then garbage options.
                s.write_all(&1u32.to_be_bytes()).ok();
            }
            s.write_all(&junk).ok();
            let mut sink = [0u8; 4096];
            let _ = s.read(&mut sink);
        }
        // Garbage after a valid handshake.
        let mut c = Raw::connect(&server);
        assert_eq!(c.go("d"), REP_ACK);
        c.0.write_all(&junk).ok();
    }
    let mut c = Raw::connect(&server);
    assert_eq!(c.go("d"), REP_ACK);
    assert_eq!(c.read_ok(1, 0, 4096).len(), 4096);
}
