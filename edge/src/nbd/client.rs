//! A small blocking NBD client: fixed newstyle, optional TLS (`NBD_OPT_STARTTLS`,
//! `client_tls`), `NBD_OPT_EXPORT_NAME`, simple replies, one request at a time (plus pipelined
//! reads for tests that need them).
//!
//! Why a client of our own next to the server: crash tests and the cluster benchmark must know
//! exactly which writes were acknowledged, and must reconnect to another address (a volume's new
//! owner) at a moment they choose. libnbd does both, but only through C bindings or a Python
//! shell, and `nbd-client` needs a kernel NBD device, which only a QEMU guest has here. The wire
//! constants are the server's own ([`super::proto`]), so client and server share one codec
//! definition. Every violation of the protocol by the server is an `InvalidData` error, never a
//! panic: the client talks to processes that may die mid-reply.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use super::client_tls::{open, ClientTls, Stream};
use super::proto::{
    IHAVEOPT, NBDMAGIC, NBD_CMD_FLAG_FUA, NBD_CMD_FLUSH, NBD_CMD_READ, NBD_CMD_WRITE,
    NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES, NBD_FLAG_FIXED_NEWSTYLE, NBD_OPT_EXPORT_NAME,
    NBD_REQUEST_MAGIC, NBD_SIMPLE_REPLY_MAGIC,
};

pub(super) fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

pub(super) fn be_u32(bytes: &[u8]) -> u32 {
    let mut out = [0u8; 4];
    out.copy_from_slice(&bytes[..4]);
    u32::from_be_bytes(out)
}

pub(super) fn be_u64(bytes: &[u8]) -> u64 {
    let mut out = [0u8; 8];
    out.copy_from_slice(&bytes[..8]);
    u64::from_be_bytes(out)
}

/// Read the server's greeting on a new connection and answer it (fixed newstyle, no zeroes);
/// returns the server's address for messages.
pub(super) fn greet(stream: &mut TcpStream) -> io::Result<String> {
    stream.set_nodelay(true)?;
    let addr = stream
        .peer_addr()
        .map_or_else(|_| "the server".to_owned(), |a| a.to_string());
    let mut hello = [0u8; 18];
    stream.read_exact(&mut hello)?;
    if be_u64(&hello) != NBDMAGIC || be_u64(&hello[8..]) != IHAVEOPT {
        return Err(invalid(format!("{addr} is not an NBD newstyle server")));
    }
    let flags = u16::from_be_bytes([hello[16], hello[17]]);
    if flags & NBD_FLAG_FIXED_NEWSTYLE == 0 {
        return Err(invalid(format!(
            "{addr} is not a fixed newstyle NBD server"
        )));
    }
    stream.write_all(&(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES).to_be_bytes())?;
    Ok(addr)
}

/// One connection to one export.
pub struct NbdClient {
    stream: Stream,
    /// Size of the export in bytes, as the server announced it.
    pub size: u64,
    cookie: u64,
}

impl NbdClient {
    /// Connect to `addr` (HOST:PORT) and attach to `export`.
    pub fn connect(addr: &str, export: &str) -> io::Result<Self> {
        Self::connect_timeout(addr, export, None)
    }

    /// As [`connect`](Self::connect), with `timeout` on every socket read and write (so a dead
    /// or stopped server gives an error instead of a hang).
    pub fn connect_timeout(
        addr: &str,
        export: &str,
        timeout: Option<Duration>,
    ) -> io::Result<Self> {
        Self::connect_tls(addr, export, timeout, None)
    }

    /// As [`connect_timeout`](Self::connect_timeout), over TLS when `tls` is given (the
    /// connection is upgraded with `NBD_OPT_STARTTLS` before the export is named).
    pub fn connect_tls(
        addr: &str,
        export: &str,
        timeout: Option<Duration>,
        tls: Option<&ClientTls>,
    ) -> io::Result<Self> {
        let (stream, server) = open(addr, timeout, tls)?;
        Self::attach(stream, &server, export)
    }

    /// Attach to `export` over `stream`, a connection the caller made (for example from a
    /// chosen source address); its timeouts are left as they are.
    pub fn over(mut stream: TcpStream, export: &str) -> io::Result<Self> {
        let addr = greet(&mut stream)?;
        Self::attach(Stream::Plain(stream), &addr, export)
    }

    /// Name `export` on a greeted (and maybe upgraded) connection.
    fn attach(mut stream: Stream, addr: &str, export: &str) -> io::Result<Self> {
        let mut option = Vec::with_capacity(16 + export.len());
        option.extend_from_slice(&IHAVEOPT.to_be_bytes());
        option.extend_from_slice(&NBD_OPT_EXPORT_NAME.to_be_bytes());
        let name_len = u32::try_from(export.len())
            .map_err(|_| invalid(format!("export name of {} bytes", export.len())))?;
        option.extend_from_slice(&name_len.to_be_bytes());
        option.extend_from_slice(export.as_bytes());
        stream.write_all(&option)?;
        // The server closes the connection on an unknown export name (that is all
        // NBD_OPT_EXPORT_NAME allows it to do), which reads as an unexpected EOF here.
        let mut reply = [0u8; 10];
        stream.read_exact(&mut reply).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("{addr} refused export {export:?} (or closed): {e}"),
            )
        })?;
        Ok(Self {
            stream,
            size: be_u64(&reply),
            cookie: 0,
        })
    }

    pub(super) fn header(flags: u16, kind: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
        let mut header = [0u8; 28];
        header[..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        header[4..6].copy_from_slice(&flags.to_be_bytes());
        header[6..8].copy_from_slice(&kind.to_be_bytes());
        header[8..16].copy_from_slice(&cookie.to_be_bytes());
        header[16..24].copy_from_slice(&offset.to_be_bytes());
        header[24..].copy_from_slice(&len.to_be_bytes());
        header
    }

    /// A simple reply's (error, cookie).
    fn read_reply(&mut self) -> io::Result<(u32, u64)> {
        let mut reply = [0u8; 16];
        self.stream.read_exact(&mut reply)?;
        if be_u32(&reply) != NBD_SIMPLE_REPLY_MAGIC {
            return Err(invalid(format!(
                "reply magic {:#x} is not a simple reply",
                be_u32(&reply)
            )));
        }
        Ok((be_u32(&reply[4..]), be_u64(&reply[8..])))
    }

    /// Send one request and wait for its reply; returns the NBD error code (0: success).
    fn request(
        &mut self,
        flags: u16,
        kind: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<u32> {
        self.cookie += 1;
        let header = Self::header(flags, kind, self.cookie, offset, len);
        self.stream.write_all(&header)?;
        self.stream.write_all(payload)?;
        let (error, cookie) = self.read_reply()?;
        if cookie != self.cookie {
            return Err(invalid(format!(
                "reply to cookie {cookie}, expected {}",
                self.cookie
            )));
        }
        Ok(error)
    }

    /// Write `data` at `offset`; returns the NBD error code (0: acknowledged).
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> io::Result<u32> {
        let flags = if fua { NBD_CMD_FLAG_FUA } else { 0 };
        let len = u32::try_from(data.len())
            .map_err(|_| invalid(format!("write of {} bytes", data.len())))?;
        self.request(flags, NBD_CMD_WRITE, offset, len, data)
    }

    /// FLUSH; returns the NBD error code.
    pub fn flush(&mut self) -> io::Result<u32> {
        self.request(0, NBD_CMD_FLUSH, 0, 0, &[])
    }

    /// Read `buf.len()` bytes at `offset`; returns the NBD error code (`buf` is filled on 0).
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<u32> {
        let len = u32::try_from(buf.len())
            .map_err(|_| invalid(format!("read of {} bytes", buf.len())))?;
        let error = self.request(0, NBD_CMD_READ, offset, len, &[])?;
        if error == 0 {
            self.stream.read_exact(buf)?;
        }
        Ok(error)
    }

    /// Send a READ without waiting for its reply (pipelining); collect it with
    /// [`reply`](Self::reply).
    pub fn send_read(&mut self, cookie: u64, offset: u64, len: u32) -> io::Result<()> {
        let header = Self::header(0, NBD_CMD_READ, cookie, offset, len);
        self.stream.write_all(&header)
    }

    /// The next reply to a READ sent with [`send_read`](Self::send_read): (cookie, error, data),
    /// where `len_of` gives the length each outstanding cookie asked for.
    pub fn reply(&mut self, len_of: impl Fn(u64) -> usize) -> io::Result<(u64, u32, Vec<u8>)> {
        let (error, cookie) = self.read_reply()?;
        let mut data = Vec::new();
        if error == 0 {
            data.resize(len_of(cookie), 0);
            self.stream.read_exact(&mut data)?;
        }
        Ok((cookie, error, data))
    }
}
