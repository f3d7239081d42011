//! The one binary encoding surge writes to disk and to the wire.
//!
//! Values are bincode (compact, fast, not self-describing) inside a small frame:
//!
//! ```text
//! [format: u8 = 1][crc32 of payload: u32 LE][payload ...]
//! ```
//!
//! The checksum makes a damaged log entry or snapshot an error at the point it is read instead
//! of a silently different state machine; the format byte lets a newer surge change the encoding
//! on purpose. Decoding is bounded ([`DECODE_BYTES_MAX`]) so a corrupt length prefix cannot ask
//! for gigabytes.

use bincode::Options;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Largest value this codec decodes (a snapshot of a large cluster is tens of MiB).
pub const DECODE_BYTES_MAX: u64 = 1 << 30;

const FORMAT_V1: u8 = 1;
const HEADER_BYTES: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("value is {0} bytes, too short for its header")]
    Truncated(usize),
    #[error("unknown encoding format {0} (written by a newer surge?)")]
    UnknownFormat(u8),
    #[error("checksum mismatch: stored {stored:08x}, computed {computed:08x} (data is corrupt)")]
    Checksum { stored: u32, computed: u32 },
    #[error("cannot decode: {0}")]
    Decode(#[from] bincode::Error),
}

fn options() -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_limit(DECODE_BYTES_MAX)
}

/// Plain bincode, no frame: for wire messages that tonic already checks.
pub fn to_bytes<T: Serialize>(value: &T) -> Vec<u8> {
    options()
        .serialize(value)
        .expect("serializing plain in-memory data to a Vec cannot fail")
}

/// Inverse of [`to_bytes`].
pub fn from_bytes<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    Ok(options().deserialize(bytes)?)
}

/// Framed, checksummed encoding for values at rest.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let payload = to_bytes(value);
    let mut out = Vec::with_capacity(HEADER_BYTES + payload.len());
    out.push(FORMAT_V1);
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Check a framed value's header and checksum without decoding it; returns the payload.
/// Cheap (one CRC pass), so a whole log can be checked at start.
pub fn check_frame(bytes: &[u8]) -> Result<&[u8], CodecError> {
    if bytes.len() < HEADER_BYTES {
        return Err(CodecError::Truncated(bytes.len()));
    }
    if bytes[0] != FORMAT_V1 {
        return Err(CodecError::UnknownFormat(bytes[0]));
    }
    let stored = u32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    let payload = &bytes[HEADER_BYTES..];
    let computed = crc32fast::hash(payload);
    if stored != computed {
        return Err(CodecError::Checksum { stored, computed });
    }
    Ok(payload)
}

/// Inverse of [`encode`]; refuses damaged or foreign data.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    from_bytes(check_frame(bytes)?)
}

/// Decode only the leading value of a framed encoding (a struct's first field), after checking
/// the whole frame: reads a log entry's id without decoding its payload.
pub fn decode_prefix<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let payload = check_frame(bytes)?;
    Ok(options().allow_trailing_bytes().deserialize(payload)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let v = (7u64, "hello".to_string(), vec![1u8, 2, 3]);
        let bytes = encode(&v);
        let back: (u64, String, Vec<u8>) = decode(&bytes).expect("decodes");
        assert_eq!(back, v);
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let bytes = encode(&(42u64, "snapshot".to_string()));
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(
                decode::<(u64, String)>(&bad).is_err(),
                "flip at byte {i} went unnoticed"
            );
        }
    }

    #[test]
    fn short_and_foreign_values_are_refused() {
        assert!(matches!(
            decode::<u64>(&[1, 2]),
            Err(CodecError::Truncated(2))
        ));
        let mut bytes = encode(&1u64);
        bytes[0] = 9;
        assert!(matches!(
            decode::<u64>(&bytes),
            Err(CodecError::UnknownFormat(9))
        ));
    }

    #[test]
    fn a_prefix_decodes_without_the_rest() {
        let bytes = encode(&(7u64, "a long payload".to_string()));
        assert_eq!(decode_prefix::<u64>(&bytes).expect("prefix"), 7);
        let mut bad = bytes.clone();
        bad[12] ^= 1;
        assert!(
            decode_prefix::<u64>(&bad).is_err(),
            "damage after the prefix went unnoticed"
        );
    }

    #[test]
    fn absurd_lengths_are_bounded() {
        // A Vec<u8> whose length prefix claims 2^62 bytes must fail fast, not allocate.
        let mut payload = (1u64 << 62).to_le_bytes().to_vec();
        payload.extend_from_slice(&[0; 8]);
        assert!(from_bytes::<Vec<u8>>(&payload).is_err());
    }
}
