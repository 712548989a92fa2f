//! Where an object's bytes live among its fragments: pure arithmetic, no I/O.
//!
//! An object of `size` bytes is cut into *chunks* of `k × fragment_size` bytes (the last one may
//! be shorter). Chunk `c` is split into `k` contiguous data pieces of `fragment_size` bytes
//! (the last chunk's pieces are `ceil(len / k)` bytes, zero-padded) and encoded into `m` parity
//! pieces of the same length. *Fragment* `i` of the object is the concatenation over all chunks
//! of piece `i`, stored as one file on one OSD.
//!
//! Why contiguous pieces rather than striping bytes round-robin: a small read then falls inside
//! one data piece, so it costs one ranged request to one OSD (issue 12: 4 KiB of a 64 MiB SCO
//! touches only the data fragment that holds it). Why chunks: an object's encode and repair work
//! on `k × fragment_size` bytes at a time, bounding memory however large the object is.

/// The shape of an object's encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub size: u64,
    pub k: u32,
    pub m: u32,
    /// Bytes of each piece of a full chunk.
    pub fragment_size: u32,
}

/// One run of object bytes inside one data fragment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Data fragment index (`< k`).
    pub index: u32,
    /// Offset inside the fragment's data.
    pub fragment_offset: u64,
    /// Offset inside the object.
    pub object_offset: u64,
    pub len: u64,
}

impl Layout {
    /// Bytes of one full chunk.
    pub fn chunk_bytes(&self) -> u64 {
        u64::from(self.k) * u64::from(self.fragment_size)
    }

    /// Number of chunks (0 for an empty object).
    pub fn chunks(&self) -> u64 {
        self.size.div_ceil(self.chunk_bytes())
    }

    /// Object bytes in chunk `chunk`.
    pub fn chunk_len(&self, chunk: u64) -> u64 {
        self.size
            .saturating_sub(chunk * self.chunk_bytes())
            .min(self.chunk_bytes())
    }

    /// Bytes of each piece of chunk `chunk`.
    pub fn piece_len(&self, chunk: u64) -> u64 {
        self.chunk_len(chunk).div_ceil(u64::from(self.k))
    }

    /// Bytes of every fragment's data (all fragments of an object are equally long).
    pub fn fragment_len(&self) -> u64 {
        match self.chunks() {
            0 => 0,
            n => (n - 1) * u64::from(self.fragment_size) + self.piece_len(n - 1),
        }
    }

    /// Where chunk `chunk`'s piece starts inside each fragment.
    pub fn piece_offset(&self, chunk: u64) -> u64 {
        chunk * u64::from(self.fragment_size)
    }

    /// The data-fragment runs that hold object bytes `[offset, offset + len)`, in object order.
    /// The range must lie within the object.
    pub fn locate(&self, offset: u64, len: u64) -> Vec<Piece> {
        let mut out = Vec::new();
        let end = offset.saturating_add(len).min(self.size);
        let mut at = offset;
        while at < end {
            let chunk = at / self.chunk_bytes();
            let in_chunk = at - chunk * self.chunk_bytes();
            let piece_len = self.piece_len(chunk);
            let index = in_chunk / piece_len;
            let in_piece = in_chunk % piece_len;
            let chunk_end = chunk * self.chunk_bytes() + self.chunk_len(chunk);
            let run = (piece_len - in_piece).min(end - at).min(chunk_end - at);
            // Consecutive pieces of one fragment across chunks are adjacent in the fragment,
            // but not in the object (the other fragments' pieces sit between): no merging.
            out.push(Piece {
                index: index as u32,
                fragment_offset: self.piece_offset(chunk) + in_piece,
                object_offset: at,
                len: run,
            });
            at += run;
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Split an object into fragments the way the layout says, by brute force per byte.
    fn fragments(layout: &Layout, object: &[u8]) -> Vec<Vec<u8>> {
        let mut out = vec![vec![0u8; layout.fragment_len() as usize]; layout.k as usize];
        for chunk in 0..layout.chunks() {
            let start = chunk * layout.chunk_bytes();
            let piece = layout.piece_len(chunk);
            for b in 0..layout.chunk_len(chunk) {
                let (index, inner) = (b / piece, b % piece);
                out[index as usize][(layout.piece_offset(chunk) + inner) as usize] =
                    object[(start + b) as usize];
            }
        }
        out
    }

    #[test]
    fn a_small_read_of_a_large_object_touches_one_fragment() {
        let layout = Layout {
            size: 64 << 20,
            k: 8,
            m: 3,
            fragment_size: 1 << 20,
        };
        assert_eq!(layout.chunks(), 8);
        assert_eq!(layout.fragment_len(), 8 << 20);
        let pieces = layout.locate((5 << 20) + 4096, 4096);
        assert_eq!(
            pieces,
            vec![Piece {
                index: 5,
                fragment_offset: 4096,
                object_offset: (5 << 20) + 4096,
                len: 4096
            }]
        );
        // The second chunk starts again at fragment 0.
        assert_eq!(layout.locate(8 << 20, 1)[0].index, 0);
        assert_eq!(layout.locate(8 << 20, 1)[0].fragment_offset, 1 << 20);
    }

    #[test]
    fn empty_and_tiny_objects() {
        let empty = Layout {
            size: 0,
            k: 4,
            m: 2,
            fragment_size: 4096,
        };
        assert_eq!((empty.chunks(), empty.fragment_len()), (0, 0));
        assert!(empty.locate(0, 0).is_empty());
        let tiny = Layout { size: 3, ..empty };
        assert_eq!((tiny.chunks(), tiny.piece_len(0)), (1, 1));
        assert_eq!(tiny.locate(0, 3).len(), 3);
    }

    proptest! {
        /// Reading any range through `locate` from brute-force fragments gives the object's bytes.
        #[test]
        fn locate_agrees_with_the_fragments(
            size in 1u64..20_000,
            k in 1u32..9,
            fragment_size in 1u32..700,
            start in any::<prop::sample::Index>(),
            len in 0u64..5000,
        ) {
            let layout = Layout { size, k, m: 2, fragment_size };
            let object: Vec<u8> = (0..size).map(|i| (i * 131 % 251) as u8).collect();
            let frags = fragments(&layout, &object);
            let offset = start.index(size as usize) as u64;
            let len = len.min(size - offset);
            let mut read = Vec::new();
            let mut expect_at = offset;
            for piece in layout.locate(offset, len) {
                prop_assert_eq!(piece.object_offset, expect_at);
                prop_assert!(piece.index < k);
                let f = &frags[piece.index as usize];
                let from = piece.fragment_offset as usize;
                read.extend_from_slice(&f[from..from + piece.len as usize]);
                expect_at += piece.len;
            }
            prop_assert_eq!(&read[..], &object[offset as usize..(offset + len) as usize]);
        }
    }
}
