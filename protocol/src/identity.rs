//! Key fingerprints: how people and logs name an ed25519 public key (an agent or a relay).
//!
//! A fingerprint is SHA-256 of the 32-byte public key, shown like OpenSSH does (`SHA256:` + base64), so a
//! user can compare what `ct-agent status` prints with what Discord shows.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD_NO_PAD;
use base64::Engine;
use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

const PREFIX: &str = "SHA256:";

/// The SHA-256 digest of an ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    pub fn of(key: &VerifyingKey) -> Self {
        Self::of_bytes(key.as_bytes())
    }

    pub fn of_bytes(key: &[u8; 32]) -> Self {
        Self(Sha256::digest(key).into())
    }

    /// A short form for tables and log lines: enough to tell keys apart at a glance, not to verify one.
    pub fn short(&self) -> String {
        self.to_string()[..PREFIX.len() + 12].to_string()
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", STANDARD_NO_PAD.encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// A string that is not a fingerprint.
#[derive(Debug, thiserror::Error)]
#[error("not a key fingerprint (expected SHA256: followed by 43 base64 characters)")]
pub struct BadFingerprint;

impl FromStr for Fingerprint {
    type Err = BadFingerprint;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let body = s.trim().strip_prefix(PREFIX).ok_or(BadFingerprint)?;
        if body.len() != 43 {
            return Err(BadFingerprint);
        }
        let bytes = STANDARD_NO_PAD.decode(body).map_err(|_| BadFingerprint)?;
        Ok(Self(bytes.try_into().map_err(|_| BadFingerprint)?))
    }
}

impl Serialize for Fingerprint {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Fingerprint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_parses_back() {
        let fp = Fingerprint::of_bytes(&[7; 32]);
        let text = fp.to_string();
        assert!(text.starts_with("SHA256:") && text.len() == 50, "{text}");
        assert_eq!(text.parse::<Fingerprint>().unwrap(), fp);
        assert!(fp.short().len() < text.len());
    }

    #[test]
    fn rejects_near_misses() {
        for bad in [
            "",
            "SHA256:",
            "MD5:abc",
            "SHA256:!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!",
        ] {
            assert!(bad.parse::<Fingerprint>().is_err(), "{bad}");
        }
    }
}
