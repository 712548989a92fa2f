//! Length-preserving encryption of fixed-size units (a volume's clusters): AES-256-XTS, the
//! IEEE 1619 mode dm-crypt, BitLocker and FileVault use for disks.
//!
//! Why XTS. A volume's data is addressed by cluster: the SCO layout, cluster offsets, chunk CRCs,
//! ranged backend reads and hard-linked uploads all assume a cluster is 4 KiB wherever it lives.
//! XTS keeps every unit its own size (no IV or tag to store next to it), and its tweak is the
//! unit's *logical* index (dm-crypt's `plain64`), not where it is stored, so ciphertext can move
//! between SCOs (scrub, DTL replay, a clone reading its parent's SCOs) without re-encryption.
//! The price, documented in `docs/security.md`: it is deterministic per (index, content) and it
//! is not authenticated (CRC32C catches corruption, not a forger).
//!
//! The tweak of unit `i` is the 128-bit little-endian number `tweak_hi << 64 | i`: the volume
//! uses `tweak_hi = 0` and the cluster index; a user with several address spaces under one key
//! (the EC tier, one per object) can keep them apart with `tweak_hi`.
//!
//! Keys. A key file holds at least 32 bytes of secret (raw binary, or text such as hex: the
//! bytes are used as they are). HKDF-SHA256 turns them into the two independent AES-256 keys XTS
//! needs and, as a separate output, a fingerprint that identifies the key without revealing it,
//! so a file of any length or format gives full-strength, well-separated keys.
//!
//! Crates: RustCrypto's `aes` (AES-NI when the CPU has it, constant-time software otherwise,
//! already used by `ec::crypt`), `xts-mode` (the RustCrypto-based XTS; aws-lc-rs, also in the
//! tree through rustls, offers no XTS in its safe API), and `hkdf` over the `sha2` this crate
//! already uses: small, maintained, pure Rust, and no second crypto stack in this crate.

use std::path::Path;

use aes::cipher::{generic_array::GenericArray, KeyInit};
use aes::Aes256;
use hkdf::Hkdf;
use sha2::Sha256;
use xts_mode::Xts128;

use crate::{BackendError, Result};

/// The mode's name as shown to users (`volume info`).
pub const MODE: &str = "aes-256-xts";
/// The least key material a key file must hold.
pub const MIN_KEY_BYTES: usize = 32;
/// Key files larger than this are refused (a wrong path, not a key).
const MAX_KEY_BYTES: u64 = 4096;

const HKDF_SALT: &[u8] = b"vstor unit encryption v1";
const INFO_XTS_KEYS: &[u8] = b"aes-256-xts keys";
const INFO_FINGERPRINT: &[u8] = b"key fingerprint";

/// An XTS key pair derived from a key file, and its fingerprint. `Debug` shows the fingerprint
/// only.
pub struct UnitCipher {
    xts: Xts128<Aes256>,
    fingerprint: String,
}

impl std::fmt::Debug for UnitCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnitCipher")
            .field("mode", &MODE)
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

impl UnitCipher {
    /// Derive the keys from `material` (at least [`MIN_KEY_BYTES`] bytes).
    pub fn from_material(material: &[u8]) -> std::result::Result<Self, String> {
        if material.len() < MIN_KEY_BYTES {
            return Err(format!(
                "holds {} bytes: a key needs at least {MIN_KEY_BYTES} (e.g. `head -c 32 /dev/urandom > FILE`)",
                material.len()
            ));
        }
        let hkdf = Hkdf::<Sha256>::new(Some(HKDF_SALT), material);
        let mut keys = [0u8; 64];
        let mut print = [0u8; 8];
        // Both lengths are far below HKDF-SHA256's limit of 255 * 32 bytes.
        hkdf.expand(INFO_XTS_KEYS, &mut keys)
            .and_then(|()| hkdf.expand(INFO_FINGERPRINT, &mut print))
            .map_err(|e| format!("key derivation failed: {e}"))?;
        let cipher = Self::from_xts_keys(&keys);
        keys.fill(0);
        Ok(Self {
            fingerprint: print.iter().map(|b| format!("{b:02x}")).collect(),
            ..cipher
        })
    }

    /// The cipher for two raw AES-256 keys (key 1 encrypts the data, key 2 the tweak), as IEEE
    /// 1619 writes them; for known-answer tests. The fingerprint is empty.
    pub fn from_xts_keys(keys: &[u8; 64]) -> Self {
        let data = Aes256::new(GenericArray::from_slice(&keys[..32]));
        let tweak = Aes256::new(GenericArray::from_slice(&keys[32..]));
        Self {
            xts: Xts128::new(data, tweak),
            fingerprint: String::new(),
        }
    }

    /// Load and derive the key of key file `path` (see the module docs).
    pub fn load(path: &Path) -> Result<Self> {
        let bad = |reason: String| BackendError::KeyFile {
            path: path.to_path_buf(),
            reason,
        };
        let len = std::fs::metadata(path)
            .map_err(|e| bad(format!("cannot read it: {e}")))?
            .len();
        if len > MAX_KEY_BYTES {
            return Err(bad(format!(
                "is {len} bytes long: a key file holds {MIN_KEY_BYTES} to {MAX_KEY_BYTES} bytes"
            )));
        }
        let mut material = std::fs::read(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
        let cipher = Self::from_material(&material).map_err(bad);
        material.fill(0);
        cipher
    }

    /// A short, non-secret identifier of the key (16 hex digits).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Encrypt `buf` in place: whole units of `unit_size` bytes, the first with index
    /// `first_unit_index`.
    pub fn encrypt_units(
        &self,
        buf: &mut [u8],
        unit_size: usize,
        first_unit_index: u64,
        tweak_hi: u64,
    ) -> Result<()> {
        self.apply(buf, unit_size, tweak(first_unit_index, tweak_hi), true)
    }

    /// Decrypt `buf` in place (the inverse of [`encrypt_units`](Self::encrypt_units)).
    pub fn decrypt_units(
        &self,
        buf: &mut [u8],
        unit_size: usize,
        first_unit_index: u64,
        tweak_hi: u64,
    ) -> Result<()> {
        self.apply(buf, unit_size, tweak(first_unit_index, tweak_hi), false)
    }

    fn apply(&self, buf: &mut [u8], unit_size: usize, first: u128, encrypt: bool) -> Result<()> {
        check_units(buf.len(), unit_size)?;
        let tweaks = xts_mode::get_tweak_default;
        if encrypt {
            self.xts.encrypt_area(buf, unit_size, first, tweaks);
        } else {
            self.xts.decrypt_area(buf, unit_size, first, tweaks);
        }
        Ok(())
    }
}

fn tweak(first_unit_index: u64, tweak_hi: u64) -> u128 {
    (u128::from(tweak_hi) << 64) | u128::from(first_unit_index)
}

/// XTS works on units of at least one 16-byte block; this module only does whole units of a
/// multiple of 16 bytes (no ciphertext stealing), so a caller's misaligned buffer is an error,
/// never a panic inside the mode.
fn check_units(len: usize, unit_size: usize) -> Result<()> {
    if unit_size < 16 || !unit_size.is_multiple_of(16) || !len.is_multiple_of(unit_size) {
        return Err(BackendError::CryptUnits { len, unit_size });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }

    /// IEEE 1619-2007 appendix B, vector 10 (XTS-AES-256, data unit sequence number 0xff,
    /// 512 bytes); the same bytes come out of OpenSSL's XTS.
    #[test]
    fn ieee_1619_vector_10() {
        let keys: [u8; 64] = hex(concat!(
            "2718281828459045235360287471352662497757247093699959574966967627",
            "3141592653589793238462643383279502884197169399375105820974944592"
        ))
        .try_into()
        .unwrap();
        let cipher = UnitCipher::from_xts_keys(&keys);
        let plain: Vec<u8> = (0..512).map(|i| (i % 256) as u8).collect();
        let expected = hex(concat!(
            "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b",
            "5d31e276f8fe4a8d66b317f9ac683f44680a86ac35adfc3345befecb4bb188fd",
            "5776926c49a3095eb108fd1098baec70aaa66999a72a82f27d848b21d4a741b0",
            "c5cd4d5fff9dac89aeba122961d03a757123e9870f8acf1000020887891429ca",
            "2a3e7a7d7df7b10355165c8b9a6d0a7de8b062c4500dc4cd120c0f7418dae3d0",
            "b5781c34803fa75421c790dfe1de1834f280d7667b327f6c8cd7557e12ac3a0f",
            "93ec05c52e0493ef31a12d3d9260f79a289d6a379bc70c50841473d1a8cc81ec",
            "583e9645e07b8d9670655ba5bbcfecc6dc3966380ad8fecb17b6ba02469a020a",
            "84e18e8f84252070c13e9f1f289be54fbc481457778f616015e1327a02b140f1",
            "505eb309326d68378f8374595c849d84f4c333ec4423885143cb47bd71c5edae",
            "9be69a2ffeceb1bec9de244fbe15992b11b77c040f12bd8f6a975a44a0f90c29",
            "a9abc3d4d893927284c58754cce294529f8614dcd2aba991925fedc4ae74ffac",
            "6e333b93eb4aff0479da9a410e4450e0dd7ae4c6e2910900575da401fc07059f",
            "645e8b7e9bfdef33943054ff84011493c27b3429eaedb4ed5376441a77ed4385",
            "1ad77f16f541dfd269d50d6a5f14fb0aab1cbb4c1550be97f7ab4066193c4caa",
            "773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151"
        ));
        let mut buf = plain.clone();
        cipher.encrypt_units(&mut buf, 512, 0xff, 0).unwrap();
        assert_eq!(buf, expected);
        cipher.decrypt_units(&mut buf, 512, 0xff, 0).unwrap();
        assert_eq!(buf, plain);
    }

    #[test]
    fn round_trip_and_the_tweak_and_key_change_the_ciphertext() {
        let cipher = UnitCipher::from_material(&[7u8; 32]).unwrap();
        let plain: Vec<u8> = (0..4 * 4096u32).map(|i| (i % 251) as u8).collect();
        let mut sealed = plain.clone();
        cipher.encrypt_units(&mut sealed, 4096, 10, 0).unwrap();
        assert_ne!(sealed, plain);
        // Same content, different unit index: different ciphertext.
        let mut moved = plain[..4096].to_vec();
        cipher.encrypt_units(&mut moved, 4096, 11, 0).unwrap();
        assert_ne!(moved, sealed[..4096]);
        let mut hi = plain[..4096].to_vec();
        cipher.encrypt_units(&mut hi, 4096, 10, 1).unwrap();
        assert_ne!(hi, sealed[..4096]);
        // Units decrypt on their own, by index.
        let mut third = sealed[2 * 4096..3 * 4096].to_vec();
        cipher.decrypt_units(&mut third, 4096, 12, 0).unwrap();
        assert_eq!(third, plain[2 * 4096..3 * 4096]);
        let mut all = sealed.clone();
        cipher.decrypt_units(&mut all, 4096, 10, 0).unwrap();
        assert_eq!(all, plain);
        // Another key gives other bytes, both ways.
        let other = UnitCipher::from_material(&[8u8; 32]).unwrap();
        let mut wrong = sealed[..4096].to_vec();
        other.decrypt_units(&mut wrong, 4096, 10, 0).unwrap();
        assert_ne!(wrong, plain[..4096]);
        assert_ne!(cipher.fingerprint(), other.fingerprint());
        assert_eq!(cipher.fingerprint().len(), 16);
        assert!(!format!("{cipher:?}").contains(&format!("{:?}", [7u8; 32])));
    }

    #[test]
    fn misaligned_buffers_and_short_keys_are_errors() {
        let cipher = UnitCipher::from_material(&[1u8; 40]).unwrap();
        let mut buf = vec![0u8; 4097];
        assert!(matches!(
            cipher.encrypt_units(&mut buf, 4096, 0, 0),
            Err(BackendError::CryptUnits { .. })
        ));
        assert!(cipher.decrypt_units(&mut buf[..16], 8, 0, 0).is_err());
        assert!(UnitCipher::from_material(&[1u8; 31])
            .unwrap_err()
            .contains("at least 32"));
    }

    #[test]
    fn key_files_load_and_bad_ones_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, [3u8; 32]).unwrap();
        let loaded = UnitCipher::load(&path).unwrap();
        assert_eq!(
            loaded.fingerprint(),
            UnitCipher::from_material(&[3u8; 32]).unwrap().fingerprint()
        );
        std::fs::write(&path, b"short").unwrap();
        let err = UnitCipher::load(&path).unwrap_err().to_string();
        assert!(
            err.contains(&path.display().to_string()) && err.contains("5 bytes"),
            "{err}"
        );
        let missing = dir.path().join("missing");
        let err = UnitCipher::load(&missing).unwrap_err().to_string();
        assert!(
            err.contains("missing") && err.contains("cannot read"),
            "{err}"
        );
    }
}
