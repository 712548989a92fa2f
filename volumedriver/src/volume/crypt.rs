//! Encryption at rest: a volume created with a key file stores only ciphertext in its write
//! buffer, its DTL and its backend namespace.
//!
//! Each cluster is encrypted with AES-256-XTS (`vstor_backend::crypt`), the tweak being the
//! cluster's index in the volume. The cipher is length-preserving and tied to the cluster's
//! logical address, not to where it is stored, so everything below the volume's I/O surface is
//! unchanged and works on ciphertext: SCO layout, chunk CRCs, uploads, ranged backend reads,
//! scrub relocation, DTL mirroring and replay, and clones reading their ancestors' SCOs (same
//! key, same cluster index).
//!
//! Where it happens:
//! * writes: [`Volume::write_clusters`](super::Volume) encrypts whole plaintext clusters just
//!   before they are appended (`append_clusters`), so the SCO file and the DTL entry get the same
//!   ciphertext. DTL replay appends the DTL's ciphertext directly, never encrypting twice.
//!   Partial-cluster writes are read-modify-written on plaintext (the read decrypts).
//! * reads: `execute_read` decrypts each piece read from a write-buffer SCO or the backend
//!   (after the backend's CRC check); a piece that covers part of a cluster reads and decrypts
//!   the whole cluster. Unwritten clusters are zeros and are not decrypted.
//!
//! The key is read from the configured file whenever the volume is created or opened (restart,
//! adoption, move) and checked against the fingerprint in the configuration: a missing or
//! different key fails that volume's open with [`VolumeError::EncryptionKey`], never serves
//! garbage.

use vstor_backend::crypt::UnitCipher;
use vstor_backend::BackendError;

use crate::config::VolumeConfig;
use crate::error::{Result, VolumeError};

use super::Volume;

/// The cluster-index tweak space of a volume (see `vstor_backend::crypt`).
const TWEAK_HI: u64 = 0;

/// The cipher of the volume `config` describes: `None` for a plaintext volume; the key from its
/// key file, checked against the stored fingerprint, for an encrypted one.
pub(super) fn load_cipher(config: &VolumeConfig) -> Result<Option<UnitCipher>> {
    let Some(encryption) = &config.encryption else {
        return Ok(None);
    };
    let fail = |source| VolumeError::EncryptionKey {
        volume: config.name.clone(),
        source,
    };
    if encryption.mode != vstor_backend::crypt::MODE {
        return Err(VolumeError::InvalidConfig {
            volume: config.name.clone(),
            reason: format!("unknown encryption mode {:?}", encryption.mode),
        });
    }
    let cipher = UnitCipher::load(&encryption.key_file).map_err(fail)?;
    if cipher.fingerprint() != encryption.fingerprint {
        return Err(fail(BackendError::KeyFile {
            path: encryption.key_file.clone(),
            reason: format!(
                "holds the key with fingerprint {}, but the volume is encrypted with key {}",
                cipher.fingerprint(),
                encryption.fingerprint
            ),
        }));
    }
    Ok(Some(cipher))
}

impl Volume {
    /// `data` (whole clusters from cluster `first`) as the volume stores it: encrypted if the
    /// volume is, else borrowed as it is.
    pub(super) fn seal_clusters<'a>(
        &self,
        first: u64,
        data: &'a [u8],
    ) -> Result<std::borrow::Cow<'a, [u8]>> {
        let Some(cipher) = &self.cipher else {
            return Ok(data.into());
        };
        let mut sealed = data.to_vec();
        cipher
            .encrypt_units(&mut sealed, self.cluster_size as usize, first, TWEAK_HI)
            .map_err(|source| VolumeError::EncryptionKey {
                volume: self.name.clone(),
                source,
            })?;
        Ok(sealed.into())
    }

    /// Decrypt `buf`, whole stored clusters from cluster `first`, in place (nothing to do for a
    /// plaintext volume).
    pub(super) fn open_clusters(&self, first: u64, buf: &mut [u8]) -> Result<()> {
        match &self.cipher {
            None => Ok(()),
            Some(cipher) => cipher
                .decrypt_units(buf, self.cluster_size as usize, first, TWEAK_HI)
                .map_err(|source| VolumeError::EncryptionKey {
                    volume: self.name.clone(),
                    source,
                }),
        }
    }

    pub(super) fn encrypted(&self) -> bool {
        self.cipher.is_some()
    }
}
