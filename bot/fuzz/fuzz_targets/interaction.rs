//! What reaches the bot from Discord, or from anyone who can POST to the relay's interactions path:
//! - a body with a valid signature (so the fuzzer gets past the check and reaches the JSON → interaction parser,
//!   as Discord's own requests do) must be read as a PING, an interaction or a `BadBody` error;
//! - arbitrary signature and timestamp headers on arbitrary bodies must be refused, never accepted or panicked on;
//! - any `custom_id` (a component's id comes back from the client unchanged, so anyone can forge one) parses to
//!   an action or to nothing, and what parses encodes back to the same id.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ct_bot::custom_id::Action;
use ct_bot::verify::InteractionVerifier;
use ed25519_dalek::{Signer, SigningKey};
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;

fn key() -> &'static (SigningKey, InteractionVerifier) {
    static KEY: OnceLock<(SigningKey, InteractionVerifier)> = OnceLock::new();
    KEY.get_or_init(|| {
        let signing = SigningKey::from_bytes(&[42u8; 32]);
        let verifier = InteractionVerifier::from_hex(&hex::encode(signing.verifying_key().to_bytes()))
            .expect("a valid key");
        (signing, verifier)
    })
}

fn headers(signature: &str, timestamp: &str) -> Option<HeaderMap> {
    let mut h = HeaderMap::new();
    h.insert("x-signature-ed25519", HeaderValue::from_str(signature).ok()?);
    h.insert("x-signature-timestamp", HeaderValue::from_str(timestamp).ok()?);
    Some(h)
}

fuzz_target!(|data: &[u8]| {
    let (signing, verifier) = key();
    let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let timestamp = "1800000000";

    // Signed like Discord signs: the parser sees the body.
    let mut msg = timestamp.as_bytes().to_vec();
    msg.extend_from_slice(data);
    let sig = hex::encode(signing.sign(&msg).to_bytes());
    if let Some(h) = headers(&sig, timestamp) {
        let _ = verifier.check(&h, data, now);
    }

    // Forged: the first bytes as the signature and timestamp headers.
    let split = data.len().min(64);
    let forged_sig = hex::encode(&data[..split]);
    let forged_ts = String::from_utf8_lossy(&data[split..data.len().min(split + 12)]).into_owned();
    if let Some(h) = headers(&forged_sig, &forged_ts) {
        assert!(
            verifier.check(&h, data, SystemTime::now()).is_err(),
            "a forged signature was accepted"
        );
    }

    if let Ok(id) = std::str::from_utf8(data) {
        if let Some(action) = Action::parse(id) {
            if let Ok(again) = action.encode() {
                assert_eq!(Action::parse(&again), Some(action), "{id:?} → {again:?}");
            }
        }
    }
});
