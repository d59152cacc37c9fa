//! The NBD handshake phase: fixed newstyle option haggling.
//!
//! ```text
//! server: NBDMAGIC IHAVEOPT flags(FIXED_NEWSTYLE|NO_ZEROES)
//! client: flags
//! loop {
//!   client: IHAVEOPT option len data
//!   server: REP_MAGIC option reply-type len data   (one or more, ending in ACK or an error)
//! }       until GO / EXPORT_NAME (-> transmission) or ABORT / EOF (-> close)
//!           or STARTTLS (ACK; the caller runs TLS on the socket, then the options again)
//! ```
//!
//! [`greet`] sends the greeting; [`options`] haggles until an export is chosen or the client
//! asks for TLS. Under `--tls require`, every option but STARTTLS and ABORT before TLS is
//! answered NBD_REP_ERR_TLS_REQD (NBD_OPT_EXPORT_NAME, which has no error reply, closes). An
//! export with an allow-list is refused without TLS (ERR_TLS_REQD) or to an identity it does
//! not list (ERR_POLICY), and not listed to either.
//!
//! [`handshake`] returns a [`Negotiated`] connection, and only a `Negotiated` can enter the
//! transmission phase, so no request is served before a successful GO or EXPORT_NAME. Option
//! payloads are decoded by pure functions ([`parse_info_request`], [`parse_meta_request`]) that
//! check lengths before reading.
use std::{io, sync::Arc};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::{
    access::{Access, Refusal},
    config::TlsMode,
    export::{ExportEntry, Exports},
};
use nas_proto::{
    cursor::{Cursor, Malformed},
    nbd::*,
};

/// Options accepted before the client must pick an export; more is treated as abuse.
const MAX_OPTIONS: usize = 256;

/// What a successful handshake agreed on.
#[derive(Clone)]
pub struct Negotiated {
    pub export: Arc<ExportEntry>,
    pub structured: bool,
    pub base_allocation: bool,
}

impl std::fmt::Debug for Negotiated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Negotiated")
            .field("export", &self.export.name)
            .field("structured", &self.structured)
            .field("base_allocation", &self.base_allocation)
            .finish()
    }
}

/// Why a handshake ended without a transmission phase.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("connection failed during the handshake: {0}")]
    Io(#[from] io::Error),
    #[error("client sent unknown handshake flags {0:#x}")]
    UnknownClientFlags(u32),
    #[error("client does not speak fixed newstyle")]
    NotFixedNewstyle,
    #[error("client sent bad option magic {0:#x}")]
    BadOptionMagic(u64),
    #[error("client aborted the handshake")]
    Aborted,
    #[error("client sent more than {MAX_OPTIONS} options")]
    TooManyOptions,
    #[error("client sent an option of {0} bytes")]
    OptionTooLarge(u32),
    #[error("client asked NBD_OPT_EXPORT_NAME for unknown export {0:?}")]
    UnknownExport(String),
    #[error("client asked NBD_OPT_EXPORT_NAME for {0:?}, which it may not use")]
    RefusedExport(String),
    #[error("client asked NBD_OPT_EXPORT_NAME before TLS, which this server requires")]
    TlsRequired,
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
}

/// What the option phase knows of its connection.
#[derive(Clone, Debug)]
pub struct Session {
    /// The client asked for no zero padding after NBD_OPT_EXPORT_NAME.
    pub no_zeroes: bool,
    pub tls: TlsMode,
    pub access: Access,
}

/// How an option phase ended.
#[derive(Debug)]
pub enum Step {
    /// An export was chosen: on to transmission.
    Go(Negotiated),
    /// STARTTLS was acknowledged: run TLS on the socket, then [`options`] again.
    StartTls,
}

/// A malformed option payload; answered with NBD_REP_ERR_INVALID.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed option payload: {0}")]
pub struct BadOption(&'static str);

/// Decoded NBD_OPT_INFO / NBD_OPT_GO payload.
#[derive(Debug, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub infos: Vec<u16>,
}

/// Decoded NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT payload.
#[derive(Debug, PartialEq, Eq)]
pub struct MetaRequest {
    pub export: String,
    pub queries: Vec<String>,
}

impl From<Malformed> for BadOption {
    fn from(m: Malformed) -> Self {
        BadOption(m.0)
    }
}

/// An option payload's string: `u32 length`, at most [`MAX_STRING`] bytes of UTF-8.
fn string(f: &mut Cursor<'_>, what: &'static str) -> Result<String, BadOption> {
    let len = f.u32(what)? as usize;
    if len > MAX_STRING {
        return Err(BadOption("string longer than 4096 bytes"));
    }
    String::from_utf8(f.bytes(len, what)?.to_vec()).map_err(|_| BadOption("string is not UTF-8"))
}

/// `u32 name length, name, u16 count, count x u16 info type`.
pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest, BadOption> {
    let mut f = Cursor::new(data);
    let name = string(&mut f, "export name")?;
    let count = f.u16("info count")?;
    let infos = (0..count)
        .map(|_| f.u16("info type"))
        .collect::<Result<_, _>>()?;
    f.end()?;
    Ok(InfoRequest { name, infos })
}

/// `u32 export length, export, u32 count, count x (u32 length, query)`.
pub fn parse_meta_request(data: &[u8]) -> Result<MetaRequest, BadOption> {
    let mut f = Cursor::new(data);
    let export = string(&mut f, "export name")?;
    let count = f.u32("query count")?;
    let mut queries = Vec::new();
    for _ in 0..count {
        queries.push(string(&mut f, "query")?);
    }
    f.end()?;
    Ok(MetaRequest { export, queries })
}

/// Whether a meta-context query selects `base:allocation`. With `list`, the namespace alone
/// (`base:`) also selects it; SET needs the full name.
fn selects_base_allocation(query: &str, list: bool) -> bool {
    query == BASE_ALLOCATION || (list && query == "base:")
}

/// Transmission flags for an export.
pub fn transmission_flags(export: &ExportEntry, structured: bool) -> u16 {
    let mut flags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_CACHE | TFLAG_CAN_MULTI_CONN;
    if export.export.read_only() {
        flags |= TFLAG_READ_ONLY;
    } else {
        flags |= TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
    }
    if structured {
        flags |= TFLAG_SEND_DF;
    }
    flags
}

struct OptionReplies<'s, S> {
    stream: &'s mut S,
}

impl<S: AsyncWrite + Unpin> OptionReplies<'_, S> {
    async fn send(&mut self, option: u32, reply: u32, data: &[u8]) -> io::Result<()> {
        let mut buf = Vec::with_capacity(20 + data.len());
        buf.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        buf.extend_from_slice(&option.to_be_bytes());
        buf.extend_from_slice(&reply.to_be_bytes());
        buf.extend_from_slice(&(data.len() as u32).to_be_bytes());
        buf.extend_from_slice(data);
        self.stream.write_all(&buf).await?;
        // After STARTTLS the stream is TLS, whose writes may wait in the session's buffer.
        self.stream.flush().await
    }

    async fn error(&mut self, option: u32, reply: u32, message: &str) -> io::Result<()> {
        tracing::debug!(
            option,
            reply = format!("{reply:#x}"),
            "option refused: {message}"
        );
        self.send(option, reply, message.as_bytes()).await
    }

    async fn export_info(
        &mut self,
        option: u32,
        entry: &ExportEntry,
        structured: bool,
        infos: &[u16],
    ) -> io::Result<()> {
        let mut export = Vec::with_capacity(12);
        export.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        export.extend_from_slice(&entry.export.size().to_be_bytes());
        export.extend_from_slice(&transmission_flags(entry, structured).to_be_bytes());
        self.send(option, REP_INFO, &export).await?;
        let mut sizes = Vec::with_capacity(14);
        sizes.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        for v in [MIN_BLOCK, PREFERRED_BLOCK, MAX_PAYLOAD] {
            sizes.extend_from_slice(&v.to_be_bytes());
        }
        self.send(option, REP_INFO, &sizes).await?;
        for info in infos {
            let (kind, text) = match *info {
                INFO_NAME => (INFO_NAME, entry.name.as_str()),
                INFO_DESCRIPTION => (INFO_DESCRIPTION, entry.description.as_str()),
                _ => continue,
            };
            let mut data = kind.to_be_bytes().to_vec();
            data.extend_from_slice(text.as_bytes());
            self.send(option, REP_INFO, &data).await?;
        }
        Ok(())
    }
}

/// An option request that names an export: parsed and resolved, or the error reply it is owed
/// (ERR_INVALID for a malformed request, ERR_UNKNOWN for an export that does not exist,
/// ERR_TLS_REQD or ERR_POLICY for one this connection may not use).
fn with_export<R>(
    parsed: Result<R, BadOption>,
    name: impl FnOnce(&R) -> &String,
    exports: &Exports,
    access: &Access,
) -> Result<(R, Arc<ExportEntry>), (u32, String)> {
    let request = parsed.map_err(|e| (REP_ERR_INVALID, e.to_string()))?;
    let entry = exports
        .resolve(name(&request))
        .ok_or_else(|| (REP_ERR_UNKNOWN, "no such export".to_string()))?;
    match access.check(&entry) {
        Ok(()) => Ok((request, entry)),
        Err(Refusal::TlsRequired) => Err((
            REP_ERR_TLS_REQD,
            "this export is served over TLS only (NBD_OPT_STARTTLS first)".into(),
        )),
        Err(Refusal::NotAllowed) => Err((
            REP_ERR_POLICY,
            format!("{} may not use this export", access.who()),
        )),
    }
}

/// A plaintext handshake, for a server without TLS: the greeting, then the options.
pub async fn handshake<S>(stream: &mut S, exports: &Exports) -> Result<Negotiated, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let session = Session {
        no_zeroes: greet(stream).await?,
        tls: TlsMode::Off,
        access: Access::default(),
    };
    match options(stream, exports, &session).await? {
        Step::Go(n) => Ok(n),
        Step::StartTls => unreachable!("STARTTLS is refused with TLS off"),
    }
}

/// Sends the greeting and reads the client's flags; whether it asked for no zero padding.
pub async fn greet<S>(stream: &mut S) -> Result<bool, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    stream.write_all(&greeting).await?;
    let client_flags = stream.read_u32().await?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(HandshakeError::UnknownClientFlags(client_flags));
    }
    if client_flags & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(HandshakeError::NotFixedNewstyle);
    }
    Ok(client_flags & FLAG_C_NO_ZEROES != 0)
}

/// The option phase: until an export is chosen ([`Step::Go`]) or TLS is to start
/// ([`Step::StartTls`]). Its state (structured replies, meta contexts) starts afresh each
/// time, as the spec requires after STARTTLS.
pub async fn options<S>(
    stream: &mut S,
    exports: &Exports,
    session: &Session,
) -> Result<Step, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Session {
        no_zeroes,
        tls,
        ref access,
    } = *session;
    let tls_pending = tls == TlsMode::Require && !access.tls;
    let mut structured = false;
    // SET_META_CONTEXT result: (export it was set for, base:allocation selected).
    let mut meta: Option<(String, bool)> = None;
    for _ in 0..MAX_OPTIONS {
        let magic = stream.read_u64().await?;
        if magic != IHAVEOPT {
            return Err(HandshakeError::BadOptionMagic(magic));
        }
        let option = stream.read_u32().await?;
        let len = stream.read_u32().await?;
        if len > MAX_OPTION_LEN {
            if len > MAX_PAYLOAD {
                return Err(HandshakeError::OptionTooLarge(len));
            }
            let mut sink = tokio::io::sink();
            tokio::io::copy(&mut (&mut *stream).take(u64::from(len)), &mut sink).await?;
            OptionReplies { stream }
                .error(option, REP_ERR_TOO_BIG, "option payload too large")
                .await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        stream.read_exact(&mut data).await?;
        let mut replies = OptionReplies {
            stream: &mut *stream,
        };
        if tls_pending && !matches!(option, OPT_STARTTLS | OPT_ABORT) {
            if option == OPT_EXPORT_NAME {
                return Err(HandshakeError::TlsRequired);
            }
            replies
                .error(
                    option,
                    REP_ERR_TLS_REQD,
                    "this server requires TLS: NBD_OPT_STARTTLS first",
                )
                .await?;
            continue;
        }
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some(entry) = exports.resolve(&name) else {
                    // This option has no error reply: the spec says to close.
                    return Err(HandshakeError::UnknownExport(name));
                };
                if access.check(&entry).is_err() {
                    return Err(HandshakeError::RefusedExport(name));
                }
                let mut reply = Vec::with_capacity(134);
                reply.extend_from_slice(&entry.export.size().to_be_bytes());
                reply.extend_from_slice(&transmission_flags(&entry, structured).to_be_bytes());
                if !no_zeroes {
                    reply.extend_from_slice(&[0u8; 124]);
                }
                stream.write_all(&reply).await?;
                stream.flush().await?;
                let base_allocation = meta_for(&meta, &entry.name);
                return Ok(Step::Go(Negotiated {
                    export: entry,
                    structured,
                    base_allocation,
                }));
            }
            OPT_ABORT => {
                replies.send(option, REP_ACK, &[]).await.ok();
                return Err(HandshakeError::Aborted);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    replies
                        .error(option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
                        .await?;
                    continue;
                }
                for entry in exports.iter().filter(|e| access.check(e).is_ok()) {
                    let mut d = (entry.name.len() as u32).to_be_bytes().to_vec();
                    d.extend_from_slice(entry.name.as_bytes());
                    d.extend_from_slice(entry.description.as_bytes());
                    replies.send(option, REP_SERVER, &d).await?;
                }
                replies.send(option, REP_ACK, &[]).await?;
            }
            OPT_STARTTLS => {
                let refusal = match (tls, access.tls, data.is_empty()) {
                    (TlsMode::Off, ..) => Some((REP_ERR_UNSUP, "TLS is not configured")),
                    (_, true, _) => Some((REP_ERR_INVALID, "TLS is already negotiated")),
                    (_, _, false) => Some((REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")),
                    _ => None,
                };
                match refusal {
                    Some((code, message)) => replies.error(option, code, message).await?,
                    None => {
                        replies.send(option, REP_ACK, &[]).await?;
                        return Ok(Step::StartTls);
                    }
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    replies
                        .error(
                            option,
                            REP_ERR_INVALID,
                            "NBD_OPT_STRUCTURED_REPLY takes no data",
                        )
                        .await?;
                    continue;
                }
                structured = true;
                replies.send(option, REP_ACK, &[]).await?;
            }
            OPT_INFO | OPT_GO => {
                let (request, entry) =
                    match with_export(parse_info_request(&data), |r| &r.name, exports, access) {
                        Ok(found) => found,
                        Err((code, message)) => {
                            replies.error(option, code, &message).await?;
                            continue;
                        }
                    };
                replies
                    .export_info(option, &entry, structured, &request.infos)
                    .await?;
                replies.send(option, REP_ACK, &[]).await?;
                if option == OPT_GO {
                    let base_allocation = meta_for(&meta, &entry.name);
                    return Ok(Step::Go(Negotiated {
                        export: entry,
                        structured,
                        base_allocation,
                    }));
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = option == OPT_SET_META_CONTEXT;
                if !structured {
                    replies
                        .error(
                            option,
                            REP_ERR_INVALID,
                            "negotiate structured replies first",
                        )
                        .await?;
                    continue;
                }
                let (request, entry) =
                    match with_export(parse_meta_request(&data), |r| &r.export, exports, access) {
                        Ok(found) => found,
                        Err((code, message)) => {
                            replies.error(option, code, &message).await?;
                            continue;
                        }
                    };
                let selected = if !set && request.queries.is_empty() {
                    true
                } else {
                    request
                        .queries
                        .iter()
                        .any(|q| selects_base_allocation(q, !set))
                };
                if selected {
                    let mut d = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                    d.extend_from_slice(BASE_ALLOCATION.as_bytes());
                    replies.send(option, REP_META_CONTEXT, &d).await?;
                }
                if set {
                    meta = Some((entry.name.clone(), selected));
                }
                replies.send(option, REP_ACK, &[]).await?;
            }
            _ => {
                replies
                    .error(option, REP_ERR_UNSUP, "unsupported option")
                    .await?;
            }
        }
    }
    Err(HandshakeError::TooManyOptions)
}

fn meta_for(meta: &Option<(String, bool)>, export: &str) -> bool {
    matches!(meta, Some((name, true)) if name == export)
}

#[cfg(test)]
mod tls_policy;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_request_round_trip() {
        let data = b"\0\0\0\x04disk\0\x02\0\x03\0\x01";
        assert_eq!(
            parse_info_request(data).unwrap(),
            InfoRequest {
                name: "disk".into(),
                infos: vec![INFO_BLOCK_SIZE, INFO_NAME]
            }
        );
    }

    #[test]
    fn info_request_checks_lengths() {
        assert_eq!(
            parse_info_request(b"\0\0\0\x09disk\0\0"),
            Err(BadOption("export name"))
        );
        assert_eq!(
            parse_info_request(b"\0\0\0\x04disk\0\x02\0\x03"),
            Err(BadOption("info type"))
        );
        assert_eq!(
            parse_info_request(b"\0\0\0\0\0\0\xff"),
            Err(BadOption("trailing bytes"))
        );
        assert_eq!(parse_info_request(b"\0\0"), Err(BadOption("export name")));
        assert_eq!(
            parse_info_request(b"\xff\xff\xff\xff"),
            Err(BadOption("string longer than 4096 bytes"))
        );
    }

    #[test]
    fn meta_request_parses_queries() {
        let data = b"\0\0\0\x04disk\0\0\0\x02\0\0\0\x0fbase:allocation\0\0\0\x05base:";
        let r = parse_meta_request(data).unwrap();
        assert_eq!(r.export, "disk");
        assert_eq!(r.queries, vec!["base:allocation", "base:"]);
        assert!(selects_base_allocation(&r.queries[0], false));
        assert!(!selects_base_allocation(&r.queries[1], false));
        assert!(selects_base_allocation(&r.queries[1], true));
        assert_eq!(
            parse_meta_request(&data[..data.len() - 1]),
            Err(BadOption("query"))
        );
    }
}
