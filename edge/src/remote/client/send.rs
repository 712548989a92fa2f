//! The sending half of one connection: frames queued by the frontends' calls, written by the
//! connection's writer task, or, on plain TCP with nothing else in flight, by the caller itself.
//!
//! Why the caller may write: at queue depth 1 every request used to wake the edge runtime's
//! writer task before its frame reached the socket. On an idle vCPU that wake-up costs about as
//! much as the loopback round trip itself (issue 11's QD1 budget is one round trip plus 10 µs).
//! So when no other request is in flight and the writer is not busy, `send` writes the frame with
//! one non-blocking `writev` from the submitting thread (a vhost-user queue thread, an NBD
//! connection task), and only what the kernel did not take is left for the writer. With requests
//! in flight the frame is queued as before and the writer sends everything ready in one
//! vectored write, so deep queues keep their batching. Over TLS the writer always writes (the
//! TLS stream cannot be shared); plain TCP and a unix socket allow both ([`Direct`]).
//!
//! Plugged batches: a frontend that takes many requests at once (a vhost-user queue pass) plugs
//! the target (`BlockTarget::plug`); its frames are held ([`Send::Hold`]) and the unplug writes
//! them all from its thread with one `writev` when the writer is idle ([`FrameSender::flush`]).
//! At queue depth 32 this took the writer task's wake-up, a hop to the runtime's thread that
//! costs tens of microseconds on a small VM, out of every batch.
//!
//! Ordering: all frames go through one [`OutQueue`]. A direct write only happens when the writer
//! holds nothing (`busy` false) and always starts from the queue's front, and the writer takes
//! the queue out only while `busy` is set, so frames leave in `send` order.
//!
//! The lock is held across the direct write: a non-blocking send that never waits for the peer
//! (the only I/O under it). A failure there is recorded and reported by the writer task, because
//! `send` runs under the request table's lock, which `connection_lost` takes.

use std::io::IoSlice;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::net::{tcp, unix};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use vstor_net::PeerWriter;

use crate::remote::outq::{OutQueue, MAX_IOVECS};
use crate::remote::proto::Frame;

struct State {
    queue: OutQueue,
    /// The writer task has taken frames out of `queue` and is writing them.
    busy: bool,
    /// Why the connection failed on the sending side (encode or direct write), for the writer
    /// to report; nothing is sent once set.
    failed: Option<String>,
}

/// Shared by the request table (`Conn`) and the writer task.
pub(super) struct FrameSender {
    state: Mutex<State>,
    /// Wakes the writer: frames are queued, or a failure is recorded.
    wake: Notify,
    /// The socket, for direct writes (plain TCP and unix sockets).
    direct: Option<Direct>,
}

/// A write half that any thread may write with a non-blocking `writev`.
#[derive(Clone)]
pub(super) enum Direct {
    Tcp(Arc<tcp::OwnedWriteHalf>),
    Unix(Arc<unix::OwnedWriteHalf>),
}

impl Direct {
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        match self {
            Direct::Tcp(half) => half.try_write_vectored(bufs),
            Direct::Unix(half) => half.try_write_vectored(bufs),
        }
    }

    async fn writable(&self) -> std::io::Result<()> {
        match self {
            Direct::Tcp(half) => half.writable().await,
            Direct::Unix(half) => half.writable().await,
        }
    }
}

/// How the writer task writes.
pub(super) enum WriteSide {
    /// Plain TCP or a unix socket, shared with [`FrameSender`]'s direct writes.
    Shared(Direct),
    /// TLS: the writer alone.
    Owned(PeerWriter),
}

/// A sender for a new connection's write half, and the writer's side of it.
pub(super) fn channel(wr: PeerWriter) -> (Arc<FrameSender>, WriteSide) {
    let shared = |direct: Direct| (Some(direct.clone()), WriteSide::Shared(direct));
    let (direct, side) = match wr {
        PeerWriter::Plain(half) => shared(Direct::Tcp(Arc::new(half))),
        PeerWriter::Unix(half) => shared(Direct::Unix(Arc::new(half))),
        tls @ PeerWriter::Tls(_) => (None, WriteSide::Owned(tls)),
    };
    let sender = FrameSender {
        state: Mutex::new(State {
            queue: OutQueue::new(),
            busy: false,
            failed: None,
        }),
        wake: Notify::new(),
        direct,
    };
    (Arc::new(sender), side)
}

impl FrameSender {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queue `frame` and see that it is sent as `how` says. Never blocks. A failure is reported
    /// by the writer task (the loss handling then resends what was in flight).
    pub(super) fn send(&self, frame: &Frame, how: Send) {
        let mut st = self.lock();
        if st.failed.is_some() {
            return;
        }
        if let Err(e) = st.queue.push(frame) {
            st.failed = Some(format!("cannot encode a request: {e}"));
            drop(st);
            self.wake.notify_one();
            return;
        }
        match how {
            Send::Hold => {}
            Send::Direct => self.write_or_wake(st),
            Send::Queue => {
                drop(st);
                self.wake.notify_one();
            }
        }
    }

    /// Send what is queued: from this thread if the writer is idle (plain TCP), and what the
    /// kernel did not take by the writer.
    pub(super) fn flush(&self) {
        let st = self.lock();
        if st.failed.is_none() && !st.queue.is_empty() {
            self.write_or_wake(st);
        }
    }

    fn write_or_wake(&self, mut st: MutexGuard<'_, State>) {
        if !st.busy {
            if let Some(socket) = &self.direct {
                if let Err(e) = write_now(&mut st.queue, socket) {
                    st.failed = Some(format!("write failed: {e}"));
                }
            }
        }
        let wake = !st.queue.is_empty() || st.failed.is_some();
        drop(st);
        if wake {
            self.wake.notify_one();
        }
    }
}

/// How [`FrameSender::send`] sends a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Send {
    /// From the calling thread if the writer is idle (nothing else in flight, or the end of a
    /// plugged batch: [`FrameSender::flush`]).
    Direct,
    /// By the writer task, with whatever else is queued.
    Queue,
    /// Not yet: the caller plugged and will [`FrameSender::flush`].
    Hold,
}

/// Write what the kernel takes without waiting. `Ok` also when some is left (would block).
fn write_now(queue: &mut OutQueue, socket: &Direct) -> std::io::Result<()> {
    while !queue.is_empty() {
        let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
        let count = queue.slices(&mut slices);
        match socket.try_write_vectored(&slices[..count]) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(written) => queue.consume(written),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The connection's writer task. Ends when the connection is given up (`stop`, also while a
/// write hangs on a dead peer) or fails; a failure is reported once to `lost`
/// (`Shared::connection_lost`).
pub(super) async fn writer(
    sender: Arc<FrameSender>,
    mut side: WriteSide,
    stop: CancellationToken,
    lost: impl FnOnce(&str),
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            () = sender.wake.notified() => {}
        }
        // Write until the queue is empty; frames queued meanwhile wait behind (`busy`).
        loop {
            let mut batch = {
                let mut st = sender.lock();
                if let Some(why) = st.failed.clone() {
                    drop(st);
                    lost(&why);
                    return;
                }
                if st.queue.is_empty() {
                    st.busy = false;
                    break;
                }
                st.busy = true;
                st.queue.take()
            };
            let written = tokio::select! {
                _ = stop.cancelled() => return,
                written = write_all(&mut batch, &mut side) => written,
            };
            if let Err(e) = written {
                let why = format!("write failed: {e}");
                sender.lock().failed = Some(why.clone());
                lost(&why);
                return;
            }
        }
    }
}

async fn write_all(batch: &mut OutQueue, side: &mut WriteSide) -> std::io::Result<()> {
    match side {
        WriteSide::Owned(wr) => batch.write_all(wr).await,
        WriteSide::Shared(socket) => {
            while !batch.is_empty() {
                socket.writable().await?;
                write_now(batch, socket)?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::remote::proto::{EdgeCodec, Message};
    use bytes::{Bytes, BytesMut};
    use tokio::io::AsyncReadExt;
    use tokio_util::codec::Decoder;

    fn frame(id: u64, len: usize) -> Frame {
        Frame::new(
            id,
            Message::Data {
                dtl_in_sync: true,
                data: Bytes::from(vec![id as u8; len]),
            },
        )
    }

    async fn pair() -> (PeerWriter, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (_rd, wr) = vstor_net::PeerStream::Plain(client).into_split();
        (wr, server)
    }

    async fn read_frames(server: &mut tokio::net::TcpStream, count: usize) -> Vec<Frame> {
        let (mut got, mut buf, mut codec) = (Vec::new(), BytesMut::new(), EdgeCodec::new());
        while got.len() < count {
            let read = server.read_buf(&mut buf).await.unwrap();
            assert!(read > 0, "the connection closed after {} frames", got.len());
            while let Some(frame) = codec.decode(&mut buf).unwrap() {
                got.push(frame);
            }
        }
        got
    }

    /// Frames sent from another thread, some written directly, some left to the writer task and
    /// some held and flushed in batches, arrive whole and in `send` order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn direct_and_queued_frames_arrive_in_send_order() {
        let (wr, mut server) = pair().await;
        let (sender, side) = channel(wr);
        let stop = CancellationToken::new();
        let (lost_tx, lost_rx) = std::sync::mpsc::channel::<String>();
        let writer = tokio::spawn(writer(
            Arc::clone(&sender),
            side,
            stop.clone(),
            move |why| {
                let _ = lost_tx.send(why.to_string());
            },
        ));
        let frames: Vec<Frame> = (1..=400u64)
            .map(|i| {
                frame(
                    i,
                    if i % 7 == 0 {
                        300_000
                    } else {
                        (i as usize % 5) * 1000
                    },
                )
            })
            .collect();
        let sending = {
            let (sender, frames) = (Arc::clone(&sender), frames.clone());
            std::thread::spawn(move || {
                for (i, frame) in frames.iter().enumerate() {
                    // Direct, queued for the writer, and plugged batches of three.
                    match i % 5 {
                        0 => sender.send(frame, Send::Direct),
                        1 => sender.send(frame, Send::Queue),
                        _ => sender.send(frame, Send::Hold),
                    }
                    if i % 5 == 4 {
                        sender.flush();
                    }
                }
                sender.flush();
            })
        };
        let got = read_frames(&mut server, frames.len()).await;
        sending.join().unwrap();
        assert_eq!(got, frames);
        stop.cancel();
        writer.await.unwrap();
        assert!(lost_rx.try_recv().is_err(), "no failure was reported");
    }

    /// While the writer holds frames it took from the queue, a frame sent alone must wait
    /// behind them instead of going out first.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_frame_sent_alone_waits_behind_what_the_writer_holds() {
        let (wr, mut server) = pair().await;
        let (sender, mut side) = channel(wr);
        if let WriteSide::Shared(socket) = &side {
            socket.writable().await.unwrap();
        }
        let (first, second) = (frame(1, 5000), frame(2, 100));
        sender.send(&first, Send::Queue);
        let mut batch = {
            // What the writer task does when it wakes.
            let mut st = sender.lock();
            st.busy = true;
            st.queue.take()
        };
        sender.send(&second, Send::Direct);
        write_all(&mut batch, &mut side).await.unwrap();
        let mut rest = {
            let mut st = sender.lock();
            st.busy = false;
            st.queue.take()
        };
        write_all(&mut rest, &mut side).await.unwrap();
        assert_eq!(read_frames(&mut server, 2).await, vec![first, second]);
    }

    /// Held frames stay queued (no direct write, no writer wake-up) until `flush`, which writes
    /// them all from the calling thread when the writer is idle.
    #[tokio::test]
    async fn held_frames_leave_together_at_flush() {
        let (wr, mut server) = pair().await;
        let (sender, side) = channel(wr);
        if let WriteSide::Shared(socket) = &side {
            socket.writable().await.unwrap();
        }
        let frames: Vec<Frame> = (1..=3).map(|id| frame(id, 4096)).collect();
        for f in &frames {
            sender.send(f, Send::Hold);
        }
        assert!(!sender.lock().queue.is_empty(), "held frames were sent");
        // No writer task runs here: only the flush can send them.
        sender.flush();
        assert!(
            sender.lock().queue.is_empty(),
            "the flush left frames queued"
        );
        assert_eq!(read_frames(&mut server, 3).await, frames);
        drop(side);
    }
}
