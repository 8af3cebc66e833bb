//! Pairing tokens: the one string a user copies from Discord (or `ct-relay admin pair-code`) into
//! `ct-agent pair <token>`.
//!
//! A token is `ctpair1_` followed by base64url JSON holding the relay address(es), the one-time code and the
//! relay key fingerprint the agent pins. The code is `<id>-<secret>`: the relay finds the code by its id and
//! compares the secret in constant time, so timing reveals nothing about the secret.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::Rng;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::identity::Fingerprint;

const TOKEN_PREFIX: &str = "ctpair1_";
/// Longest token accepted, so a pasted novel is refused before it is decoded.
pub const MAX_TOKEN_LEN: usize = 2048;
const MAX_RELAYS: usize = 8;
const MAX_ADDR_LEN: usize = 255;

/// Lower-case letters and digits without look-alikes (no 0/o, 1/l/i): 31 symbols, about 4.95 bits each.
pub const ALPHABET: &[u8; 31] = b"abcdefghjkmnpqrstuvwxyz23456789";
const ID_LEN: usize = 8;
const SECRET_LEN: usize = 24;

/// A one-time pairing code: a public id and a secret of about 119 bits.
#[derive(Clone, PartialEq, Eq)]
pub struct PairCode {
    pub id: String,
    secret: String,
}

impl PairCode {
    /// A fresh random code.
    pub fn generate() -> Self {
        let mut rng = rand::rngs::OsRng;
        let mut draw = |n: usize| -> String {
            (0..n)
                .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
                .collect()
        };
        Self {
            id: draw(ID_LEN),
            secret: draw(SECRET_LEN),
        }
    }

    /// Compares secrets in constant time.
    pub fn secret_matches(&self, other: &PairCode) -> bool {
        self.secret.as_bytes().ct_eq(other.secret.as_bytes()).into()
    }

    /// The secret, for storing. Never log it.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    pub fn from_parts(id: String, secret: String) -> Self {
        Self { id, secret }
    }
}

impl fmt::Display for PairCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.id, self.secret)
    }
}

impl fmt::Debug for PairCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PairCode({}-MASKED)", self.id)
    }
}

impl FromStr for PairCode {
    type Err = TokenError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (id, secret) = s.split_once('-').ok_or(TokenError::BadCode)?;
        let valid = |part: &str, len: usize| {
            part.len() == len && part.bytes().all(|b| ALPHABET.contains(&b))
        };
        if !valid(id, ID_LEN) || !valid(secret, SECRET_LEN) {
            return Err(TokenError::BadCode);
        }
        Ok(Self {
            id: id.to_string(),
            secret: secret.to_string(),
        })
    }
}

/// Everything an agent needs to pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairingToken {
    /// `host:port` addresses of the relay, tried in order; QUIC and WebSocket share the port.
    pub relays: Vec<String>,
    pub code: PairCode,
    /// The relay key fingerprint the agent will pin.
    pub relay: Fingerprint,
}

#[derive(Serialize, Deserialize)]
struct Wire {
    r: Vec<String>,
    c: String,
    f: Fingerprint,
}

/// Why a string is not a usable pairing token. Each message says what to do.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("that is not a CodeTogether pairing token (it should start with `{TOKEN_PREFIX}`): copy the whole token from /register in Discord")]
    NotAToken,
    #[error(
        "the pairing token is longer than {MAX_TOKEN_LEN} characters: copy only the token itself"
    )]
    TooLong,
    #[error("the pairing token is damaged (was it cut off while copying?): copy it again from /register")]
    Damaged,
    #[error("the pairing token names no usable relay address: ask for a new token")]
    BadRelay,
    #[error("the pairing code inside the token is malformed: ask for a new token")]
    BadCode,
}

impl fmt::Display for PairingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let wire = Wire {
            r: self.relays.clone(),
            c: self.code.to_string(),
            f: self.relay,
        };
        let json = serde_json::to_vec(&wire).map_err(|_| fmt::Error)?;
        write!(f, "{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(json))
    }
}

impl FromStr for PairingToken {
    type Err = TokenError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLong);
        }
        let body = s.strip_prefix(TOKEN_PREFIX).ok_or(TokenError::NotAToken)?;
        let json = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| TokenError::Damaged)?;
        let wire: Wire = serde_json::from_slice(&json).map_err(|_| TokenError::Damaged)?;
        if wire.r.is_empty()
            || wire.r.len() > MAX_RELAYS
            || wire
                .r
                .iter()
                .any(|a| a.is_empty() || a.len() > MAX_ADDR_LEN || !a.contains(':'))
        {
            return Err(TokenError::BadRelay);
        }
        Ok(Self {
            relays: wire.r,
            code: wire.c.parse()?,
            relay: wire.f,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> PairingToken {
        PairingToken {
            relays: vec!["relay.example.com:7443".into(), "127.0.0.1:7443".into()],
            code: PairCode::generate(),
            relay: Fingerprint::of_bytes(&[1; 32]),
        }
    }

    #[test]
    fn round_trips_and_survives_surrounding_whitespace() {
        let t = token();
        let text = format!("  {t}\n");
        assert_eq!(text.parse::<PairingToken>().unwrap(), t);
    }

    #[test]
    fn codes_are_distinct_and_parse_back() {
        let a = PairCode::generate();
        let b = PairCode::generate();
        assert_ne!(a.to_string(), b.to_string());
        let again: PairCode = a.to_string().parse().unwrap();
        assert!(again.secret_matches(&a) && !again.secret_matches(&b));
        assert!(
            !format!("{a:?}").contains(a.secret()),
            "Debug must not print the secret"
        );
    }

    #[test]
    fn each_kind_of_bad_token_gets_its_own_error() {
        assert_eq!("hello".parse::<PairingToken>(), Err(TokenError::NotAToken));
        assert_eq!(
            "ctpair1_!!!".parse::<PairingToken>(),
            Err(TokenError::Damaged)
        );
        let cut = token().to_string();
        assert_eq!(
            cut[..cut.len() - 10].parse::<PairingToken>(),
            Err(TokenError::Damaged)
        );
        assert_eq!(
            "x".repeat(5000).parse::<PairingToken>(),
            Err(TokenError::TooLong)
        );
        let mut no_relay = token();
        no_relay.relays.clear();
        assert_eq!(
            no_relay.to_string().parse::<PairingToken>(),
            Err(TokenError::BadRelay)
        );
        let wire = Wire {
            r: vec!["a:1".into()],
            c: "short-code".into(),
            f: Fingerprint::of_bytes(&[0; 32]),
        };
        let bad_code = format!(
            "{TOKEN_PREFIX}{}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&wire).unwrap())
        );
        assert_eq!(bad_code.parse::<PairingToken>(), Err(TokenError::BadCode));
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(s in ".{0,300}") {
            let _ = s.parse::<PairingToken>();
            let _ = format!("{TOKEN_PREFIX}{s}").parse::<PairingToken>();
        }
    }
}
