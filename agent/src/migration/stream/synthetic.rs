//! Synthetic savevm streams in the layout QEMU 10 produces, for tests, fuzz seeds and
//! benchmarks. Built only for tests and with the `testing` feature.
use super::PAGE_SIZE;

/// A stream builder.
#[derive(Default)]
pub struct Builder {
    pub bytes: Vec<u8>,
}

impl Builder {
    /// Header plus a configuration section with the usual subsections.
    pub fn new() -> Self {
        let mut b = Self::default();
        b.bytes.extend_from_slice(b"QEVM\0\0\0\x03");
        b.bytes.push(0x07);
        b.u32(14);
        b.bytes.extend_from_slice(b"pc-i440fx-10.0");
        b.subsection("configuration/target-page-bits", |b| b.u32(12));
        b.subsection("configuration/capabilities", |b| {
            b.u32(1);
            b.str8("x-ignore-shared");
        });
        b.subsection("configuration/uuid", |b| {
            b.bytes.extend_from_slice(&[7; 16])
        });
        b
    }

    fn subsection(&mut self, name: &str, body: impl FnOnce(&mut Self)) {
        self.bytes.push(0x05);
        self.str8(name);
        self.u32(1);
        body(self);
    }

    pub fn u32(&mut self, v: u32) {
        self.bytes.extend_from_slice(&v.to_be_bytes());
    }

    pub fn u64(&mut self, v: u64) {
        self.bytes.extend_from_slice(&v.to_be_bytes());
    }

    pub fn str8(&mut self, s: &str) {
        self.bytes.push(s.len() as u8);
        self.bytes.extend_from_slice(s.as_bytes());
    }

    /// `ram` START (section id 2) with MEM_SIZE for `blocks`, then EOS and footer.
    pub fn ram_start(&mut self, blocks: &[(&str, u64)]) {
        self.bytes.push(0x01);
        self.u32(2);
        self.str8("ram");
        self.u32(0);
        self.u32(4);
        self.u64(blocks.iter().map(|b| b.1).sum::<u64>() | 0x04);
        for (name, size) in blocks {
            self.str8(name);
            self.u64(*size);
        }
        self.eos_footer();
    }

    /// Opens a ram PART (or END) section.
    pub fn ram_part(&mut self, end: bool) {
        self.bytes.push(if end { 0x03 } else { 0x02 });
        self.u32(2);
    }

    /// A PAGE record; `block` is `None` for CONTINUE.
    pub fn page(&mut self, block: Option<&str>, addr: u64, payload: &[u8; PAGE_SIZE]) {
        self.record(block, addr, 0x08);
        self.bytes.extend_from_slice(payload);
    }

    /// A ZERO record.
    pub fn zero(&mut self, block: Option<&str>, addr: u64) {
        self.record(block, addr, 0x02);
        self.bytes.push(0);
    }

    fn record(&mut self, block: Option<&str>, addr: u64, flag: u64) {
        match block {
            Some(name) => {
                self.u64(addr | flag);
                self.str8(name);
            }
            None => self.u64(addr | flag | 0x20),
        }
    }

    pub fn eos_footer(&mut self) {
        self.u64(0x10);
        self.bytes.push(0x7e);
        self.u32(2);
    }

    /// A COMMAND record.
    pub fn command(&mut self, cmd: u16, data: &[u8]) {
        self.bytes.push(0x08);
        self.bytes.extend_from_slice(&cmd.to_be_bytes());
        self.bytes
            .extend_from_slice(&(data.len() as u16).to_be_bytes());
        self.bytes.extend_from_slice(data);
    }

    /// A whole stream with one RAM block of `pages` pages, page `i` holding `page(i)`: PART
    /// sections of 256 pages each, an empty END, device state and EOF, as QEMU 10 sends a
    /// first pass.
    pub fn ram_stream(pages: u64, mut page: impl FnMut(u64) -> [u8; PAGE_SIZE]) -> Vec<u8> {
        let mut b = Self::new();
        b.bytes.reserve(pages as usize * (PAGE_SIZE + 16));
        b.ram_start(&[("pc.ram", pages * PAGE_SIZE as u64)]);
        for i in 0..pages {
            if i % 256 == 0 {
                if i > 0 {
                    b.eos_footer();
                }
                b.ram_part(false);
            }
            let block = (i % 256 == 0).then_some("pc.ram");
            b.page(block, i * PAGE_SIZE as u64, &page(i));
        }
        b.eos_footer();
        b.ram_part(true);
        b.eos_footer();
        b.devices_and_eof();
        b.bytes
    }

    /// A device section, EOF and a VMDESCRIPTION, as after ram END.
    pub fn devices_and_eof(&mut self) {
        self.bytes.push(0x04);
        self.u32(3);
        self.str8("timer");
        self.u32(0);
        self.u32(2);
        self.bytes.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        self.bytes.push(0x7e);
        self.u32(3);
        self.bytes.push(0x00);
        self.bytes.push(0x06);
        let json = br#"{"page_size":4096,"devices":[]}"#;
        self.u32(json.len() as u32);
        self.bytes.extend_from_slice(json);
    }
}
