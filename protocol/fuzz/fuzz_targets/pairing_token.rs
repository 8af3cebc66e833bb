//! Arbitrary strings through the pairing token and fingerprint parsers: errors, never panics.
#![no_main]

use ct_protocol::pairing::PairingToken;
use ct_protocol::Fingerprint;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(token) = s.parse::<PairingToken>() {
            // Whatever parses must print back to something that parses to the same token.
            assert_eq!(token.to_string().parse::<PairingToken>().ok(), Some(token));
        }
        let _ = s.parse::<Fingerprint>();
    }
});
