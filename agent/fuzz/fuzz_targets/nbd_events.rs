//! The NBD decoder and the memory-to-disk map on arbitrary event sequences (what a followed
//! QEMU's syscalls could show, a misbehaving or hostile NBD peer included): neither panics,
//! every place the decoder reports is a real piece of an event's iovecs, and it never locates
//! more bytes than the events moved.
//!
//! Input: events one after another, each `kind u8 | ret u16 | head_len u8 | head | n u8 |
//! n x (base u32, len u16)`, big-endian; a cut-short event ends the input.
#![no_main]

use agent::telemetry::{
    memmap::{MemoryMap, PageReader, RamBlock},
    nbd_decode::{Decoder, Observed},
};
use agent_common::syscalls::{IoEvent, IoVec, HEAD_BYTES, MAX_IOV};
use libfuzzer_sys::fuzz_target;

struct Fake;

impl PageReader for Fake {
    fn read(&mut self, addr: u64, out: &mut [u8]) -> std::io::Result<()> {
        out.fill((addr >> 12) as u8 | 1);
        Ok(())
    }
}

fn events(mut data: &[u8]) -> Vec<IoEvent> {
    let mut out = Vec::new();
    let mut take = |n: usize| -> Option<Vec<u8>> {
        let (a, b) = (data.get(..n)?, data.get(n..)?);
        let v = a.to_vec();
        data = b;
        Some(v)
    };
    while let Some(h) = take(4) {
        let mut ev = IoEvent {
            kind: u32::from(h[0] % 6),
            tgid: 1,
            fd: 3,
            ret: i64::from(u16::from_be_bytes([h[1], h[2]])),
            ..IoEvent::default()
        };
        let head_len = usize::from(h[3]) % (HEAD_BYTES + 1);
        let Some(head) = take(head_len) else { break };
        ev.head[..head_len].copy_from_slice(&head);
        ev.head_len = head_len as u32;
        let Some(n) = take(1) else { break };
        let n = usize::from(n[0]) % (MAX_IOV + 3);
        ev.iov_total = n as u32;
        for i in 0..n {
            let Some(v) = take(6) else { break };
            if i < MAX_IOV {
                ev.iov[i] = IoVec {
                    base: u64::from(u32::from_be_bytes([v[0], v[1], v[2], v[3]])) << 8,
                    len: u64::from(u16::from_be_bytes([v[4], v[5]])),
                };
                ev.iov_count = (i + 1) as u32;
            }
        }
        out.push(ev);
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let evs = events(data);
    let moved: u64 = evs.iter().map(|e| e.ret.max(0) as u64).sum();
    let mut decoder = Decoder::new();
    let mut map = MemoryMap::new(vec![RamBlock {
        name: "pc.ram".into(),
        host: 1 << 20,
        len: 64 << 20,
    }]);
    let mut seen = Vec::new();
    for ev in &evs {
        seen.clear();
        decoder.event(ev, &mut seen);
        for o in &seen {
            match *o {
                Observed::Landed {
                    offset, addr, len, ..
                } => {
                    assert!(len > 0 && addr != 0);
                    assert!(ev
                        .iovecs()
                        .iter()
                        .any(|v| addr >= v.base && addr + len <= v.base + v.len));
                    map.landed(0, offset, addr, len, &mut Fake);
                }
                Observed::Stored {
                    offset, addr, len, ..
                } => {
                    assert!(len > 0 && addr != 0);
                    map.stored(0, offset, addr, len, &mut Fake);
                }
                Observed::Changed { offset, len, .. } => map.changed(0, offset, len),
            }
        }
    }
    let stats = decoder.stats();
    assert!(stats.located_bytes + stats.unlocated_bytes <= moved);
    assert!(map.len() <= (64 << 20) / 4096);
});
