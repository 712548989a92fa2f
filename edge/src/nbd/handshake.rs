//! Fixed-newstyle option haggling.
//!
//! Written as plain sequential async code over `AsyncRead + AsyncWrite` rather than a codec: the
//! handshake is a strict request/response dialogue that happens once per connection, so clarity
//! beats batching here. It reads the stream exactly (no read-ahead buffer), which guarantees that a
//! client that pipelines its first transmission request right behind `NBD_OPT_GO` finds those
//! bytes still in the socket for the transmission phase.
//!
//! Every option's data is read completely before it is parsed, and it is bounded
//! ([`MAX_OPTION_LEN`]); oversized option data is drained and answered with `NBD_REP_ERR_TOO_BIG`
//! so the client can carry on. Only the irrecoverable cases close the connection: a bad option
//! magic, unknown client flags, and a failing `NBD_OPT_EXPORT_NAME` (which has no error reply).
//!
//! TLS (see `tls`): the greeting ([`greet`]) happens once; option haggling ([`negotiate`]) runs
//! on the plain stream and, after `NBD_OPT_STARTTLS` was acknowledged ([`Outcome::StartTls`]),
//! once more from scratch on the encrypted stream. [`TlsPhase`] says which of the two it is and
//! whether the plain one may do anything but upgrade.
//!
//! Allow lists: every option that names an export asks the registry whether this [`Client`]
//! (peer address, and after TLS the verified certificate's CN) may use it
//! ([`ExportRegistry::allows`]); `NBD_OPT_LIST` leaves out what it may not. A refused export gets
//! the same reply as an unknown one, byte for byte, so refusals do not reveal which exports exist.

use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, info};

use super::proto::*;
use super::NbdError;
use crate::target::{BlockTarget, Client, ExportRegistry};

/// Largest option payload accepted (the biggest legitimate one, a meta-context request with a few
/// queries, is far below this).
pub(crate) const MAX_OPTION_LEN: u32 = 64 * 1024;
pub(crate) const BASE_ALLOCATION: &str = "base:allocation";
/// The id `base:allocation` gets when selected; any nonzero value works, it is per connection.
pub(crate) const BASE_ALLOCATION_ID: u32 = 1;
pub(crate) const MIN_BLOCK_SIZE: u32 = 512;
pub(crate) const PREFERRED_BLOCK_SIZE: u32 = 4096;

/// The result of a successful handshake: what the transmission phase needs to know.
pub(crate) struct Negotiated {
    pub name: String,
    pub target: Arc<dyn BlockTarget>,
    pub structured: bool,
    /// Context id of `base:allocation` when it was selected for the export that was entered.
    pub base_allocation: Option<u32>,
}

pub(crate) enum Outcome {
    Transmission(Negotiated),
    /// The client sent `NBD_OPT_ABORT`.
    Aborted,
    /// `NBD_OPT_STARTTLS` was acknowledged: the TLS handshake comes next on the same socket.
    StartTls,
}

/// Where option haggling stands with respect to TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TlsPhase {
    /// The server has no TLS configuration: `NBD_OPT_STARTTLS` is unsupported.
    Unavailable,
    /// Plain text, TLS offered; `required`: nothing but `STARTTLS` and `ABORT` is allowed.
    Offered { required: bool },
    /// The connection is already encrypted.
    Active,
}

/// Transmission flags for a target: everything we implement, minus the write side when read-only.
pub(crate) fn transmission_flags(target: &dyn BlockTarget) -> u16 {
    let mut flags =
        NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_CAN_MULTI_CONN;
    if target.read_only() {
        flags |= NBD_FLAG_READ_ONLY;
    } else {
        flags |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO;
    }
    flags
}

enum Step {
    Next,
    Abort,
    Go(Negotiated),
    StartTls,
}

struct Negotiation<'a> {
    registry: &'a dyn ExportRegistry,
    client: &'a Client,
    tls: TlsPhase,
    max_payload: u32,
    structured: bool,
    /// Export for which `base:allocation` is currently selected.
    meta_export: Option<String>,
    out: BytesMut,
}

/// Bounds-checked big-endian reader over an option's data.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Some(head)
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A string prefixed by its 32-bit length.
    fn string(&mut self) -> Option<&'a [u8]> {
        let len = self.u32()?;
        self.take(usize::try_from(len).ok()?)
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// Why an option was refused: the error reply type and a message for the user.
type Refusal = (u32, String);

fn invalid(message: impl Into<String>) -> Refusal {
    (NBD_REP_ERR_INVALID, message.into())
}

fn utf8_name(raw: &[u8]) -> Result<&str, Refusal> {
    if raw.len() > MAX_STRING_LEN {
        return Err(invalid("string longer than 4096 bytes"));
    }
    std::str::from_utf8(raw).map_err(|_| invalid("string is not UTF-8"))
}

impl Negotiation<'_> {
    fn reply(&mut self, option: u32, kind: u32, data: &[u8]) {
        self.out.reserve(20 + data.len());
        self.out.put_u64(NBD_REP_MAGIC);
        self.out.put_u32(option);
        self.out.put_u32(kind);
        self.out.put_u32(data.len() as u32);
        self.out.put_slice(data);
    }

    fn lookup(&self, name: &str) -> Result<Arc<dyn BlockTarget>, Refusal> {
        // There is no default export: an empty name never matches.
        if name.is_empty() {
            return Err((
                NBD_REP_ERR_UNKNOWN,
                "no default export; give a volume name".into(),
            ));
        }
        let unknown = || (NBD_REP_ERR_UNKNOWN, format!("unknown export {name:?}"));
        // Asked before `lookup`: a refused client does not even get a snapshot view built. The
        // refusal is the unknown-export reply, word for word, so it reveals nothing.
        if !self.registry.allows(name, self.client) {
            info!(export = name, client = %self.client.addr, subject = ?self.client.subject,
                "NBD export refused by its allow list; answered as unknown");
            return Err(unknown());
        }
        self.registry.lookup(name).ok_or_else(unknown)
    }

    fn finish(&self, name: String, target: Arc<dyn BlockTarget>) -> Negotiated {
        let base_allocation =
            (self.meta_export.as_deref() == Some(name.as_str())).then_some(BASE_ALLOCATION_ID);
        Negotiated {
            name,
            target,
            structured: self.structured,
            base_allocation,
        }
    }

    fn handle(&mut self, option: u32, data: &[u8]) -> Step {
        let result = match option {
            NBD_OPT_ABORT => {
                self.reply(option, NBD_REP_ACK, &[]);
                return Step::Abort;
            }
            NBD_OPT_STARTTLS => match self.start_tls(option, data) {
                Ok(()) => return Step::StartTls,
                Err(refusal) => Err(refusal),
            },
            _ if self.tls == (TlsPhase::Offered { required: true }) => Err((
                NBD_REP_ERR_TLS_REQD,
                "TLS is required: send NBD_OPT_STARTTLS first".into(),
            )),
            NBD_OPT_LIST => self.list(option, data),
            NBD_OPT_INFO | NBD_OPT_GO => match self.info(option, data) {
                Ok(Some(negotiated)) => return Step::Go(negotiated),
                Ok(None) => Ok(()),
                Err(refusal) => Err(refusal),
            },
            NBD_OPT_STRUCTURED_REPLY => self.structured_reply(option, data),
            NBD_OPT_LIST_META_CONTEXT | NBD_OPT_SET_META_CONTEXT => self.meta_context(option, data),
            _ => Err((
                NBD_REP_ERR_UNSUP,
                format!("option {option} is not supported"),
            )),
        };
        if let Err((kind, message)) = result {
            debug!(option, kind, %message, "refusing NBD option");
            self.reply(option, kind, message.as_bytes());
        }
        Step::Next
    }

    fn start_tls(&mut self, option: u32, data: &[u8]) -> Result<(), Refusal> {
        match self.tls {
            TlsPhase::Unavailable => Err((
                NBD_REP_ERR_UNSUP,
                "TLS is not configured on this server".into(),
            )),
            TlsPhase::Active => Err(invalid("TLS is already active")),
            TlsPhase::Offered { .. } if !data.is_empty() => {
                Err(invalid("NBD_OPT_STARTTLS takes no data"))
            }
            TlsPhase::Offered { .. } => {
                self.reply(option, NBD_REP_ACK, &[]);
                Ok(())
            }
        }
    }

    fn list(&mut self, option: u32, data: &[u8]) -> Result<(), Refusal> {
        if !data.is_empty() {
            return Err(invalid("NBD_OPT_LIST takes no data"));
        }
        for name in self.registry.list() {
            if name.len() > MAX_STRING_LEN || !self.registry.allows(&name, self.client) {
                continue;
            }
            let mut entry = Vec::with_capacity(4 + name.len());
            entry.extend_from_slice(&(name.len() as u32).to_be_bytes());
            entry.extend_from_slice(name.as_bytes());
            self.reply(option, NBD_REP_SERVER, &entry);
        }
        self.reply(option, NBD_REP_ACK, &[]);
        Ok(())
    }

    /// `NBD_OPT_INFO` / `NBD_OPT_GO`; returns the negotiated export when a `GO` succeeded.
    fn info(&mut self, option: u32, data: &[u8]) -> Result<Option<Negotiated>, Refusal> {
        let mut r = Reader { buf: data };
        let name = r.string().ok_or_else(|| invalid("truncated export name"))?;
        let count = r
            .u16()
            .ok_or_else(|| invalid("missing information request count"))?;
        let mut requests = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            requests.push(
                r.u16()
                    .ok_or_else(|| invalid("truncated information requests"))?,
            );
        }
        if !r.is_empty() {
            return Err(invalid("trailing bytes after information requests"));
        }
        let name = utf8_name(name)?.to_owned();
        let target = self.lookup(&name)?;

        let mut export = Vec::with_capacity(12);
        export.extend_from_slice(&NBD_INFO_EXPORT.to_be_bytes());
        export.extend_from_slice(&target.size().to_be_bytes());
        export.extend_from_slice(&transmission_flags(target.as_ref()).to_be_bytes());
        self.reply(option, NBD_REP_INFO, &export);

        if requests.contains(&NBD_INFO_NAME) {
            let mut info = Vec::with_capacity(2 + name.len());
            info.extend_from_slice(&NBD_INFO_NAME.to_be_bytes());
            info.extend_from_slice(name.as_bytes());
            self.reply(option, NBD_REP_INFO, &info);
        }

        let mut block = Vec::with_capacity(14);
        block.extend_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
        block.extend_from_slice(&MIN_BLOCK_SIZE.to_be_bytes());
        block.extend_from_slice(&PREFERRED_BLOCK_SIZE.to_be_bytes());
        block.extend_from_slice(&self.max_payload.to_be_bytes());
        self.reply(option, NBD_REP_INFO, &block);

        self.reply(option, NBD_REP_ACK, &[]);
        Ok((option == NBD_OPT_GO).then(|| self.finish(name, target)))
    }

    fn structured_reply(&mut self, option: u32, data: &[u8]) -> Result<(), Refusal> {
        if !data.is_empty() {
            return Err(invalid("NBD_OPT_STRUCTURED_REPLY takes no data"));
        }
        if self.structured {
            return Err(invalid("structured replies are already negotiated"));
        }
        self.structured = true;
        self.reply(option, NBD_REP_ACK, &[]);
        Ok(())
    }

    fn meta_context(&mut self, option: u32, data: &[u8]) -> Result<(), Refusal> {
        let set = option == NBD_OPT_SET_META_CONTEXT;
        if set {
            // SET replaces the selection even when it fails.
            self.meta_export = None;
        }
        let mut r = Reader { buf: data };
        let name = r.string().ok_or_else(|| invalid("truncated export name"))?;
        let count = r.u32().ok_or_else(|| invalid("missing query count"))?;
        let mut queries = Vec::new();
        for _ in 0..count {
            let query = r.string().ok_or_else(|| invalid("truncated query"))?;
            queries.push(utf8_name(query)?);
        }
        if !r.is_empty() {
            return Err(invalid("trailing bytes after queries"));
        }
        if set && !self.structured {
            return Err(invalid("negotiate structured replies first"));
        }
        let name = utf8_name(name)?.to_owned();
        self.lookup(&name)?;

        let mut context = Vec::with_capacity(4 + BASE_ALLOCATION.len());
        if set {
            if queries.contains(&BASE_ALLOCATION) {
                context.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
                context.extend_from_slice(BASE_ALLOCATION.as_bytes());
                self.reply(option, NBD_REP_META_CONTEXT, &context);
                self.meta_export = Some(name);
            }
        } else if queries.is_empty()
            || queries
                .iter()
                .any(|q| *q == "base:" || *q == BASE_ALLOCATION)
        {
            // Ids in a LIST reply are reserved and must be zero.
            context.extend_from_slice(&0u32.to_be_bytes());
            context.extend_from_slice(BASE_ALLOCATION.as_bytes());
            self.reply(option, NBD_REP_META_CONTEXT, &context);
        }
        self.reply(option, NBD_REP_ACK, &[]);
        Ok(())
    }
}

async fn read_vec<S: AsyncRead + Unpin>(io: &mut S, len: u32) -> std::io::Result<Vec<u8>> {
    let mut data = vec![0u8; len as usize];
    io.read_exact(&mut data).await?;
    Ok(data)
}

async fn discard<S: AsyncRead + Unpin>(io: &mut S, len: u32) -> std::io::Result<()> {
    let copied =
        tokio::io::copy(&mut (&mut *io).take(u64::from(len)), &mut tokio::io::sink()).await?;
    if copied < u64::from(len) {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Send the server greeting on a freshly accepted stream and read the client flags; returns
/// whether the client asked for `NBD_FLAG_C_NO_ZEROES`.
pub(crate) async fn greet<S>(io: &mut S) -> Result<bool, NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut hello = BytesMut::with_capacity(18);
    hello.put_u64(NBDMAGIC);
    hello.put_u64(IHAVEOPT);
    hello.put_u16(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
    io.write_all(&hello).await?;

    let client_flags = io.read_u32().await?;
    if client_flags & !(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES) != 0 {
        return Err(NbdError::UnknownClientFlags(client_flags));
    }
    Ok(client_flags & NBD_FLAG_C_NO_ZEROES != 0)
}

/// Haggle options until the client enters the transmission phase, aborts, or upgrades to TLS.
/// `max_payload` is advertised as the maximum block size; `client` is checked against each
/// export's allow list ([`ExportRegistry::allows`]).
pub(crate) async fn negotiate<S>(
    io: &mut S,
    registry: &dyn ExportRegistry,
    client: &Client,
    max_payload: u32,
    no_zeroes: bool,
    tls: TlsPhase,
) -> Result<Outcome, NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut n = Negotiation {
        registry,
        client,
        tls,
        max_payload,
        structured: false,
        meta_export: None,
        out: BytesMut::with_capacity(256),
    };
    loop {
        let magic = io.read_u64().await?;
        if magic != IHAVEOPT {
            return Err(NbdError::BadOptionMagic(magic));
        }
        let option = io.read_u32().await?;
        let len = io.read_u32().await?;
        debug!(option, len, "NBD option");

        if option == NBD_OPT_EXPORT_NAME {
            if tls == (TlsPhase::Offered { required: true }) {
                return Err(NbdError::TlsRequired);
            }
            if len as usize > MAX_STRING_LEN {
                return Err(NbdError::ExportNameTooLong(len));
            }
            let raw = read_vec(io, len).await?;
            let name = String::from_utf8(raw).map_err(|e| {
                NbdError::UnknownExport(String::from_utf8_lossy(e.as_bytes()).into())
            })?;
            let target = n
                .lookup(&name)
                .map_err(|_| NbdError::UnknownExport(name.clone()))?;
            let mut reply = BytesMut::with_capacity(10 + 124);
            reply.put_u64(target.size());
            reply.put_u16(transmission_flags(target.as_ref()));
            if !no_zeroes {
                reply.put_bytes(0, 124);
            }
            io.write_all(&reply).await?;
            io.flush().await?;
            return Ok(Outcome::Transmission(n.finish(name, target)));
        }

        let step = if len > MAX_OPTION_LEN {
            discard(io, len).await?;
            if option == NBD_OPT_ABORT {
                n.reply(option, NBD_REP_ACK, &[]);
                Step::Abort
            } else {
                n.reply(option, NBD_REP_ERR_TOO_BIG, b"option data too large");
                Step::Next
            }
        } else {
            let data = read_vec(io, len).await?;
            n.handle(option, &data)
        };

        // A TLS stream holds written bytes until flushed; on TCP the flush is a no-op.
        let written = match io.write_all(&n.out).await {
            Ok(()) => io.flush().await,
            Err(e) => Err(e),
        };
        n.out.clear();
        match step {
            // The client may already have hung up after sending ABORT; that is fine.
            Step::Abort => return Ok(Outcome::Aborted),
            Step::Next => written?,
            Step::Go(negotiated) => {
                written?;
                return Ok(Outcome::Transmission(negotiated));
            }
            Step::StartTls => {
                written?;
                return Ok(Outcome::StartTls);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{MemRegistry, MemTarget};

    fn registry() -> MemRegistry {
        let r = MemRegistry::new();
        r.insert("vol", Arc::new(MemTarget::new(1 << 20)));
        r
    }

    fn peer(subject: Option<&str>) -> Client {
        Client {
            addr: "127.0.0.1:5000".parse().unwrap(),
            subject: subject.map(str::to_owned),
        }
    }

    async fn option(c: &mut tokio::io::DuplexStream, option: u32, data: &[u8]) {
        let mut b = BytesMut::new();
        b.put_u64(IHAVEOPT);
        b.put_u32(option);
        b.put_u32(data.len() as u32);
        b.put_slice(data);
        c.write_all(&b).await.unwrap();
    }

    /// (option, reply type, data) of the next option reply.
    async fn reply(c: &mut tokio::io::DuplexStream) -> (u32, u32, Vec<u8>) {
        assert_eq!(c.read_u64().await.unwrap(), NBD_REP_MAGIC);
        let (option, kind, len) = (
            c.read_u32().await.unwrap(),
            c.read_u32().await.unwrap(),
            c.read_u32().await.unwrap(),
        );
        let mut data = vec![0; len as usize];
        c.read_exact(&mut data).await.unwrap();
        (option, kind, data)
    }

    /// Under `require`, everything but STARTTLS is refused with `NBD_REP_ERR_TLS_REQD` (the
    /// export list included), STARTTLS with data is invalid, and a plain STARTTLS is
    /// acknowledged and ends plain-text haggling.
    #[tokio::test]
    async fn required_tls_refuses_everything_but_starttls() {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let registry = registry();
        let phase = TlsPhase::Offered { required: true };
        let task = async {
            negotiate(&mut server, &registry, &peer(None), 1 << 20, true, phase)
                .await
                .map(|o| matches!(o, Outcome::StartTls))
        };
        let talk = async {
            for opt in [NBD_OPT_LIST, NBD_OPT_STRUCTURED_REPLY] {
                option(&mut client, opt, &[]).await;
                let (o, kind, msg) = reply(&mut client).await;
                assert_eq!((o, kind), (opt, NBD_REP_ERR_TLS_REQD));
                assert!(String::from_utf8_lossy(&msg).contains("STARTTLS"));
            }
            option(
                &mut client,
                NBD_OPT_GO,
                &[0, 0, 0, 3, b'v', b'o', b'l', 0, 0],
            )
            .await;
            assert_eq!(reply(&mut client).await.1, NBD_REP_ERR_TLS_REQD);
            option(&mut client, NBD_OPT_STARTTLS, &[1]).await;
            assert_eq!(reply(&mut client).await.1, NBD_REP_ERR_INVALID);
            option(&mut client, NBD_OPT_STARTTLS, &[]).await;
            assert_eq!(reply(&mut client).await.1, NBD_REP_ACK);
        };
        let (started, ()) = tokio::join!(task, talk);
        assert!(started.unwrap());
    }

    #[tokio::test]
    async fn export_name_without_required_tls_closes_and_tls_states_answer_starttls() {
        let registry = registry();
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        option(&mut client, NBD_OPT_EXPORT_NAME, b"vol").await;
        let phase = TlsPhase::Offered { required: true };
        let result = negotiate(&mut server, &registry, &peer(None), 1 << 20, true, phase).await;
        assert!(matches!(result, Err(NbdError::TlsRequired)));

        for (phase, expected) in [
            (TlsPhase::Unavailable, NBD_REP_ERR_UNSUP),
            (TlsPhase::Active, NBD_REP_ERR_INVALID),
        ] {
            let (mut client, mut server) = tokio::io::duplex(64 * 1024);
            option(&mut client, NBD_OPT_STARTTLS, &[]).await;
            option(&mut client, NBD_OPT_ABORT, &[]).await;
            let outcome = negotiate(&mut server, &registry, &peer(None), 1 << 20, true, phase)
                .await
                .unwrap();
            assert!(matches!(outcome, Outcome::Aborted));
            assert_eq!(reply(&mut client).await.1, expected);
        }
    }

    /// A registry that only lets the subject `alice` see `vol`.
    struct AliceOnly(MemRegistry);

    impl ExportRegistry for AliceOnly {
        fn lookup(&self, name: &str) -> Option<Arc<dyn BlockTarget>> {
            self.0.lookup(name)
        }
        fn list(&self) -> Vec<String> {
            self.0.list()
        }
        fn allows(&self, name: &str, client: &Client) -> bool {
            name != "vol" || client.subject.as_deref() == Some("alice")
        }
    }

    fn go_data(name: &str) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        d
    }

    /// LIST hides a refused export, and GO, INFO and meta contexts answer it exactly as an
    /// unknown one; the allowed client gets it.
    #[tokio::test]
    async fn a_refused_export_is_hidden_and_answered_as_unknown() {
        let inner = registry();
        inner.insert("other", Arc::new(MemTarget::new(1 << 20)));
        let registry = AliceOnly(inner);
        for (subject, allowed) in [(None, false), (Some("bob"), false), (Some("alice"), true)] {
            let (mut client_io, mut server) = tokio::io::duplex(64 * 1024);
            let who = peer(subject);
            let task = negotiate(
                &mut server,
                &registry,
                &who,
                1 << 20,
                true,
                TlsPhase::Active,
            );
            let talk = async {
                option(&mut client_io, NBD_OPT_LIST, &[]).await;
                let mut names = Vec::new();
                loop {
                    let (_, kind, data) = reply(&mut client_io).await;
                    if kind == NBD_REP_ACK {
                        break;
                    }
                    names.push(String::from_utf8(data[4..].to_vec()).unwrap());
                }
                names.sort();
                let expected: &[&str] = if allowed {
                    &["other", "vol"]
                } else {
                    &["other"]
                };
                assert_eq!(names, expected);

                let mut answers = Vec::new();
                for name in ["vol", "nosuch"] {
                    option(&mut client_io, NBD_OPT_INFO, &go_data(name)).await;
                    let (_, kind, data) = reply(&mut client_io).await;
                    if kind == NBD_REP_INFO {
                        while reply(&mut client_io).await.1 != NBD_REP_ACK {}
                    }
                    answers.push((kind, String::from_utf8(data).unwrap().replace(name, "X")));
                }
                if allowed {
                    assert_eq!(answers[0].0, NBD_REP_INFO);
                } else {
                    assert_eq!(answers[0], answers[1]);
                    assert_eq!(answers[0].0, NBD_REP_ERR_UNKNOWN);
                }
                option(&mut client_io, NBD_OPT_ABORT, &[]).await;
                assert_eq!(reply(&mut client_io).await.1, NBD_REP_ACK);
            };
            let (outcome, ()) = tokio::join!(task, talk);
            assert!(matches!(outcome.unwrap(), Outcome::Aborted));
        }
    }
}
