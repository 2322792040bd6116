//! Content identifiers.
//!
//! A [`ChunkId`] is the BLAKE3 hash of a chunk's bytes; an [`ImageId`] is the BLAKE3 hash of an image's
//! canonical manifest encoding (see [`crate::manifest`]). Both print and parse as 64 lowercase hex
//! digits. This module decides what an id *is*; which bytes get hashed for a manifest is decided in
//! `manifest`.

use std::fmt;
use std::str::FromStr;

use bincode::{Decode, Encode};

/// Errors from parsing an id written as text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdParseError {
    /// The text is not 64 characters long.
    #[error("an id is 64 hex digits, got {0} characters")]
    Length(usize),
    /// The text holds a character that is not a hex digit.
    #[error("an id is 64 hex digits, found {0:?}")]
    NotHex(char),
}

fn parse_hex32(s: &str) -> Result<[u8; 32], IdParseError> {
    if s.len() != 64 {
        return Err(IdParseError::Length(s.chars().count()));
    }
    let mut out = [0u8; 32];
    let bytes = s.as_bytes();
    for (i, byte) in out.iter_mut().enumerate() {
        let hi = hex_val(bytes[2 * i])?;
        let lo = hex_val(bytes[2 * i + 1])?;
        *byte = (hi << 4) | lo;
    }
    Ok(out)
}

fn hex_val(c: u8) -> Result<u8, IdParseError> {
    match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        b'A'..=b'F' => Ok(c - b'A' + 10),
        _ => Err(IdParseError::NotHex(c as char)),
    }
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    for b in bytes {
        write!(f, "{b:02x}")?;
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Encode, Decode)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            /// The raw 32 bytes.
            pub const fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }

            /// The first 8 hex digits, for logs.
            pub fn short(&self) -> String {
                self.to_string()[..8].to_owned()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write_hex(f, &self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}(", stringify!($name))?;
                write_hex(f, &self.0[..6])?;
                write!(f, "..)")
            }
        }

        impl FromStr for $name {
            type Err = IdParseError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                parse_hex32(s.trim()).map($name)
            }
        }
    };
}

id_type!(
    /// BLAKE3 hash of a chunk's bytes.
    ChunkId
);
id_type!(
    /// BLAKE3 hash of an image's canonical manifest encoding.
    ImageId
);

impl ChunkId {
    /// The id of `bytes`.
    pub fn of(bytes: &[u8]) -> ChunkId {
        ChunkId(*blake3::hash(bytes).as_bytes())
    }

    /// Whether `bytes` hash to this id. Comparison is constant-time (blake3's `Hash` equality).
    pub fn verify(&self, bytes: &[u8]) -> bool {
        blake3::hash(bytes) == blake3::Hash::from_bytes(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let id = ChunkId::of(b"hello");
        let s = id.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s, blake3::hash(b"hello").to_hex().as_str());
        assert_eq!(s.parse::<ChunkId>(), Ok(id));
        assert_eq!(s.to_uppercase().parse::<ChunkId>(), Ok(id));
        assert_eq!(id.short(), &s[..8]);
    }

    #[test]
    fn parse_rejects_bad_text() {
        assert_eq!("abc".parse::<ImageId>(), Err(IdParseError::Length(3)));
        let bad = format!("{}g", "0".repeat(63));
        assert_eq!(bad.parse::<ImageId>(), Err(IdParseError::NotHex('g')));
        let multibyte = format!("{}é", "0".repeat(62));
        assert!(multibyte.parse::<ImageId>().is_err());
    }

    #[test]
    fn verify_detects_tampering() {
        let id = ChunkId::of(b"chunk");
        assert!(id.verify(b"chunk"));
        assert!(!id.verify(b"chunK"));
    }
}
