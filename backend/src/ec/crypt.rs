//! Encryption of a preset's objects: AES-256 in counter mode over the object's bytes, before
//! they are erasure-coded.
//!
//! Why CTR, and why before encoding: a counter-mode key stream can be generated at any byte
//! offset, so a partial read of 4 KiB of a 64 MiB SCO fetches and decrypts just those 4 KiB
//! (reads stay partial). Encrypting the object rather than each fragment keeps the tier's
//! machinery blind to it: parity, degraded reads, repair, moves, local parities and CRC checks
//! all work on ciphertext, and an OSD (or a stolen disk) never sees a plaintext byte.
//!
//! Nonce: the first 12 bytes of SHA-256(namespace "/" name "/" version), then a 32-bit block
//! counter (objects up to 64 GiB). Every put writes a new version (`store`: versions only grow),
//! so a key stream is never reused for different data; repair copies or rebuilds ciphertext of
//! the same version, which is the same bytes.
//!
//! The key is the preset's (like Open vStorage ALBA's presets): kept in the registry, shown only
//! as a fingerprint.
//!
//! Crates: RustCrypto's `aes` (AES-NI when the CPU has it, constant-time software otherwise),
//! `ctr` and `sha2`: the maintained, audited-in-use Rust implementations.

use aes::cipher::{KeyIvInit, StreamCipher, StreamCipherSeek};
use sha2::{Digest, Sha256};

/// An AES-256 key.
pub type Key = [u8; 32];

type Aes256Ctr = ctr::Ctr32BE<aes::Aes256>;

fn iv(namespace: &str, name: &str, version: u64) -> [u8; 16] {
    let mut hash = Sha256::new();
    hash.update(namespace.as_bytes());
    hash.update(b"/");
    hash.update(name.as_bytes());
    hash.update(b"/");
    hash.update(version.to_le_bytes());
    let digest = hash.finalize();
    let mut iv = [0u8; 16];
    iv[..12].copy_from_slice(&digest[..12]);
    iv
}

/// XOR `buf`, the object's bytes at `offset`, with the key stream: encrypts plaintext and
/// decrypts ciphertext alike.
pub fn apply(key: &Key, namespace: &str, name: &str, version: u64, offset: u64, buf: &mut [u8]) {
    let mut cipher = Aes256Ctr::new(key.into(), &iv(namespace, name, version).into());
    cipher.seek(offset);
    cipher.apply_keystream(buf);
}

/// A short, non-secret fingerprint of a key (for `preset show`).
pub fn fingerprint(key: &Key) -> String {
    let digest = Sha256::digest(key);
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// A key from a key file: 32 raw bytes, or 64 hex digits (whitespace around them ignored).
pub fn parse_key(bytes: &[u8]) -> Result<Key, String> {
    if let Ok(key) = <Key>::try_from(bytes) {
        return Ok(key);
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|_| "the key file holds neither 32 bytes nor 64 hex digits".to_string())?
        .trim();
    if text.len() != 64 {
        return Err(format!(
            "the key file holds {} characters: expected 32 raw bytes or 64 hex digits",
            text.len()
        ));
    }
    let mut key = [0u8; 32];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16)
            .map_err(|_| "the key file is not hexadecimal".to_string())?;
    }
    Ok(key)
}

pub fn to_hex(key: &Key) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_range_decrypts_alone_and_versions_get_their_own_stream() {
        let key = [7u8; 32];
        let plain: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut sealed = plain.clone();
        apply(&key, "ns", "obj", 1, 0, &mut sealed);
        assert_ne!(sealed, plain);
        for (offset, len) in [
            (0usize, 1usize),
            (5, 4096),
            (4096, 4096),
            (131_071, 17),
            (199_999, 1),
        ] {
            let mut part = sealed[offset..offset + len].to_vec();
            apply(&key, "ns", "obj", 1, offset as u64, &mut part);
            assert_eq!(part, plain[offset..offset + len], "offset {offset}");
        }
        let mut other = plain.clone();
        apply(&key, "ns", "obj", 2, 0, &mut other);
        assert_ne!(other, sealed, "a new version has a new key stream");
        let mut wrong = sealed[..64].to_vec();
        apply(&[8u8; 32], "ns", "obj", 1, 0, &mut wrong);
        assert_ne!(wrong, plain[..64]);
    }

    #[test]
    fn key_files_are_raw_or_hex_and_bad_ones_say_why() {
        let key: Key = core::array::from_fn(|i| i as u8);
        assert_eq!(parse_key(&key).unwrap(), key);
        assert_eq!(
            parse_key(format!("{}\n", to_hex(&key)).as_bytes()).unwrap(),
            key
        );
        assert!(parse_key(b"short").unwrap_err().contains("characters"));
        assert!(parse_key(&[b'z'; 64]).unwrap_err().contains("hexadecimal"));
        assert_eq!(fingerprint(&key).len(), 16);
    }
}
