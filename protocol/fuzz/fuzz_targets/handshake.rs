//! Runs both sides of the handshake against arbitrary peer bytes: the relay's side (what any host on the
//! internet can send it) and the agent's side (what a malicious or broken relay can send back). Each must end
//! in `Ok` or a `HandshakeError`, never a panic.
//!
//! The first byte picks a mode. Raw bytes rarely get past JSON decoding, so the structured modes put a
//! well-formed first frame (a `ClientHello`, or a `ServerHello` carrying the pinned relay key) built from the
//! input in front of arbitrary bytes, to reach the signature checks and the second message.
#![no_main]

use std::sync::OnceLock;

use ct_protocol::frame::{self, FrameReader, FrameWriter};
use ct_protocol::handshake::{self, ClientHello, ClientParams, ServerHello};
use ct_protocol::version::{PROTOCOL_VERSION, SOFTWARE_VERSION};
use ct_protocol::Fingerprint;
use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
    })
}

fn array32(data: &[u8], at: usize) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = data.get(at + i).copied().unwrap_or(i as u8);
    }
    out
}

fn u32_at(data: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([0, 1, 2, 3].map(|i| data.get(at + i).copied().unwrap_or(0)))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let relay_key = SigningKey::from_bytes(&[7u8; 32]);
    let agent_key = SigningKey::from_bytes(&[9u8; 32]);
    let binding = [1u8; 32];
    let mut input = Vec::new();
    match mode % 4 {
        // Relay side, raw bytes.
        0 => input.extend_from_slice(rest),
        // Relay side, a valid-looking hello (arbitrary key, nonce, versions) then arbitrary bytes.
        1 => {
            let hello = ClientHello {
                protocol: u32_at(rest, 0) % (PROTOCOL_VERSION + 2),
                min_protocol: u32_at(rest, 4) % (PROTOCOL_VERSION + 2),
                software: SOFTWARE_VERSION.into(),
                agent_key: array32(rest, 8),
                nonce: array32(rest, 40),
            };
            input.extend(frame::encode(&hello).expect("encodes"));
            input.extend_from_slice(rest.get(72..).unwrap_or_default());
        }
        // Agent side, raw bytes.
        2 => input.extend_from_slice(rest),
        // Agent side, a challenge with the pinned relay key and an arbitrary signature, then arbitrary bytes.
        _ => {
            let mut signature = [0u8; 64];
            signature[..32].copy_from_slice(&array32(rest, 0));
            signature[32..].copy_from_slice(&array32(rest, 32));
            let hello = ServerHello::Challenge {
                protocol: PROTOCOL_VERSION,
                software: SOFTWARE_VERSION.into(),
                relay_key: relay_key.verifying_key().to_bytes(),
                nonce: array32(rest, 64),
                signature,
            };
            input.extend(frame::encode(&hello).expect("encodes"));
            input.extend_from_slice(rest.get(96..).unwrap_or_default());
        }
    }
    runtime().block_on(async {
        let mut reader = FrameReader::new(&input[..]);
        let mut writer = FrameWriter::new(tokio::io::sink());
        if mode % 4 < 2 {
            let _ = handshake::server(&mut reader, &mut writer, &relay_key, &binding).await;
        } else {
            let params = ClientParams {
                key: &agent_key,
                relay: Fingerprint::of(&relay_key.verifying_key()),
                channel_binding: &binding,
                pair: None,
            };
            let _ = handshake::client(&mut reader, &mut writer, params).await;
        }
    });
});
