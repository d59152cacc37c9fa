//! An incremental parser for QEMU's savevm stream (version 3, single-channel precopy).
//!
//! It finds the 4 KiB payload of every RAM `PAGE` record and hands everything else on
//! verbatim, so a consumer can replace page payloads and still reproduce the exact stream. It
//! accepts input in chunks of any size. What it understands (observed with QEMU 7.2 and 10.0):
//!
//! ```text
//! be32 'QEVM' | be32 3 | [0x07 config: be32 len, name, (0x05 subsection)*]
//! sections:  0x01 START / 0x04 FULL: be32 id, u8 len, idstr, be32 instance, be32 version
//!            0x02 PART  / 0x03 END : be32 id            ... payload ... 0x7e be32 id (footer)
//!            0x08 COMMAND: be16 cmd, be16 len, data     0x00 EOF (then VMDESCRIPTION)
//! ram records: be64 addr|flags, [u8 len, block idstr unless CONTINUE], then by flag:
//!            ZERO 0x02: u8 fill | PAGE 0x08: 4096 bytes | MEM_SIZE 0x04: (u8 len, idstr, be64
//!            size)* | XBZRLE 0x40: u8, be16 len, data | MULTIFD_FLUSH 0x200 | EOS 0x10: end
//! ```
//! The RAM block named by a record persists across records *and sections* until the next
//! record without CONTINUE. Anything else (a device section, an unknown record or flag, the
//! end of the stream) switches the parser to pass-through: every later byte goes out
//! verbatim. That is always correct; it only stops finding pages. The reason is kept in
//! [`StreamParser::passthrough_reason`].

/// Guest page size handled (x86 TARGET_PAGE_BITS = 12).
pub const PAGE_SIZE: usize = 4096;

pub(crate) const QEVM: u32 = 0x5145_564d;
const SEC_EOF: u8 = 0x00;
const SEC_START: u8 = 0x01;
const SEC_PART: u8 = 0x02;
const SEC_END: u8 = 0x03;
const SEC_FULL: u8 = 0x04;
const SEC_SUBSECTION: u8 = 0x05;
const SEC_CONFIGURATION: u8 = 0x07;
const SEC_COMMAND: u8 = 0x08;
const SEC_FOOTER: u8 = 0x7e;

const F_ZERO: u64 = 0x02;
const F_MEM_SIZE: u64 = 0x04;
const F_PAGE: u64 = 0x08;
const F_EOS: u64 = 0x10;
const F_CONTINUE: u64 = 0x20;
const F_XBZRLE: u64 = 0x40;
const F_MULTIFD_FLUSH: u64 = 0x200;
const FLAG_MASK: u64 = PAGE_SIZE as u64 - 1;

/// Receives the parsed stream, in order.
pub trait Sink {
    /// Bytes to reproduce unchanged.
    fn verbatim(&mut self, bytes: &[u8]);
    /// The payload of one PAGE record; its header went out through `verbatim` just before.
    fn page(&mut self, payload: &[u8; PAGE_SIZE]);
    /// Like [`Sink::page`], for a payload that lies whole in the input of the current
    /// [`StreamParser::feed`] call, starting `offset` bytes in: a sink that keeps the input can
    /// refer to it instead of copying.
    fn page_in_input(&mut self, offset: usize, payload: &[u8; PAGE_SIZE]) {
        let _ = offset;
        self.page(payload);
    }
    /// Where the next page belongs in guest memory: its RAM block and the offset in it. Called
    /// just before [`Sink::page`] or [`Sink::page_in_input`].
    fn page_at(&mut self, block: &str, offset: u64) {
        let _ = (block, offset);
    }
}

/// Counts of what the parser saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamStats {
    pub bytes: u64,
    pub pages: u64,
    pub zero_pages: u64,
    pub xbzrle_pages: u64,
    pub ram_sections: u64,
    pub commands: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Header,
    SectionType,
    ConfigLen,
    ConfigName,
    ConfigNext,
    SubLen,
    SubName,
    SubVersion,
    CapCount,
    CapLen,
    CapName,
    PageBits,
    Uuid,
    SectionId { full_header: bool },
    IdStrLen,
    IdStr,
    InstanceVersion,
    Record,
    RecordBlockLen,
    RecordBlockName,
    ZeroFill,
    MemBlockLen,
    MemBlockName,
    MemBlockSize,
    XbzrleHeader,
    Footer,
    CommandHeader,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Collect `n` bytes into `field`, then act on them.
    Field(Step, usize),
    /// Pass `n` bytes through untouched.
    Skip(usize, Step),
    /// Collect a page payload.
    Page,
    Passthrough,
}

/// The parser. Feed it with [`StreamParser::feed`].
pub struct StreamParser {
    state: State,
    field: Vec<u8>,
    page: Box<[u8; PAGE_SIZE]>,
    page_fill: usize,
    /// Section being parsed and the id of the `ram` section.
    section: u32,
    ram_section: Option<u32>,
    section_kind: u8,
    idstr: String,
    /// Current RAM block (carries across sections) and the pending record's flags.
    block: Option<String>,
    record_flags: u64,
    /// The pending record's address (the page's offset in its RAM block).
    record_addr: u64,
    mem_remaining: u64,
    caps_left: u32,
    subsection: String,
    stats: StreamStats,
    passthrough_reason: Option<String>,
    /// Where the first section END's type byte lies in the stream: from there on, QEMU has
    /// paused the guest for the final iteration.
    switchover_at: Option<u64>,
}

impl Default for StreamParser {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamParser {
    pub fn new() -> Self {
        Self {
            state: State::Field(Step::Header, 8),
            field: Vec::with_capacity(256),
            page: Box::new([0; PAGE_SIZE]),
            page_fill: 0,
            section: 0,
            ram_section: None,
            section_kind: 0,
            idstr: String::new(),
            block: None,
            record_flags: 0,
            record_addr: 0,
            mem_remaining: 0,
            caps_left: 0,
            subsection: String::new(),
            stats: StreamStats::default(),
            passthrough_reason: None,
            switchover_at: None,
        }
    }

    /// What was seen so far.
    pub fn stats(&self) -> StreamStats {
        self.stats
    }

    /// Why the parser stopped looking for pages, if it did.
    pub fn passthrough_reason(&self) -> Option<&str> {
        self.passthrough_reason.as_deref()
    }

    /// Whether the stream is in the final `ram` END section, which QEMU sends while the guest
    /// is paused: work done per page there adds to downtime.
    pub fn in_final_ram_section(&self) -> bool {
        self.section_kind == SEC_END && self.state != State::Passthrough
    }

    /// Where the stream reached the switchover, once it has: how many bytes came before it.
    /// QEMU sends a section END only once it has paused the guest, so everything from the
    /// first one on is the final iteration and the device state; what QEMU sent with the guest
    /// paused counts from there, not from the end of the read that held it. Stays `None` when
    /// the parser stopped looking before that point.
    pub fn switchover_at(&self) -> Option<u64> {
        self.switchover_at
    }

    /// Consumes `input`, calling `sink` for every verbatim run and page payload, in order.
    pub fn feed(&mut self, mut input: &[u8], sink: &mut impl Sink) {
        let total = input.len();
        let base = self.stats.bytes;
        self.stats.bytes += total as u64;
        while !input.is_empty() {
            match self.state {
                State::Passthrough => {
                    sink.verbatim(input);
                    return;
                }
                State::Skip(n, next) => {
                    let take = n.min(input.len());
                    sink.verbatim(&input[..take]);
                    input = &input[take..];
                    self.state = if take == n {
                        self.next_field(next)
                    } else {
                        State::Skip(n - take, next)
                    };
                }
                State::Page if self.page_fill == 0 && input.len() >= PAGE_SIZE => {
                    let (payload, rest) = input.split_at(PAGE_SIZE);
                    self.stats.pages += 1;
                    sink.page_at(self.block.as_deref().unwrap_or(""), self.record_addr);
                    sink.page_in_input(
                        total - input.len(),
                        payload.try_into().expect("split at PAGE_SIZE"),
                    );
                    input = rest;
                    self.state = self.next_field(Step::Record);
                }
                State::Page => {
                    let take = (PAGE_SIZE - self.page_fill).min(input.len());
                    self.page[self.page_fill..self.page_fill + take]
                        .copy_from_slice(&input[..take]);
                    self.page_fill += take;
                    input = &input[take..];
                    if self.page_fill == PAGE_SIZE {
                        self.page_fill = 0;
                        self.stats.pages += 1;
                        sink.page_at(self.block.as_deref().unwrap_or(""), self.record_addr);
                        sink.page(&self.page);
                        self.state = self.next_field(Step::Record);
                    }
                }
                State::Field(step, n) => {
                    let take = (n - self.field.len()).min(input.len());
                    self.field.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    if self.field.len() == n {
                        sink.verbatim(&self.field);
                        self.state = self.on_field(step);
                        self.field.clear();
                        if step == Step::SectionType
                            && self.section_kind == SEC_END
                            && self.switchover_at.is_none()
                        {
                            let consumed = (total - input.len()) as u64;
                            self.switchover_at = Some(base + consumed - n as u64);
                        }
                    }
                }
            }
        }
    }

    /// Ends the stream: hands on, verbatim, what a record cut short by the end of the input
    /// left buffered (a field or a page payload begun but not whole), so that everything fed
    /// comes out exactly, even from a stream QEMU ended mid-record. Later input is passed
    /// through.
    pub fn finish(&mut self, sink: &mut impl Sink) {
        match self.state {
            State::Field(..) if !self.field.is_empty() => sink.verbatim(&self.field),
            State::Page if self.page_fill > 0 => sink.verbatim(&self.page[..self.page_fill]),
            _ => {}
        }
        self.field.clear();
        self.page_fill = 0;
        if self.state != State::Passthrough {
            self.state = self.passthrough("the stream ended".into());
        }
    }

    /// The state that reads the field for `step`.
    fn next_field(&self, step: Step) -> State {
        let n = match step {
            Step::Header => 8,
            Step::SectionType | Step::ConfigNext | Step::SubLen | Step::IdStrLen | Step::CapLen => {
                1
            }
            Step::RecordBlockLen | Step::ZeroFill | Step::MemBlockLen => 1,
            Step::ConfigLen | Step::SubVersion | Step::CapCount | Step::PageBits => 4,
            Step::SectionId { .. } => 4,
            Step::InstanceVersion => 8,
            Step::Record | Step::MemBlockSize => 8,
            Step::Uuid => 16,
            Step::XbzrleHeader => 3,
            Step::Footer => 5,
            Step::CommandHeader => 4,
            // Variable-length names are set up by the step that read their length.
            Step::ConfigName
            | Step::SubName
            | Step::CapName
            | Step::IdStr
            | Step::RecordBlockName
            | Step::MemBlockName => unreachable!("length-prefixed steps are entered directly"),
        };
        State::Field(step, n)
    }

    fn passthrough(&mut self, reason: String) -> State {
        tracing::debug!(
            "migration stream pass-through from byte {}: {reason}",
            self.stats.bytes
        );
        self.passthrough_reason = Some(reason);
        State::Passthrough
    }

    fn be32(&self) -> u32 {
        u32::from_be_bytes(self.field[..4].try_into().expect("4-byte field"))
    }

    fn be64(&self) -> u64 {
        u64::from_be_bytes(self.field[..8].try_into().expect("8-byte field"))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.field).into_owned()
    }

    /// A length-prefixed string's body. A zero-length body is acted on as soon as the next
    /// byte arrives, which is harmless: nothing is consumed for it.
    fn string(&self, step: Step, len: usize) -> State {
        State::Field(step, len)
    }

    fn on_field(&mut self, step: Step) -> State {
        match step {
            Step::Header => {
                let magic = self.be32();
                let version = u32::from_be_bytes(self.field[4..8].try_into().unwrap());
                if magic != QEVM || version != 3 {
                    return self.passthrough(format!(
                        "not a savevm v3 stream (magic {magic:#x}, version {version})"
                    ));
                }
                self.next_field(Step::SectionType)
            }
            Step::SectionType => self.on_section_type(self.field[0]),
            Step::ConfigLen => {
                let n = self.be32() as usize;
                if n > 256 {
                    return self.passthrough(format!("configuration name of {n} bytes"));
                }
                self.string(Step::ConfigName, n)
            }
            Step::ConfigName => self.next_field(Step::ConfigNext),
            Step::ConfigNext => {
                if self.field[0] == SEC_SUBSECTION {
                    self.next_field(Step::SubLen)
                } else {
                    self.on_section_type(self.field[0])
                }
            }
            Step::SubLen => {
                let n = self.field[0] as usize;
                self.string(Step::SubName, n)
            }
            Step::SubName => {
                self.subsection = self.text();
                self.next_field(Step::SubVersion)
            }
            Step::SubVersion => {
                let name = std::mem::take(&mut self.subsection);
                match name.as_str() {
                    "configuration/capabilities" => self.next_field(Step::CapCount),
                    "configuration/target-page-bits" => self.next_field(Step::PageBits),
                    "configuration/uuid" => self.next_field(Step::Uuid),
                    other => {
                        self.passthrough(format!("unknown configuration subsection {other:?}"))
                    }
                }
            }
            Step::CapCount => {
                self.caps_left = self.be32();
                if self.caps_left > 64 {
                    return self.passthrough(format!("{} capabilities", self.caps_left));
                }
                if self.caps_left == 0 {
                    self.next_field(Step::ConfigNext)
                } else {
                    self.next_field(Step::CapLen)
                }
            }
            Step::CapLen => {
                let n = self.field[0] as usize;
                self.string(Step::CapName, n)
            }
            Step::CapName => {
                self.caps_left -= 1;
                if self.caps_left == 0 {
                    self.next_field(Step::ConfigNext)
                } else {
                    self.next_field(Step::CapLen)
                }
            }
            Step::PageBits => {
                let bits = self.be32();
                if bits != 12 {
                    return self.passthrough(format!("target page bits {bits}, not 12"));
                }
                self.next_field(Step::ConfigNext)
            }
            Step::Uuid => self.next_field(Step::ConfigNext),
            Step::SectionId { full_header } => {
                self.section = self.be32();
                if full_header {
                    self.next_field(Step::IdStrLen)
                } else if Some(self.section) == self.ram_section {
                    self.stats.ram_sections += 1;
                    self.next_field(Step::Record)
                } else {
                    self.passthrough(format!(
                        "section {} is not ram (kind {:#x})",
                        self.section, self.section_kind
                    ))
                }
            }
            Step::IdStrLen => {
                let n = self.field[0] as usize;
                self.string(Step::IdStr, n)
            }
            Step::IdStr => {
                self.idstr = self.text();
                self.next_field(Step::InstanceVersion)
            }
            Step::InstanceVersion => {
                if self.section_kind == SEC_START && self.idstr == "ram" {
                    self.ram_section = Some(self.section);
                    self.stats.ram_sections += 1;
                    self.next_field(Step::Record)
                } else {
                    let (kind, id) = (self.section_kind, self.idstr.clone());
                    self.passthrough(format!("section {id:?} (kind {kind:#x}) is not parsed"))
                }
            }
            Step::Record => self.on_record(),
            Step::RecordBlockLen => {
                let n = self.field[0] as usize;
                self.string(Step::RecordBlockName, n)
            }
            Step::RecordBlockName => {
                self.block = Some(self.text());
                self.record_body()
            }
            Step::ZeroFill => {
                self.stats.zero_pages += 1;
                self.next_field(Step::Record)
            }
            Step::MemBlockLen => {
                let n = self.field[0] as usize;
                self.string(Step::MemBlockName, n)
            }
            Step::MemBlockName => self.next_field(Step::MemBlockSize),
            Step::MemBlockSize => {
                let used = self.be64();
                if used > self.mem_remaining {
                    return self.passthrough("RAM block sizes exceed the announced total".into());
                }
                self.mem_remaining -= used;
                if self.mem_remaining == 0 {
                    self.next_field(Step::Record)
                } else {
                    self.next_field(Step::MemBlockLen)
                }
            }
            Step::XbzrleHeader => {
                self.stats.xbzrle_pages += 1;
                let len = u16::from_be_bytes(self.field[1..3].try_into().unwrap()) as usize;
                State::Skip(len, Step::Record)
            }
            Step::Footer => {
                let id = u32::from_be_bytes(self.field[1..5].try_into().unwrap());
                if self.field[0] != SEC_FOOTER || id != self.section {
                    return self.passthrough(format!(
                        "bad section footer {:#x}/{id} for section {}",
                        self.field[0], self.section
                    ));
                }
                self.next_field(Step::SectionType)
            }
            Step::CommandHeader => {
                self.stats.commands += 1;
                let len = u16::from_be_bytes(self.field[2..4].try_into().unwrap()) as usize;
                State::Skip(len, Step::SectionType)
            }
        }
    }

    fn on_section_type(&mut self, kind: u8) -> State {
        self.section_kind = kind;
        match kind {
            SEC_START | SEC_FULL => self.next_field(Step::SectionId { full_header: true }),
            SEC_PART | SEC_END => self.next_field(Step::SectionId { full_header: false }),
            SEC_CONFIGURATION => self.next_field(Step::ConfigLen),
            SEC_COMMAND => self.next_field(Step::CommandHeader),
            SEC_EOF => self.passthrough("end of the device state (EOF)".into()),
            other => self.passthrough(format!("unknown section type {other:#x}")),
        }
    }

    fn on_record(&mut self) -> State {
        let v = self.be64();
        let flags = v & FLAG_MASK;
        self.record_flags = flags;
        self.record_addr = v & !FLAG_MASK;
        let carries_block = flags & (F_ZERO | F_PAGE | F_XBZRLE) != 0;
        if carries_block && flags & F_CONTINUE == 0 {
            return self.next_field(Step::RecordBlockLen);
        }
        if carries_block && self.block.is_none() {
            return self.passthrough("CONTINUE record before any RAM block was named".into());
        }
        self.record_body()
    }

    /// After the record header (and block name): its body by flag.
    fn record_body(&mut self) -> State {
        match self.record_flags & !F_CONTINUE {
            F_ZERO => self.next_field(Step::ZeroFill),
            F_PAGE => State::Page,
            F_XBZRLE => self.next_field(Step::XbzrleHeader),
            F_MEM_SIZE => {
                self.mem_remaining = u64::from_be_bytes(self.field_addr());
                if self.mem_remaining == 0 {
                    self.next_field(Step::Record)
                } else {
                    self.next_field(Step::MemBlockLen)
                }
            }
            F_MULTIFD_FLUSH => self.next_field(Step::Record),
            F_EOS => self.next_field(Step::Footer),
            other => self.passthrough(format!("unknown RAM record flags {other:#x}")),
        }
    }

    /// The address part of the last record header (MEM_SIZE carries the total there).
    fn field_addr(&self) -> [u8; 8] {
        // The header is the field just read for Step::Record (MEM_SIZE has no block name).
        (self.be64() & !FLAG_MASK).to_be_bytes()
    }
}

/// Builds synthetic savevm streams for tests and benchmarks (the `testing` feature).
#[cfg(any(test, feature = "testing"))]
pub mod synthetic;

#[cfg(test)]
mod tests {
    use super::{synthetic::Builder, *};

    /// Rebuilds the stream from the sink calls and records the pages.
    #[derive(Default)]
    struct Collect {
        out: Vec<u8>,
        pages: Vec<[u8; PAGE_SIZE]>,
    }

    impl Sink for Collect {
        fn verbatim(&mut self, bytes: &[u8]) {
            self.out.extend_from_slice(bytes);
        }
        fn page(&mut self, payload: &[u8; PAGE_SIZE]) {
            self.out.extend_from_slice(payload);
            self.pages.push(*payload);
        }
    }

    fn page(n: u8) -> [u8; PAGE_SIZE] {
        let mut p = [n; PAGE_SIZE];
        p[0] = 0xee;
        p
    }

    /// [`sample`] up to the section END that carries the final iteration.
    fn sample_before_end() -> Builder {
        let mut b = Builder::new();
        b.ram_start(&[("pc.ram", 1 << 20), ("pc.bios", 1 << 16)]);
        b.ram_part(false);
        b.page(Some("pc.ram"), 0x1000, &page(1));
        b.page(None, 0x2000, &page(2));
        b.zero(None, 0x3000);
        b.u64(0x200); // MULTIFD_FLUSH
        b.eos_footer();
        b.command(11, &[]);
        b
    }

    fn sample() -> Vec<u8> {
        let mut b = sample_before_end();
        b.ram_part(true);
        // CONTINUE across the section boundary: still pc.ram.
        b.page(None, 0x4000, &page(3));
        b.page(Some("pc.bios"), 0x0, &page(4));
        b.eos_footer();
        b.devices_and_eof();
        b.bytes
    }

    #[test]
    fn every_page_is_placed_in_its_ram_block_across_sections_and_chunks() {
        #[derive(Default)]
        struct Places(Vec<(String, u64)>);
        impl Sink for Places {
            fn verbatim(&mut self, _: &[u8]) {}
            fn page(&mut self, _: &[u8; PAGE_SIZE]) {}
            fn page_at(&mut self, block: &str, offset: u64) {
                self.0.push((block.to_string(), offset));
            }
        }
        let stream = sample();
        for chunk in [1, 7, 4096, 4100, stream.len()] {
            let mut p = StreamParser::new();
            let mut places = Places::default();
            for part in stream.chunks(chunk) {
                p.feed(part, &mut places);
            }
            let want: Vec<(String, u64)> = [
                ("pc.ram", 0x1000),
                ("pc.ram", 0x2000),
                ("pc.ram", 0x4000),
                ("pc.bios", 0),
            ]
            .iter()
            .map(|(b, o)| (b.to_string(), *o))
            .collect();
            assert_eq!(places.0, want, "chunk {chunk}");
        }
    }

    #[test]
    fn finds_every_page_at_every_chunk_size() {
        let stream = sample();
        for chunk in (1..=70).chain([4095, 4096, 4097, stream.len()]) {
            let mut p = StreamParser::new();
            let mut c = Collect::default();
            for part in stream.chunks(chunk) {
                p.feed(part, &mut c);
            }
            assert_eq!(c.out, stream, "chunk {chunk}: stream not reproduced");
            assert_eq!(
                c.pages,
                vec![page(1), page(2), page(3), page(4)],
                "chunk {chunk}"
            );
            let s = p.stats();
            assert_eq!(
                (s.pages, s.zero_pages, s.commands, s.ram_sections),
                (4, 1, 1, 3)
            );
            assert!(
                p.passthrough_reason().unwrap().contains("timer"),
                "{:?}",
                p.passthrough_reason()
            );
        }
    }

    #[test]
    fn a_stream_ended_anywhere_comes_out_whole() {
        let s = sample();
        for cut in 0..=s.len() {
            let mut p = StreamParser::new();
            let mut c = Collect::default();
            p.feed(&s[..cut], &mut c);
            p.finish(&mut c);
            assert_eq!(c.out, &s[..cut], "cut at byte {cut}");
            // Whatever follows is passed through.
            p.feed(&s[cut..], &mut c);
            assert_eq!(c.out, s, "cut at byte {cut}, then the rest");
            assert!(p.passthrough_reason().is_some());
        }
    }

    #[test]
    fn the_switchover_is_the_first_section_end() {
        let stream = sample();
        let end = sample_before_end().bytes.len();
        assert_eq!(stream[end], SEC_END);
        let mut p = StreamParser::new();
        let mut c = Collect::default();
        for (at, byte) in stream.iter().enumerate() {
            p.feed(&[*byte], &mut c);
            assert_eq!(
                p.switchover_at(),
                (at >= end).then_some(end as u64),
                "after byte {at}"
            );
        }
    }

    #[test]
    fn whole_pages_are_reported_where_they_lie_in_the_input() {
        struct Offsets<'a> {
            chunk: &'a [u8],
            in_input: usize,
            copied: usize,
        }
        impl Sink for Offsets<'_> {
            fn verbatim(&mut self, _: &[u8]) {}
            fn page(&mut self, _: &[u8; PAGE_SIZE]) {
                self.copied += 1;
            }
            fn page_in_input(&mut self, offset: usize, payload: &[u8; PAGE_SIZE]) {
                assert_eq!(&self.chunk[offset..offset + PAGE_SIZE], payload);
                self.in_input += 1;
            }
        }
        let stream = sample();
        for chunk in [stream.len(), 5000, 4096] {
            let mut p = StreamParser::new();
            let (mut in_input, mut copied) = (0, 0);
            for part in stream.chunks(chunk) {
                let mut sink = Offsets {
                    chunk: part,
                    in_input: 0,
                    copied: 0,
                };
                p.feed(part, &mut sink);
                in_input += sink.in_input;
                copied += sink.copied;
            }
            assert_eq!(in_input + copied, 4, "chunk {chunk}");
            if chunk == stream.len() {
                assert_eq!(copied, 0, "nothing straddles a single chunk");
            }
        }
    }

    #[test]
    fn garbage_passes_through_untouched() {
        for input in [
            &b"not a migration stream at all"[..],
            b"QEVM\0\0\0\x02rest",
            b"",
        ] {
            let mut p = StreamParser::new();
            let mut c = Collect::default();
            p.feed(input, &mut c);
            assert_eq!(c.out, input);
            assert!(c.pages.is_empty());
        }
    }

    #[test]
    fn unknown_record_switches_to_passthrough() {
        let mut b = Builder::new();
        b.ram_start(&[("pc.ram", 1 << 20)]);
        b.ram_part(false);
        b.page(Some("pc.ram"), 0x1000, &page(1));
        b.u64(0x5000 | 0x80); // HOOK: not handled
        b.page(None, 0x2000, &page(2));
        let mut p = StreamParser::new();
        let mut c = Collect::default();
        p.feed(&b.bytes, &mut c);
        assert_eq!(c.out, b.bytes);
        assert_eq!(
            c.pages,
            vec![page(1)],
            "nothing after the unknown record is a page"
        );
        assert!(p.passthrough_reason().unwrap().contains("0x80"));
    }

    #[test]
    fn unknown_configuration_subsection_is_passthrough() {
        let mut b = Builder::new();
        b.bytes.push(0x05);
        b.str8("configuration/something-new");
        b.u32(1);
        b.ram_start(&[("pc.ram", 4096)]);
        let mut p = StreamParser::new();
        let mut c = Collect::default();
        p.feed(&b.bytes, &mut c);
        assert_eq!(c.out, b.bytes);
        assert!(p.passthrough_reason().unwrap().contains("something-new"));
    }
}
