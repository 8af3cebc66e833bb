//! Feeds arbitrary bytes to the frame decoder as every message type a peer can send: it must return an
//! error or a message, never panic, and never claim more bytes than it was given.
#![no_main]

use ct_protocol::frame;
use ct_protocol::handshake::{ClientAuth, ClientHello, ServerHello, Verdict};
use ct_protocol::{AgentMessage, RelayMessage};
use libfuzzer_sys::fuzz_target;

fn check<T: serde::de::DeserializeOwned>(data: &[u8]) {
    if let Ok(Some((_, used))) = frame::decode::<T>(data) {
        assert!(used <= data.len());
    }
}

fuzz_target!(|data: &[u8]| {
    check::<AgentMessage>(data);
    check::<RelayMessage>(data);
    check::<ClientHello>(data);
    check::<ClientAuth>(data);
    check::<ServerHello>(data);
    check::<Verdict>(data);
    let _ = frame::check(data);
});
