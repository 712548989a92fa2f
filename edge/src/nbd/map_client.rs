//! A blocking NBD client for one question: which ranges of an export hold data
//! (`NBD_CMD_BLOCK_STATUS` in the `base:allocation` context).
//!
//! Why next to [`NbdClient`](super::client::NbdClient) rather than inside it: block status
//! needs structured replies, and once a connection has negotiated them every reply may come
//! in chunks (a read as data and hole chunks); the plain client's callers (crash tests, the
//! cluster benchmark, `volume import`/`export` reads) rely on its simple replies. So this one
//! negotiates `NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_SET_META_CONTEXT base:allocation` and
//! `NBD_OPT_GO`, and sends nothing but block status; `vstor volume export` runs it on a
//! second connection beside its reads, so holes are skipped without reading them. Every
//! violation of the protocol by the server is an `InvalidData` error, never a panic.

use std::io::{self, Read, Write};
use std::time::Duration;

use super::client::{be_u32, be_u64, invalid, NbdClient};
use super::client_tls::{open, ClientTls, Stream};
use super::proto::{
    IHAVEOPT, NBD_CMD_BLOCK_STATUS, NBD_INFO_EXPORT, NBD_OPT_GO, NBD_OPT_SET_META_CONTEXT,
    NBD_OPT_STRUCTURED_REPLY, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS,
    NBD_REPLY_TYPE_ERROR, NBD_REPLY_TYPE_NONE, NBD_REP_ACK, NBD_REP_FLAG_ERROR, NBD_REP_INFO,
    NBD_REP_MAGIC, NBD_REP_META_CONTEXT, NBD_STATE_ZERO, NBD_STRUCTURED_REPLY_MAGIC,
};

/// The metadata context asked for.
const BASE_ALLOCATION: &str = "base:allocation";
/// Option replies and chunks longer than this are refused (a hostile or broken server).
const MAX_PAYLOAD: u32 = 1 << 20;

/// One run of an export's allocation map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub offset: u64,
    pub length: u64,
    /// The run reads as zeros (`NBD_STATE_ZERO`): a hole, or data known to be zero.
    pub zero: bool,
}

/// A connection that asks one export for its allocation map.
pub struct MapClient {
    stream: Stream,
    /// Size of the export in bytes, as the server announced it.
    pub size: u64,
    context: u32,
    cookie: u64,
}

impl MapClient {
    /// Connect to `addr` (HOST:PORT) and negotiate block status on `export`, with `timeout` on
    /// every socket read and write, over TLS when `tls` is given (`NBD_OPT_STARTTLS` first).
    pub fn connect(
        addr: &str,
        export: &str,
        timeout: Option<Duration>,
        tls: Option<&ClientTls>,
    ) -> io::Result<Self> {
        let (stream, server) = open(addr, timeout, tls)?;
        let mut client = Self {
            stream,
            size: 0,
            context: 0,
            cookie: 0,
        };
        client.negotiate(NBD_OPT_STRUCTURED_REPLY, &[], &server, |_, _| false)?;

        let name = u32::try_from(export.len())
            .map_err(|_| invalid(format!("export name of {} bytes", export.len())))?;
        let mut query = Vec::new();
        query.extend_from_slice(&name.to_be_bytes());
        query.extend_from_slice(export.as_bytes());
        query.extend_from_slice(&1u32.to_be_bytes());
        query.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
        query.extend_from_slice(BASE_ALLOCATION.as_bytes());
        let mut context = None;
        client.negotiate(NBD_OPT_SET_META_CONTEXT, &query, &server, |kind, data| {
            let ours = kind == NBD_REP_META_CONTEXT && data.len() >= 4;
            if ours && &data[4..] == BASE_ALLOCATION.as_bytes() {
                context = Some(be_u32(data));
            }
            ours
        })?;
        client.context = context.ok_or_else(|| {
            invalid(format!(
                "{server} offers no {BASE_ALLOCATION} context for export {export:?}"
            ))
        })?;

        let mut go = Vec::new();
        go.extend_from_slice(&name.to_be_bytes());
        go.extend_from_slice(export.as_bytes());
        go.extend_from_slice(&0u16.to_be_bytes());
        let mut size = None;
        client.negotiate(NBD_OPT_GO, &go, &server, |kind, data| {
            if kind != NBD_REP_INFO {
                return false;
            }
            if data.len() >= 10 && u16::from_be_bytes([data[0], data[1]]) == NBD_INFO_EXPORT {
                size = Some(be_u64(&data[2..]));
            }
            true
        })?;
        client.size = size.ok_or_else(|| invalid(format!("{server} sent no export size")))?;
        Ok(client)
    }

    /// Send `option` with `data` and take its replies up to the final ACK, handing each other
    /// reply to `take` (its type and data), which says whether it expected it; an unexpected
    /// reply or an error reply is an error.
    fn negotiate(
        &mut self,
        option: u32,
        data: &[u8],
        server: &str,
        mut take: impl FnMut(u32, &[u8]) -> bool,
    ) -> io::Result<()> {
        let mut out = Vec::with_capacity(16 + data.len());
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
        self.stream.write_all(&out)?;
        loop {
            match self.option_reply(option, server)? {
                (NBD_REP_ACK, _) => return Ok(()),
                (kind, data) if take(kind, &data) => {}
                (kind, _) => {
                    return Err(invalid(format!(
                        "{server}: unexpected reply {kind} to option {option}"
                    )))
                }
            }
        }
    }

    /// The next reply to `option`: its type and data; an error reply is an error, with the
    /// server's message.
    fn option_reply(&mut self, option: u32, server: &str) -> io::Result<(u32, Vec<u8>)> {
        let mut head = [0u8; 20];
        self.stream.read_exact(&mut head)?;
        if be_u64(&head) != NBD_REP_MAGIC || be_u32(&head[8..]) != option {
            return Err(invalid(format!(
                "{server}: bad reply header to option {option}"
            )));
        }
        let (kind, len) = (be_u32(&head[12..]), be_u32(&head[16..]));
        if len > MAX_PAYLOAD {
            return Err(invalid(format!("{server}: option reply of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        self.stream.read_exact(&mut data)?;
        if kind & NBD_REP_FLAG_ERROR != 0 {
            return Err(io::Error::other(format!(
                "{server} refused option {option} ({kind:#x}): {}",
                String::from_utf8_lossy(&data)
            )));
        }
        Ok((kind, data))
    }

    /// The allocation of `[offset, offset + len)` (`len` at most 4 GiB − 1): runs from
    /// `offset` on, as far as the server chose to describe (at least one run, never past the
    /// range). Errors from the server are `Other` errors with its message.
    pub fn block_status(&mut self, offset: u64, len: u32) -> io::Result<Vec<Run>> {
        self.cookie += 1;
        let header = NbdClient::header(0, NBD_CMD_BLOCK_STATUS, self.cookie, offset, len);
        self.stream.write_all(&header)?;
        let mut runs = Vec::new();
        let mut at = offset;
        let end = offset + u64::from(len);
        loop {
            let mut head = [0u8; 20];
            self.stream.read_exact(&mut head)?;
            if be_u32(&head) != NBD_STRUCTURED_REPLY_MAGIC {
                return Err(invalid(format!(
                    "reply magic {:#x} is not a structured reply",
                    be_u32(&head)
                )));
            }
            let flags = u16::from_be_bytes([head[4], head[5]]);
            let kind = u16::from_be_bytes([head[6], head[7]]);
            let (cookie, length) = (be_u64(&head[8..]), be_u32(&head[16..]));
            if cookie != self.cookie {
                return Err(invalid(format!(
                    "reply to cookie {cookie}, expected {}",
                    self.cookie
                )));
            }
            if length > MAX_PAYLOAD {
                return Err(invalid(format!("reply chunk of {length} bytes")));
            }
            let mut data = vec![0u8; length as usize];
            self.stream.read_exact(&mut data)?;
            match kind {
                NBD_REPLY_TYPE_BLOCK_STATUS => {
                    if data.len() < 4 || !(data.len() - 4).is_multiple_of(8) {
                        return Err(invalid(format!("block status chunk of {length} bytes")));
                    }
                    if be_u32(&data) != self.context {
                        return Err(invalid(format!(
                            "block status for context {}, asked for {}",
                            be_u32(&data),
                            self.context
                        )));
                    }
                    for descriptor in data[4..].chunks_exact(8) {
                        let (length, state) = (be_u32(descriptor), be_u32(&descriptor[4..]));
                        let length = u64::from(length).min(end.saturating_sub(at));
                        if length == 0 {
                            return Err(invalid(format!(
                                "empty or out-of-range extent at {at} (asked {offset}+{len})"
                            )));
                        }
                        runs.push(Run {
                            offset: at,
                            length,
                            zero: state & NBD_STATE_ZERO != 0,
                        });
                        at += length;
                    }
                }
                NBD_REPLY_TYPE_ERROR => {
                    let error = if data.len() >= 4 { be_u32(&data) } else { 0 };
                    let message = data
                        .get(6..)
                        .map(String::from_utf8_lossy)
                        .unwrap_or_default();
                    return Err(io::Error::other(format!(
                        "block status at {offset}+{len} failed (NBD error {error}): {message}"
                    )));
                }
                NBD_REPLY_TYPE_NONE => {}
                other => return Err(invalid(format!("unexpected reply chunk type {other}"))),
            }
            if flags & NBD_REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        if runs.is_empty() {
            return Err(invalid(format!(
                "no extents for block status at {offset}+{len}"
            )));
        }
        Ok(runs)
    }
}
