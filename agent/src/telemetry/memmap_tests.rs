//! The map on a fake guest memory: reads and writes map whole aligned pages, zero pages and
//! unaligned pieces are skipped, and writes, zeroing and discards invalidate what they touch.
use super::*;

const BASE: u64 = 0x7f00_0000_0000;

/// Guest memory as a byte vector at BASE.
struct Fake(Vec<u8>);

impl PageReader for Fake {
    fn read(&mut self, addr: u64, out: &mut [u8]) -> std::io::Result<()> {
        let at = (addr - BASE) as usize;
        out.copy_from_slice(&self.0[at..at + out.len()]);
        Ok(())
    }
}

fn memory(pages: usize) -> Fake {
    let mut m = vec![0u8; pages * PAGE as usize];
    for (i, p) in m.chunks_exact_mut(PAGE as usize).enumerate() {
        p.fill(i as u8 + 1);
    }
    Fake(m)
}

fn map(pages: u64) -> MemoryMap {
    MemoryMap::new(vec![RamBlock {
        name: "pc.ram".into(),
        host: BASE,
        len: pages * PAGE,
    }])
}

#[test]
fn a_landed_read_maps_its_whole_aligned_pages() {
    let mut mem = memory(8);
    let mut m = map(8);
    // Disk 64 KiB.. into pages 2..5.
    m.landed(1, 65536, BASE + 2 * PAGE, 3 * PAGE, &mut mem);
    assert_eq!(m.len(), 3);
    let e = m.get("pc.ram", 3 * PAGE).expect("page 3 mapped");
    assert_eq!((e.export, e.offset), (1, 65536 + PAGE));
    assert_eq!(e.hash, blockhash::hash(&[4u8; PAGE as usize]));
    assert!(m.get("pc.ram", 5 * PAGE).is_none());
}

#[test]
fn zero_pages_unaligned_pieces_and_foreign_memory_are_not_mapped() {
    let mut mem = memory(8);
    mem.0[PAGE as usize..2 * PAGE as usize].fill(0);
    let mut m = map(8);
    m.landed(0, 0, BASE + PAGE, PAGE, &mut mem);
    // Half a page, and a disk offset that is not a block boundary.
    m.landed(0, 8192, BASE + 2 * PAGE, 2048, &mut mem);
    m.landed(0, 512, BASE + 3 * PAGE, PAGE, &mut mem);
    // A bounce buffer outside guest RAM.
    m.landed(0, 0, 0x1000, PAGE, &mut mem);
    assert!(m.is_empty());
    let s = m.stats();
    assert_eq!((s.zero_pages, s.outside_ram), (1, 1));
    assert!(s.unaligned >= 2, "{s:?}");
}

#[test]
fn a_read_over_a_mapped_page_replaces_its_entry() {
    let mut mem = memory(4);
    let mut m = map(4);
    m.landed(0, 0, BASE, PAGE, &mut mem);
    mem.0[..PAGE as usize].fill(0x77);
    m.landed(0, 40960, BASE, PAGE, &mut mem);
    assert_eq!(m.len(), 1);
    let e = m.get("pc.ram", 0).unwrap();
    assert_eq!(e.offset, 40960);
    assert_eq!(e.hash, blockhash::hash(&[0x77; PAGE as usize]));
    // A partial read into the page drops it.
    m.landed(0, 0, BASE + 100, 200, &mut mem);
    assert!(m.is_empty());
}

#[test]
fn writes_and_zeroing_invalidate_every_page_of_their_blocks() {
    let mut mem = memory(8);
    let mut m = map(8);
    // The same disk block read into two pages.
    m.landed(2, 0, BASE, PAGE, &mut mem);
    m.landed(2, 0, BASE + 4 * PAGE, PAGE, &mut mem);
    m.landed(2, PAGE, BASE + PAGE, PAGE, &mut mem);
    assert_eq!(m.len(), 3);
    // Another page written over block 0: both old pages go, the writer maps it.
    m.stored(2, 0, BASE + 6 * PAGE, PAGE, &mut mem);
    assert!(m.get("pc.ram", 0).is_none() && m.get("pc.ram", 4 * PAGE).is_none());
    assert_eq!(m.get("pc.ram", 6 * PAGE).unwrap().offset, 0);
    // WRITE_ZEROES over block 1, and a different export's block 1 untouched.
    m.landed(3, PAGE, BASE + 2 * PAGE, PAGE, &mut mem);
    m.changed(2, PAGE, 10);
    assert!(m.get("pc.ram", PAGE).is_none());
    assert!(m.get("pc.ram", 2 * PAGE).is_some());
    // A TRIM far larger than the map walks the index.
    m.changed(3, 0, 1 << 40);
    assert!(m.get("pc.ram", 2 * PAGE).is_none());
    assert_eq!(m.len(), 1);
}

#[test]
fn discarded_memory_drops_its_entries() {
    let mut mem = memory(8);
    let mut m = map(8);
    m.landed(0, 0, BASE, 8 * PAGE, &mut mem);
    assert_eq!(m.len(), 8);
    m.discarded(BASE + PAGE + 1, PAGE);
    assert_eq!(m.len(), 6);
    assert!(m.get("pc.ram", PAGE).is_none() && m.get("pc.ram", 2 * PAGE).is_none());
    assert!(m.memory_bytes() > 0);
}

#[test]
fn ranges_at_the_end_of_the_address_space_do_not_overflow() {
    // A zeroing request QEMU (or a fuzzer) could send near u64::MAX (found by nbd_events).
    let mut mem = memory(2);
    let mut m = map(2);
    m.landed(0, 0, BASE, PAGE, &mut mem);
    m.changed(0, u64::MAX - 10, 100);
    m.landed(0, u64::MAX - 100, BASE, 2 * PAGE, &mut mem);
    assert!(m.len() <= 2);
}

#[test]
fn a_new_layout_keeps_entries_by_block_name_and_drops_what_is_gone() {
    let mut mem = memory(8);
    let mut m = map(8);
    m.landed(1, 0, BASE, 6 * PAGE, &mut mem);
    m.landed(2, 0, BASE + 6 * PAGE, 2 * PAGE, &mut mem);
    assert_eq!(m.len(), 8);
    // A DIMM plugged in ahead of it in QEMU's list, and pc.ram's used length cut to 7 pages.
    m.relayout(
        vec![
            RamBlock {
                name: "dimm0".into(),
                host: BASE + (1 << 30),
                len: 16 * PAGE,
            },
            RamBlock {
                name: "pc.ram".into(),
                host: BASE,
                len: 7 * PAGE,
            },
        ],
        |export| export == 1 || export == 2,
    );
    assert_eq!(m.len(), 7, "page 7 is past the block's end now");
    assert_eq!(m.get("pc.ram", 2 * PAGE).map(|e| e.offset), Some(2 * PAGE));
    assert_eq!(
        m.locate(BASE + PAGE),
        Some((1, PAGE)),
        "pc.ram is block 1 now"
    );
    assert_eq!(
        m.claim_at(1, 6 * PAGE),
        m.get("pc.ram", 6 * PAGE).map(|e| e.hash)
    );
    // The reverse index follows: a write to disk block 2 of export 1 still finds its page.
    m.changed(1, 2 * PAGE, PAGE);
    assert!(m.get("pc.ram", 2 * PAGE).is_none());
    assert_eq!(m.len(), 6);
    // A disk gone: its entries go.
    m.relayout(m.blocks().to_vec(), |export| export == 1);
    assert_eq!(m.len(), 5, "export 2's page 6 dropped");
    assert!(m.get("pc.ram", 6 * PAGE).is_none());
}
