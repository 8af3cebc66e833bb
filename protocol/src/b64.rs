//! Serde helpers that carry fixed-size byte arrays as unpadded base64url strings, so JSON frames stay
//! compact and readable in logs.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{de::Error as _, Deserialize, Deserializer, Serializer};

/// Encodes bytes as unpadded base64url.
pub fn encode(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes unpadded base64url into exactly `N` bytes.
pub fn decode_array<const N: usize>(s: &str) -> Option<[u8; N]> {
    // A base64 string for N bytes is at most 4 * ceil(N / 3) long; refuse longer input before decoding.
    if s.len() > N.div_ceil(3) * 4 {
        return None;
    }
    URL_SAFE_NO_PAD.decode(s).ok()?.try_into().ok()
}

/// `#[serde(with = "ct_protocol::b64::array")]` for `[u8; N]` fields.
pub mod array {
    use super::*;

    pub fn serialize<S: Serializer, const N: usize>(v: &[u8; N], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
        d: D,
    ) -> Result<[u8; N], D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        decode_array(&s).ok_or_else(|| D::Error::custom(format!("expected {N} bytes as base64url")))
    }
}
