//! HTTP-interactions mode: Discord POSTs each interaction to the relay, signed with the application's
//! ed25519 key over `X-Signature-Timestamp` followed by the raw body (hex signature in
//! `X-Signature-Ed25519`). Discord requires endpoints to refuse bad signatures with 401 (it sends some on
//! purpose to check), and to answer a PING (type 1) with a PONG (`{"type":1}`).
//!
//! The relay's HTTP server calls [`InteractionVerifier::check`] with the headers and the body bytes as
//! received (before any JSON parsing: the signature is over the exact bytes).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ed25519_dalek::{Signature, VerifyingKey};
use http::HeaderMap;
use serde_json::{json, Value};
use serenity::all::Interaction;

/// How far a signature's timestamp may be from our clock. Discord does not publish a window; this bounds
/// how long a captured request could be replayed while tolerating ordinary clock skew.
pub const MAX_SKEW: Duration = Duration::from_secs(5 * 60);

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    #[error("the signature does not verify")]
    BadSignature,
    #[error("the signature timestamp is {age_secs} s away from now")]
    Stale { age_secs: u64 },
    #[error("the body is not an interaction: {0}")]
    BadBody(String),
    #[error("the public key is not a 64-hex-digit ed25519 key")]
    BadKey,
}

impl VerifyError {
    /// The HTTP status to answer with: 401 for anything about the signature (Discord checks this), 400 for a
    /// signed body we cannot read.
    pub fn status(&self) -> u16 {
        match self {
            Self::BadBody(_) => 400,
            Self::BadKey => 500,
            _ => 401,
        }
    }
}

/// A verified request.
#[derive(Debug, Clone)]
pub enum Incoming {
    /// Discord checking the endpoint: answer [`pong`].
    Ping,
    Interaction(Box<Interaction>),
}

/// The answer to a PING.
pub fn pong() -> Value {
    json!({"type": 1})
}

/// Checks signatures with the application's public key.
#[derive(Debug, Clone)]
pub struct InteractionVerifier {
    key: VerifyingKey,
}

impl InteractionVerifier {
    /// From `DISCORD_PUBLIC_KEY` (hex).
    pub fn from_hex(public_key: &str) -> Result<Self, VerifyError> {
        let bytes = hex::decode(public_key.trim()).map_err(|_| VerifyError::BadKey)?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| VerifyError::BadKey)?;
        let key = VerifyingKey::from_bytes(&bytes).map_err(|_| VerifyError::BadKey)?;
        Ok(Self { key })
    }

    /// Verifies the signature on `body` (as `now` sees the clock).
    pub fn verify(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now: SystemTime,
    ) -> Result<(), VerifyError> {
        let header = |name: &'static str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty())
                .ok_or(VerifyError::MissingHeader(name))
        };
        let sig_hex = header("x-signature-ed25519")?;
        let timestamp = header("x-signature-timestamp")?;
        let sig = hex::decode(sig_hex)
            .ok()
            .and_then(|b| Signature::from_slice(&b).ok())
            .ok_or(VerifyError::BadSignature)?;
        let mut msg = Vec::with_capacity(timestamp.len() + body.len());
        msg.extend_from_slice(timestamp.as_bytes());
        msg.extend_from_slice(body);
        // Strict: refuses the malleable and small-order forms plain `verify` lets through.
        self.key
            .verify_strict(&msg, &sig)
            .map_err(|_| VerifyError::BadSignature)?;
        // Checked after the signature, so the timestamp is Discord's and not an attacker's.
        let ts: u64 = timestamp.parse().map_err(|_| VerifyError::BadSignature)?;
        let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let age_secs = now.abs_diff(ts);
        if age_secs > MAX_SKEW.as_secs() {
            return Err(VerifyError::Stale { age_secs });
        }
        Ok(())
    }

    /// Verifies, then reads the body: a PING or an interaction.
    pub fn check(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now: SystemTime,
    ) -> Result<Incoming, VerifyError> {
        self.verify(headers, body, now)?;
        let v: Value =
            serde_json::from_slice(body).map_err(|e| VerifyError::BadBody(e.to_string()))?;
        if v["type"] == 1 {
            return Ok(Incoming::Ping);
        }
        serde_json::from_value(v)
            .map(|i| Incoming::Interaction(Box::new(i)))
            .map_err(|e| VerifyError::BadBody(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use ct_testkit::discord::InteractionSigner;
    use http::HeaderValue;

    use super::*;

    fn headers(pairs: &[(String, String)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn valid_ping_is_accepted_and_answered_with_pong() {
        let signer = InteractionSigner::generate();
        let v = InteractionVerifier::from_hex(&signer.public_key_hex()).unwrap();
        let body = br#"{"type":1,"id":"1","application_id":"2","token":"t","version":1}"#;
        let h = headers(&signer.headers(body));
        assert!(matches!(
            v.check(&h, body, SystemTime::now()),
            Ok(Incoming::Ping)
        ));
        assert_eq!(pong(), json!({"type": 1}));
    }

    #[test]
    fn tampered_forged_missing_and_stale_are_refused_with_401() {
        let signer = InteractionSigner::generate();
        let v = InteractionVerifier::from_hex(&signer.public_key_hex()).unwrap();
        let body = br#"{"type":1}"#;
        let good = signer.headers(body);
        let now = SystemTime::now();

        let tampered = br#"{"type":2}"#;
        assert_eq!(
            v.verify(&headers(&good), tampered, now),
            Err(VerifyError::BadSignature)
        );

        let forged = InteractionSigner::generate().headers(body);
        assert_eq!(
            v.verify(&headers(&forged), body, now),
            Err(VerifyError::BadSignature)
        );

        assert_eq!(
            v.verify(&headers(&good[1..]), body, now),
            Err(VerifyError::MissingHeader("x-signature-ed25519"))
        );
        assert_eq!(
            v.verify(&headers(&good[..1]), body, now),
            Err(VerifyError::MissingHeader("x-signature-timestamp"))
        );
        let garbage = vec![("x-signature-ed25519".into(), "zz".into()), good[1].clone()];
        assert_eq!(
            v.verify(&headers(&garbage), body, now),
            Err(VerifyError::BadSignature)
        );

        // A correctly signed but old request: a replay.
        let old = "1000000000";
        let stale = vec![
            ("x-signature-ed25519".into(), signer.sign(old, body)),
            ("x-signature-timestamp".into(), old.into()),
        ];
        let err = v.verify(&headers(&stale), body, now).unwrap_err();
        assert!(matches!(err, VerifyError::Stale { .. }));
        assert_eq!(err.status(), 401);
        // Within the window it passes.
        let later = now + Duration::from_secs(60);
        assert!(v.verify(&headers(&good), body, later).is_ok());
    }

    #[test]
    fn bad_keys_and_bodies() {
        assert_eq!(
            InteractionVerifier::from_hex("00").unwrap_err(),
            VerifyError::BadKey
        );
        let signer = InteractionSigner::generate();
        let v = InteractionVerifier::from_hex(&signer.public_key_hex()).unwrap();
        let body = b"not json";
        let err = v
            .check(&headers(&signer.headers(body)), body, SystemTime::now())
            .unwrap_err();
        assert_eq!(err.status(), 400);
    }
}
