//! Outgoing frames of one edge-protocol socket, written with vectored writes.
//!
//! Both ends batch: every frame produced while the socket was busy goes out in the next write.
//! Headers and small fields are encoded into one growing buffer; a data block (a `Write`'s or a
//! `Data`'s payload, already a [`Bytes`] slice of some receive buffer or of the guest's data) is
//! not copied but queued as its own chunk ([`EdgeCodec::encode_parts`]), and one `writev` sends
//! up to [`MAX_IOVECS`] chunks. So a 128 KiB read reply costs no memcpy on the sending side.
//!
//! `write_some` is cancel-safe (it may sit in a `select!`): bytes are only consumed from the queue
//! in the same poll in which the kernel reported them written.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::proto::{EdgeCodec, Frame, ProtoError};

/// Chunks handed to one `writev` (well below `IOV_MAX` = 1024).
pub(crate) const MAX_IOVECS: usize = 64;
/// Blocks shorter than this are copied into the header buffer: an iovec of its own would cost
/// more than the copy.
const COPY_BELOW: usize = 2048;

pub(crate) struct OutQueue {
    codec: EdgeCodec,
    /// Encoded bytes not yet moved to `chunks`.
    head: BytesMut,
    chunks: VecDeque<Bytes>,
    queued: usize,
}

impl OutQueue {
    pub(crate) fn new() -> Self {
        Self {
            codec: EdgeCodec::new(),
            head: BytesMut::with_capacity(64 * 1024),
            chunks: VecDeque::new(),
            queued: 0,
        }
    }

    /// Encode later frames with protocol `version` (the version a server chose for the
    /// connection in its handshake).
    pub(crate) fn set_version(&mut self, version: u16) {
        self.codec = EdgeCodec::with_version(version);
    }

    /// Bytes waiting to be written.
    pub(crate) fn len(&self) -> usize {
        self.queued
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.queued == 0
    }

    /// Queue `frame`. On error nothing was queued.
    pub(crate) fn push(&mut self, frame: &Frame) -> Result<(), ProtoError> {
        let before = self.head.len();
        let block = self.codec.encode_parts(frame, &mut self.head)?;
        self.queued += self.head.len() - before;
        if let Some(block) = block {
            self.queued += block.len();
            if block.len() < COPY_BELOW {
                self.head.extend_from_slice(&block);
            } else {
                self.chunks.push_back(self.head.split().freeze());
                self.chunks.push_back(block);
            }
        }
        Ok(())
    }

    /// Everything queued, leaving this queue empty (same protocol version).
    pub(crate) fn take(&mut self) -> Self {
        let empty = Self {
            codec: self.codec.clone(),
            head: BytesMut::new(),
            chunks: VecDeque::new(),
            queued: 0,
        };
        std::mem::replace(self, empty)
    }

    /// Fill `slices` with the front of the queue (at most its length); returns how many.
    pub(crate) fn slices<'a>(&'a mut self, slices: &mut [IoSlice<'a>]) -> usize {
        if !self.head.is_empty() {
            self.chunks.push_back(self.head.split().freeze());
        }
        let mut count = 0;
        for (slot, chunk) in slices.iter_mut().zip(self.chunks.iter()) {
            *slot = IoSlice::new(chunk);
            count += 1;
        }
        count
    }

    /// One vectored write of what is queued; returns once some bytes were written.
    pub(crate) async fn write_some<W: AsyncWrite + Unpin>(
        &mut self,
        w: &mut W,
    ) -> std::io::Result<()> {
        let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
        let count = self.slices(&mut slices);
        let written = w.write_vectored(&slices[..count]).await?;
        if written == 0 && count > 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        self.consume(written);
        Ok(())
    }

    /// Write everything queued, and flush.
    pub(crate) async fn write_all<W: AsyncWrite + Unpin>(
        &mut self,
        w: &mut W,
    ) -> std::io::Result<()> {
        while !self.is_empty() {
            self.write_some(w).await?;
        }
        // TLS keeps records until flushed; a no-op on TCP.
        w.flush().await
    }

    /// Drop the first `written` bytes (the kernel took them).
    pub(crate) fn consume(&mut self, mut written: usize) {
        self.queued -= written;
        while written > 0 {
            let Some(front) = self.chunks.front_mut() else {
                return;
            };
            if written >= front.len() {
                written -= front.len();
                self.chunks.pop_front();
            } else {
                front.advance(written);
                written = 0;
            }
        }
        while self.chunks.front().is_some_and(Bytes::is_empty) {
            self.chunks.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::remote::proto::Message;
    use tokio_util::codec::Decoder;

    #[tokio::test]
    async fn frames_round_trip_through_partial_writes() {
        let mut q = OutQueue::new();
        let frames: Vec<Frame> = (0..20u64)
            .map(|i| {
                let data = Bytes::from(vec![i as u8; (i as usize) * 700]);
                Frame::new(
                    i,
                    Message::Data {
                        dtl_in_sync: i % 2 == 0,
                        data,
                    },
                )
            })
            .collect();
        for f in &frames {
            q.push(f).unwrap();
        }
        // A pipe with a tiny buffer forces many partial writes.
        let (mut a, mut b) = tokio::io::duplex(333);
        let writer = tokio::spawn(async move {
            q.write_all(&mut a).await.unwrap();
            assert!(q.is_empty());
        });
        let mut got = Vec::new();
        let mut buf = BytesMut::new();
        let mut codec = EdgeCodec::new();
        while got.len() < frames.len() {
            tokio::io::AsyncReadExt::read_buf(&mut b, &mut buf)
                .await
                .unwrap();
            while let Some(f) = codec.decode(&mut buf).unwrap() {
                got.push(f);
            }
        }
        writer.await.unwrap();
        assert_eq!(got, frames);
    }
}
