//! Versions: the wire protocol number both sides compare, and the software version people read.
//!
//! The rule: each side refuses a peer older than its own [`MIN_PROTOCOL_VERSION`], and a session speaks the
//! lower of the two protocols. A newer agent therefore keeps working with an older relay for as long as it
//! still supports that relay's protocol, and the side that refuses says which versions it needs.

/// The protocol this build speaks. Bump when a message changes meaning or a required field is added.
pub const PROTOCOL_VERSION: u32 = 1;

/// The oldest peer protocol this build still accepts.
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// The version of the crates, shown in errors so a person knows what to upgrade.
pub const SOFTWARE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The protocol a session with a peer speaking `peer` uses, or `None` when the peer is too old for us.
pub fn negotiate(peer: u32) -> Option<u32> {
    (peer >= MIN_PROTOCOL_VERSION).then(|| peer.min(PROTOCOL_VERSION))
}
