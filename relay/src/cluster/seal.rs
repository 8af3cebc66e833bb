//! What makes a message on the bus a node's: every payload carries an HMAC-SHA256 tag under a key derived from
//! the relay key, which only the cluster's nodes hold (they share it through the store, see
//! [`crate::store::Store::shared_secret`]).
//!
//! Without it, anyone who could reach NATS could tell a node to approve a tool use, cancel a task, drop an
//! agent or ask it for a project: nodes act on `Deliver`, `Close`, `Kick` and `Ask` without asking who sent
//! them (the sending node decided and audited). The tag covers the subject (a message for one agent cannot be
//! moved to another's subject), the time it was sealed (an old message is refused after [`MAX_AGE`]) and the
//! body; a subscription refuses a tag it has already seen, so a captured message cannot be replayed inside
//! that window either. A reply is bound to the request it answers. The bus is not encrypted by this: keep
//! NATS on a private network, or use a `tls://` URL (README, "A cluster of relays").
//!
//! Layout: `[1 byte version][8 bytes sealed-at, ms since the epoch, big-endian][32 bytes tag][body]`.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use ring::{hkdf, hmac};

const VERSION: u8 = 1;
const HEADER: usize = 1 + 8 + TAG;
const TAG: usize = 32;

/// How far a message's seal time may be from this node's clock, either way. Nodes keep their clocks in step
/// (NTP) far better than this; a message older than this is a replay or a bus that held it too long, and
/// every message on the bus is one a later message or a periodic check repeats.
pub const MAX_AGE: Duration = Duration::from_secs(30);

/// Why a payload was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("not sealed by a node of this cluster (too short or an unknown format)")]
    Malformed,
    #[error("its tag does not match: not from a node of this cluster, or changed on the way")]
    BadTag,
    #[error("sealed too long ago, or in the future (check the nodes' clocks)")]
    Stale,
    #[error("seen before: a replay")]
    Replayed,
}

/// The key every node of one cluster derives from the relay key.
#[derive(Clone)]
pub struct Seal {
    key: hmac::Key,
}

impl std::fmt::Debug for Seal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Seal(..)")
    }
}

/// The tag of a request, which its reply is bound to.
pub type RequestTag = [u8; TAG];

struct KeyLen;

impl hkdf::KeyType for KeyLen {
    fn len(&self) -> usize {
        32
    }
}

impl Seal {
    /// The bus key for the cluster whose relay key's secret bytes are `relay_secret`. A derived key, so the
    /// relay key itself is never used for anything but agent handshakes.
    pub fn from_relay_secret(relay_secret: &[u8; 32]) -> Self {
        let prk =
            hkdf::Salt::new(hkdf::HKDF_SHA256, b"codetogether cluster bus").extract(relay_secret);
        let mut key = [0u8; 32];
        prk.expand(&[b"hmac-sha256 v1"], KeyLen)
            .and_then(|okm| okm.fill(&mut key))
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, &key),
        }
    }

    /// `body` sealed for `subject`, now.
    pub fn seal(&self, subject: &str, body: &[u8]) -> Bytes {
        self.seal_at(Context::Subject(subject), now_ms(), body).0
    }

    /// A request's `body` sealed for `subject`, with the tag its reply will be bound to.
    pub fn seal_request(&self, subject: &str, body: &[u8]) -> (Bytes, RequestTag) {
        self.seal_at(Context::Subject(subject), now_ms(), body)
    }

    /// `body` sealed as the reply to the request whose tag is `request`.
    pub fn seal_reply(&self, request: &RequestTag, body: &[u8]) -> Bytes {
        self.seal_at(Context::ReplyTo(request), now_ms(), body).0
    }

    fn seal_at(&self, context: Context<'_>, at: u64, body: &[u8]) -> (Bytes, RequestTag) {
        let tag: RequestTag = hmac::sign(&self.key, &message(context, at, body))
            .as_ref()
            .try_into()
            .expect("HMAC-SHA256 tags are 32 bytes");
        let mut out = BytesMut::with_capacity(HEADER + body.len());
        out.put_u8(VERSION);
        out.put_u64(at);
        out.put_slice(&tag);
        out.put_slice(body);
        (out.freeze(), tag)
    }

    /// The body of `payload` sent on `subject`, with its tag, if a node of this cluster sealed it recently.
    pub fn open(&self, subject: &str, payload: &Bytes) -> Result<(Bytes, RequestTag), Refused> {
        self.open_in(Context::Subject(subject), payload, now_ms())
    }

    /// The body of a reply to the request whose tag is `request`.
    pub fn open_reply(&self, request: &RequestTag, payload: &Bytes) -> Result<Bytes, Refused> {
        self.open_in(Context::ReplyTo(request), payload, now_ms())
            .map(|(body, _)| body)
    }

    fn open_in(
        &self,
        context: Context<'_>,
        payload: &Bytes,
        now: u64,
    ) -> Result<(Bytes, RequestTag), Refused> {
        if payload.len() < HEADER || payload[0] != VERSION {
            return Err(Refused::Malformed);
        }
        let at = u64::from_be_bytes(payload[1..9].try_into().expect("8 bytes"));
        let tag: RequestTag = payload[9..HEADER].try_into().expect("32 bytes");
        let body = payload.slice(HEADER..);
        hmac::verify(&self.key, &message(context, at, &body), &tag).map_err(|_| Refused::BadTag)?;
        if now.abs_diff(at) > MAX_AGE.as_millis() as u64 {
            return Err(Refused::Stale);
        }
        Ok((body, tag))
    }
}

/// What a tag is bound to besides the body.
#[derive(Clone, Copy)]
enum Context<'a> {
    Subject(&'a str),
    ReplyTo(&'a RequestTag),
}

/// The bytes a tag covers: a label that keeps subjects and replies apart, the subject or the request's tag,
/// the seal time and the body.
fn message(context: Context<'_>, at: u64, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(64 + body.len());
    match context {
        Context::Subject(subject) => {
            m.extend_from_slice(b"subject\0");
            m.extend_from_slice(&(subject.len() as u64).to_be_bytes());
            m.extend_from_slice(subject.as_bytes());
        }
        Context::ReplyTo(request) => {
            m.extend_from_slice(b"reply\0");
            m.extend_from_slice(request);
        }
    }
    m.extend_from_slice(&at.to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Most tags one subscription remembers. A refused message is never remembered, so only the cluster's own
/// traffic fills it; past this (a subject busier than some 500 messages a second for the whole window) the
/// oldest are forgotten early, which only lets a replay of one of those through while it is still fresh.
const MAX_REMEMBERED: usize = 32_768;

/// The tags one subscription has accepted within [`MAX_AGE`]: a second delivery of the same sealed message
/// is a replay (NATS core delivers each message to a subscription at most once).
#[derive(Debug, Default)]
pub struct Replays {
    seen: HashMap<RequestTag, u64>,
    order: VecDeque<(u64, RequestTag)>,
}

impl Replays {
    /// Records `tag`, sealed at `at`; `false` if it was seen already.
    pub fn first(&mut self, tag: RequestTag, now: u64) -> bool {
        let horizon = now.saturating_sub(2 * MAX_AGE.as_millis() as u64);
        while let Some(&(t, old)) = self.order.front() {
            if t >= horizon && self.order.len() < MAX_REMEMBERED {
                break;
            }
            self.order.pop_front();
            self.seen.remove(&old);
        }
        if self.seen.insert(tag, now).is_some() {
            return false;
        }
        self.order.push_back((now, tag));
        true
    }

    /// [`Replays::first`] now.
    pub fn first_now(&mut self, tag: RequestTag) -> bool {
        self.first(tag, now_ms())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seal() -> Seal {
        Seal::from_relay_secret(&[7; 32])
    }

    #[test]
    fn a_sealed_message_opens_on_its_subject_and_nowhere_else() {
        let s = seal();
        let sealed = s.seal("ct.agent.aa", b"{\"kind\":\"kick\"}");
        let (body, _) = s.open("ct.agent.aa", &sealed).unwrap();
        assert_eq!(&body[..], b"{\"kind\":\"kick\"}");
        assert_eq!(s.open("ct.agent.bb", &sealed), Err(Refused::BadTag));
    }

    #[test]
    fn another_clusters_key_an_unsealed_or_a_changed_message_is_refused() {
        let s = seal();
        let other = Seal::from_relay_secret(&[8; 32]);
        let sealed = other.seal("ct.agent.aa", b"x");
        assert_eq!(s.open("ct.agent.aa", &sealed), Err(Refused::BadTag));
        let plain = Bytes::from_static(b"{\"kind\":\"close\",\"reason\":\"revoked\"}");
        assert!(s.open("ct.agent.aa", &plain).is_err());
        assert_eq!(
            s.open("ct.agent.aa", &Bytes::from_static(b"")),
            Err(Refused::Malformed)
        );
        let mut changed = s.seal("ct.agent.aa", b"allow").to_vec();
        *changed.last_mut().unwrap() ^= 1;
        assert_eq!(
            s.open("ct.agent.aa", &Bytes::from(changed)),
            Err(Refused::BadTag)
        );
        // Moving the seal time (to dodge the age check) breaks the tag too.
        let mut moved = s.seal("ct.agent.aa", b"allow").to_vec();
        moved[8] ^= 1;
        assert_eq!(
            s.open("ct.agent.aa", &Bytes::from(moved)),
            Err(Refused::BadTag)
        );
    }

    #[test]
    fn an_old_or_future_message_is_refused() {
        let s = seal();
        let now = now_ms();
        let max = MAX_AGE.as_millis() as u64;
        let old = s.seal_at(Context::Subject("t"), now - max - 1_000, b"x").0;
        assert_eq!(
            s.open_in(Context::Subject("t"), &old, now),
            Err(Refused::Stale)
        );
        let future = s.seal_at(Context::Subject("t"), now + max + 1_000, b"x").0;
        assert_eq!(
            s.open_in(Context::Subject("t"), &future, now),
            Err(Refused::Stale)
        );
        let recent = s.seal_at(Context::Subject("t"), now - 1_000, b"x").0;
        assert!(s.open_in(Context::Subject("t"), &recent, now).is_ok());
    }

    #[test]
    fn a_reply_opens_only_for_its_request() {
        let s = seal();
        let (_, request) = s
            .open("ct.agent.aa", &s.seal("ct.agent.aa", b"ask"))
            .unwrap();
        let (_, other) = s
            .open("ct.agent.aa", &s.seal("ct.agent.aa", b"ask 2"))
            .unwrap();
        let reply = s.seal_reply(&request, b"answer");
        assert_eq!(&s.open_reply(&request, &reply).unwrap()[..], b"answer");
        assert_eq!(s.open_reply(&other, &reply), Err(Refused::BadTag));
        // A reply cannot pass for a message on a subject, or the other way round.
        assert!(s.open("ct.agent.aa", &reply).is_err());
    }

    #[test]
    fn a_tag_is_accepted_once_within_the_window_and_forgotten_after() {
        let mut r = Replays::default();
        let now = 1_000_000_000;
        assert!(r.first([1; 32], now));
        assert!(!r.first([1; 32], now + 5));
        assert!(r.first([2; 32], now + 5));
        // Long after, the first is forgotten (and would be refused as stale by then anyway).
        let later = now + 3 * MAX_AGE.as_millis() as u64;
        assert!(r.first([3; 32], later));
        assert_eq!(r.seen.len(), 1);
        assert_eq!(r.order.len(), 1);
    }

    #[test]
    fn what_a_subscription_remembers_is_bounded_however_busy_the_subject() {
        let mut r = Replays::default();
        let now = 1_000_000_000;
        for i in 0..(MAX_REMEMBERED as u32 + 1_000) {
            let mut tag = [0; 32];
            tag[..4].copy_from_slice(&i.to_be_bytes());
            assert!(r.first(tag, now));
        }
        assert!(r.seen.len() <= MAX_REMEMBERED && r.order.len() <= MAX_REMEMBERED);
    }
}
