//! An async NBD client for the target agent: fixed-newstyle handshake with NBD_OPT_GO, simple
//! replies, and [`NbdClient::read_many`], which coalesces adjacent ranges into larger reads and
//! keeps a bounded number of them in flight.
use std::collections::HashMap;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter, ReadHalf, WriteHalf};

use nas_proto::{
    nbd::*,
    net::{connect, Stream},
    Endpoint,
};

use crate::tls::StorageTls;

/// Errors that end the client's connection.
#[derive(Debug, thiserror::Error)]
pub enum NbdClientError {
    #[error("NBD connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("NBD server broke the protocol: {0}")]
    Protocol(String),
    #[error("NBD server refused export {export:?} (reply {reply:#x}): {message}")]
    Refused {
        export: String,
        reply: u32,
        message: String,
    },
}

/// A connected export.
pub struct NbdClient {
    reader: BufReader<ReadHalf<Box<dyn Stream>>>,
    writer: BufWriter<WriteHalf<Box<dyn Stream>>>,
    size: u64,
    max_payload: u32,
    next_cookie: u64,
}

/// Coalesced reads never exceed this, whatever the server allows.
const MAX_COALESCED: u32 = 1 << 20;

/// Reads the server's greeting; whether it offers no zero padding.
async fn greeting(stream: &mut Box<dyn Stream>) -> Result<bool, NbdClientError> {
    let mut greeting = [0u8; 18];
    stream.read_exact(&mut greeting).await?;
    let magic = u64::from_be_bytes(greeting[..8].try_into().expect("8 bytes"));
    let opt = u64::from_be_bytes(greeting[8..16].try_into().expect("8 bytes"));
    let flags = u16::from_be_bytes(greeting[16..18].try_into().expect("2 bytes"));
    if magic != NBDMAGIC || opt != IHAVEOPT || flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(NbdClientError::Protocol(
            "not a fixed-newstyle NBD server".into(),
        ));
    }
    Ok(flags & FLAG_NO_ZEROES != 0)
}

/// NBD_OPT_STARTTLS, answered with ACK before the TLS handshake may begin.
async fn starttls(stream: &mut Box<dyn Stream>) -> Result<(), NbdClientError> {
    let mut option = IHAVEOPT.to_be_bytes().to_vec();
    option.extend_from_slice(&OPT_STARTTLS.to_be_bytes());
    option.extend_from_slice(&0u32.to_be_bytes());
    stream.write_all(&option).await?;
    let mut h = [0u8; 20];
    stream.read_exact(&mut h).await?;
    let reply = u32::from_be_bytes(h[12..16].try_into().expect("4 bytes"));
    let len = u32::from_be_bytes(h[16..20].try_into().expect("4 bytes"));
    if u64::from_be_bytes(h[..8].try_into().expect("8 bytes")) != OPTION_REPLY_MAGIC
        || len > MAX_OPTION_LEN
    {
        return Err(NbdClientError::Protocol("bad STARTTLS reply".into()));
    }
    let mut body = vec![0u8; len as usize];
    stream.read_exact(&mut body).await?;
    match reply {
        REP_ACK => Ok(()),
        r => Err(NbdClientError::Refused {
            export: "(STARTTLS)".into(),
            reply: r,
            message: String::from_utf8_lossy(&body).into_owned(),
        }),
    }
}

impl NbdClient {
    /// Connects and selects `export` with NBD_OPT_GO.
    pub async fn connect(addr: &Endpoint, export: &str) -> Result<Self, NbdClientError> {
        Self::connect_with(addr, export, None).await
    }

    /// [`NbdClient::connect`], first upgrading to TLS (NBD_OPT_STARTTLS) when `tls` is given.
    pub async fn connect_with(
        addr: &Endpoint,
        export: &str,
        tls: Option<&StorageTls>,
    ) -> Result<Self, NbdClientError> {
        let mut stream = connect(addr).await?;
        let no_zeroes = greeting(&mut stream).await?;
        let mut flags = FLAG_C_FIXED_NEWSTYLE;
        if no_zeroes {
            flags |= FLAG_C_NO_ZEROES;
        }
        stream.write_all(&flags.to_be_bytes()).await?;
        if let Some(tls) = tls {
            starttls(&mut stream).await?;
            stream = tls.wrap(stream, addr).await?;
        }
        let (reader, writer) = tokio::io::split(stream);
        let mut c = Self {
            reader: BufReader::with_capacity(256 << 10, reader),
            writer: BufWriter::with_capacity(64 << 10, writer),
            size: 0,
            max_payload: MAX_COALESCED,
            next_cookie: 1,
        };
        c.handshake(export).await?;
        Ok(c)
    }

    /// NBD_OPT_GO for `export` (the greeting and any TLS are done).
    async fn handshake(&mut self, export: &str) -> Result<(), NbdClientError> {
        let mut go = Vec::new();
        let mut data = (export.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        go.extend_from_slice(&IHAVEOPT.to_be_bytes());
        go.extend_from_slice(&OPT_GO.to_be_bytes());
        go.extend_from_slice(&(data.len() as u32).to_be_bytes());
        go.extend_from_slice(&data);
        self.writer.write_all(&go).await?;
        self.writer.flush().await?;
        loop {
            let mut h = [0u8; 20];
            self.reader.read_exact(&mut h).await?;
            if u64::from_be_bytes(h[..8].try_into().unwrap()) != OPTION_REPLY_MAGIC {
                return Err(NbdClientError::Protocol("bad option reply magic".into()));
            }
            let reply = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
            if len > MAX_OPTION_LEN {
                return Err(NbdClientError::Protocol(format!(
                    "option reply of {len} bytes"
                )));
            }
            let mut body = vec![0u8; len as usize];
            self.reader.read_exact(&mut body).await?;
            match reply {
                REP_ACK => break,
                REP_INFO if body.len() >= 2 => {
                    let info = u16::from_be_bytes(body[..2].try_into().unwrap());
                    if info == INFO_EXPORT && body.len() >= 12 {
                        self.size = u64::from_be_bytes(body[2..10].try_into().unwrap());
                    } else if info == INFO_BLOCK_SIZE && body.len() >= 14 {
                        let max = u32::from_be_bytes(body[10..14].try_into().unwrap());
                        self.max_payload = max.clamp(4096, MAX_COALESCED);
                    }
                }
                r if r & (1 << 31) != 0 => {
                    return Err(NbdClientError::Refused {
                        export: export.into(),
                        reply: r,
                        message: String::from_utf8_lossy(&body).into_owned(),
                    })
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    async fn send_read(&mut self, cookie: u64, offset: u64, len: u32) -> std::io::Result<()> {
        let mut req = [0u8; 28];
        req[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        req[6..8].copy_from_slice(&CMD_READ.to_be_bytes());
        req[8..16].copy_from_slice(&cookie.to_be_bytes());
        req[16..24].copy_from_slice(&offset.to_be_bytes());
        req[24..28].copy_from_slice(&len.to_be_bytes());
        self.writer.write_all(&req).await
    }

    /// Reads every `(offset, length)` range. Adjacent ranges are merged into reads of at most
    /// 1 MiB, at most `window` reads are in flight, and each range gets its bytes or the NBD
    /// error the server answered for the read that covered it.
    pub async fn read_many(
        &mut self,
        ranges: &[(u64, u32)],
        window: usize,
    ) -> Result<Vec<Result<Vec<u8>, u32>>, NbdClientError> {
        let runs = coalesce(ranges, self.max_payload);
        let mut results: Vec<Option<Result<Vec<u8>, u32>>> = vec![None; ranges.len()];
        let mut pending: HashMap<u64, usize> = HashMap::new();
        let mut next_run = 0;
        let window = window.max(1);
        while next_run < runs.len() || !pending.is_empty() {
            // Top the window up once half of it has drained: one write for many requests.
            let refill = pending.len() <= window / 2;
            while refill && next_run < runs.len() && pending.len() < window {
                let cookie = self.next_cookie;
                self.next_cookie += 1;
                let run = &runs[next_run];
                self.send_read(cookie, run.offset, run.len).await?;
                pending.insert(cookie, next_run);
                next_run += 1;
            }
            if refill {
                self.writer.flush().await?;
            }
            let mut h = [0u8; 16];
            self.reader.read_exact(&mut h).await?;
            if u32::from_be_bytes(h[..4].try_into().unwrap()) != SIMPLE_REPLY_MAGIC {
                return Err(NbdClientError::Protocol("expected a simple reply".into()));
            }
            let error = u32::from_be_bytes(h[4..8].try_into().unwrap());
            let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
            let run = pending.remove(&cookie).map(|i| &runs[i]).ok_or_else(|| {
                NbdClientError::Protocol(format!("reply to unknown cookie {cookie}"))
            })?;
            if error != 0 {
                for &(i, _, _) in &run.parts {
                    results[i] = Some(Err(error));
                }
                continue;
            }
            // Read into spare capacity: no zeroing of a buffer about to be overwritten.
            let mut data = Vec::with_capacity(run.len as usize);
            while data.len() < run.len as usize {
                let left = (run.len as usize - data.len()) as u64;
                if (&mut self.reader).take(left).read_buf(&mut data).await? == 0 {
                    return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
                }
            }
            if let [(i, 0, len)] = run.parts[..] {
                if len == run.len {
                    // The common case of a run of one range: hand the buffer over.
                    results[i] = Some(Ok(data));
                    continue;
                }
            }
            for &(i, at, len) in &run.parts {
                results[i] = Some(Ok(data[at..at + len as usize].to_vec()));
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.expect("every range belongs to exactly one run"))
            .collect())
    }

    /// Sends NBD_CMD_DISC and closes.
    pub async fn disconnect(mut self) -> Result<(), NbdClientError> {
        let mut req = [0u8; 28];
        req[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        req[6..8].copy_from_slice(&CMD_DISC.to_be_bytes());
        self.writer.write_all(&req).await?;
        self.writer.flush().await?;
        self.writer.shutdown().await.ok();
        Ok(())
    }
}

/// One read covering several requested ranges: (range index, offset in the run, length).
#[derive(Debug, PartialEq, Eq)]
struct Run {
    offset: u64,
    len: u32,
    parts: Vec<(usize, usize, u32)>,
}

/// Merges ranges that follow each other exactly (in offset order) into runs of at most `max`.
fn coalesce(ranges: &[(u64, u32)], max: u32) -> Vec<Run> {
    let mut order: Vec<usize> = (0..ranges.len()).collect();
    order.sort_by_key(|&i| ranges[i].0);
    let mut runs: Vec<Run> = Vec::new();
    for i in order {
        let (offset, len) = ranges[i];
        if let Some(run) = runs.last_mut() {
            if run.offset + u64::from(run.len) == offset && run.len + len <= max {
                run.parts.push((i, run.len as usize, len));
                run.len += len;
                continue;
            }
        }
        runs.push(Run {
            offset,
            len,
            parts: vec![(i, 0, len)],
        });
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesces_adjacent_ranges_only() {
        let runs = coalesce(
            &[
                (8192, 4096),
                (0, 4096),
                (4096, 4096),
                (4096, 4096),
                (20480, 4096),
            ],
            8192,
        );
        assert_eq!(
            runs,
            vec![
                Run {
                    offset: 0,
                    len: 8192,
                    parts: vec![(1, 0, 4096), (2, 4096, 4096)]
                },
                Run {
                    offset: 4096,
                    len: 8192,
                    parts: vec![(3, 0, 4096), (0, 4096, 4096)]
                },
                Run {
                    offset: 20480,
                    len: 4096,
                    parts: vec![(4, 0, 4096)]
                },
            ]
        );
        assert!(coalesce(&[], 8192).is_empty());
    }
}
