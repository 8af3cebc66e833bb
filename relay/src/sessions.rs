//! The dashboard's sign-in links and sessions: minting a link, spending it for a session, finding the session
//! a cookie names, and ending sessions, all over the store so they hold on every node of a cluster.
//!
//! A secret (a link's token, a session's cookie) is 32 random bytes from the operating system, written as
//! URL-safe base64 without padding. The store keeps only its SHA-256, so reading the store (a backup, an
//! operator's query) gives nobody a way in; a secret that is not exactly the right shape is refused before the
//! store is asked. Each record also has a public id, random and unrelated to the secret, by which the page
//! names and ends sessions.
//!
//! Everything here is synchronous: the handlers call it on the blocking pool, like any store read. It does
//! not flush: the relay's group commit does, and a flush here would take from it the one report of writes a
//! crash of PostgreSQL lost (see `StoreError::WritesLost`).

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use crate::core::CoreConfig;
use crate::store::{self, Store, WebSessionKind, WebSessionRecord};

/// Where a link with `token` takes its holder: the sign-in page of `--dashboard-url` when the relay sits
/// behind a proxy with a name of its own, else of the first public address. The token is in the fragment,
/// which browsers never send to a server, so it stays out of access logs and `Referer` headers.
pub fn link_url(config: &CoreConfig, token: &str) -> String {
    let base = match &config.dashboard_url {
        Some(url) => url.trim_end_matches('/').to_string(),
        None => format!(
            "https://{}",
            config
                .public_addrs
                .first()
                .map_or("localhost:7443", String::as_str)
        ),
    };
    format!("{base}/dashboard/signin#t={token}")
}

/// How long a sign-in link can be spent: long enough to click it, short enough that one found later in a
/// chat log is dead.
pub const LINK_TTL: Duration = Duration::from_secs(5 * 60);
/// How long a session lasts from sign-in, however busy.
pub const SESSION_TTL: Duration = Duration::from_secs(7 * 24 * 60 * 60);
/// How long a session lasts unused.
pub const IDLE_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// A session's last use is written at most this often: a page polling every few seconds would otherwise
/// write to the store on every request, and idle expiry needs no finer time than this.
pub const TOUCH_EVERY: Duration = Duration::from_secs(60);
/// Longest client label kept, in characters.
pub const MAX_CLIENT_CHARS: usize = 80;
/// Links one person may have outstanding: minting another retires the oldest. Bounds what a person who
/// types `/dashboard` in a loop can make the store keep.
pub const MAX_LINKS_PER_USER: usize = 5;
/// Sessions one person may have: signing in once more ends the least recently used.
pub const MAX_SESSIONS_PER_USER: usize = 20;

/// Random bytes in a secret.
const SECRET_BYTES: usize = 32;
/// Characters of a secret as written (URL-safe base64 of [`SECRET_BYTES`], no padding).
const SECRET_CHARS: usize = 43;
/// Random bytes in a public id.
const ID_BYTES: usize = 16;
/// Longest public id accepted from a request (ids made here are 22 characters).
const MAX_ID_CHARS: usize = 64;

/// A session as the page and the handlers see it.
#[derive(Clone, PartialEq, Eq)]
pub struct Session {
    /// Its public id (not the secret): what the page names it by.
    pub id: String,
    /// Discord user id of who is signed in.
    pub user: String,
    /// The token every state-changing request of this session must carry (hex).
    pub csrf: String,
    pub created_at: u64,
    pub last_seen: u64,
    /// Unix seconds at which it ends however busy it is ([`SESSION_TTL`] after sign-in).
    pub expires_at: u64,
    /// A short label of the browser it was signed in from.
    pub client: String,
}

impl From<&WebSessionRecord> for Session {
    fn from(r: &WebSessionRecord) -> Self {
        Self {
            id: r.id.clone(),
            user: r.user.clone(),
            csrf: r.csrf.clone(),
            created_at: r.created_at,
            last_seen: r.last_seen,
            expires_at: r.expires_at,
            client: r.client.clone(),
        }
    }
}

/// Without the CSRF token, which handlers' logs must not carry.
impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("user", &self.user)
            .field("csrf", &"MASKED")
            .field("created_at", &self.created_at)
            .field("last_seen", &self.last_seen)
            .field("expires_at", &self.expires_at)
            .field("client", &self.client)
            .finish()
    }
}

/// Mints a one-time sign-in token for `user` (the secret goes in the link; only its hash is stored).
pub fn mint_link(store: &dyn Store, user: &str, now: u64) -> store::Result<String> {
    let links: Vec<WebSessionRecord> = store
        .web_sessions_of(user, now)?
        .into_iter()
        .filter(|r| r.kind == WebSessionKind::Link)
        .collect();
    // Oldest first (the store's order): those are the ones to retire.
    for old in links
        .iter()
        .take((links.len() + 1).saturating_sub(MAX_LINKS_PER_USER))
    {
        store.delete_web_session(user, &old.id)?;
    }
    let secret = new_secret();
    store.put_web_session(&WebSessionRecord {
        hash: hash_hex(&secret),
        kind: WebSessionKind::Link,
        id: random_id(),
        user: user.to_string(),
        created_at: now,
        expires_at: now.saturating_add(LINK_TTL.as_secs()),
        last_seen: now,
        idle_secs: None,
        csrf: String::new(),
        client: String::new(),
    })?;
    Ok(secret)
}

/// Spends a link token once: Ok(Some((session, cookie_secret))) on success; Ok(None) for unknown/used/expired.
///
/// `client` is a label of the browser (the caller makes it from the User-Agent); control and bidirectional
/// formatting characters are dropped and it is cut to [`MAX_CLIENT_CHARS`].
///
/// The link is spent before the session is stored: if storing the session fails, the person needs a new
/// link, but no link ever makes two sessions.
pub fn redeem(
    store: &dyn Store,
    token: &str,
    client: &str,
    now: u64,
) -> store::Result<Option<(Session, String)>> {
    let Some(hash) = hash_of(token) else {
        return Ok(None);
    };
    let Some(link) = store.take_web_session(&hash, WebSessionKind::Link, now)? else {
        return Ok(None);
    };
    let mut sessions: Vec<WebSessionRecord> = store
        .web_sessions_of(&link.user, now)?
        .into_iter()
        .filter(|r| r.kind == WebSessionKind::Session)
        .collect();
    sessions.sort_by_key(|r| r.last_seen);
    for old in sessions
        .iter()
        .take((sessions.len() + 1).saturating_sub(MAX_SESSIONS_PER_USER))
    {
        store.delete_web_session(&link.user, &old.id)?;
    }
    let secret = new_secret();
    let rec = WebSessionRecord {
        hash: hash_hex(&secret),
        kind: WebSessionKind::Session,
        id: random_id(),
        user: link.user,
        created_at: now,
        expires_at: now.saturating_add(SESSION_TTL.as_secs()),
        last_seen: now,
        idle_secs: Some(IDLE_TTL.as_secs()),
        csrf: hex::encode(random_bytes::<SECRET_BYTES>()),
        client: client_label(client),
    };
    store.put_web_session(&rec)?;
    Ok(Some((Session::from(&rec), secret)))
}

/// The session a cookie secret names, if live; refreshes last_seen at most once a minute.
pub fn session(store: &dyn Store, secret: &str, now: u64) -> store::Result<Option<Session>> {
    let Some(hash) = hash_of(secret) else {
        return Ok(None);
    };
    let Some(mut rec) = store
        .web_session(&hash, now)?
        .filter(|r| r.kind == WebSessionKind::Session)
    else {
        return Ok(None);
    };
    if now >= rec.last_seen.saturating_add(TOUCH_EVERY.as_secs()) {
        // Ended on another node (or gone idle) since the read: then it is over here too.
        match store.touch_web_session(&hash, now)? {
            Some(touched) => rec = touched,
            None => return Ok(None),
        }
    }
    Ok(Some(Session::from(&rec)))
}

/// `user`'s live sessions, newest first.
pub fn sessions_of(store: &dyn Store, user: &str, now: u64) -> store::Result<Vec<Session>> {
    Ok(store
        .web_sessions_of(user, now)?
        .iter()
        .rev()
        .filter(|r| r.kind == WebSessionKind::Session)
        .map(Session::from)
        .collect())
}

/// Ends `user`'s session with public id `id`; another user's is never ended, whatever its id. Whether there
/// was one.
pub fn end(store: &dyn Store, user: &str, id: &str) -> store::Result<bool> {
    // Ids made here are short: a longer one from a request names nothing, and need not reach the store.
    if id.is_empty() || id.len() > MAX_ID_CHARS {
        return Ok(false);
    }
    store.delete_web_session(user, id)
}

/// Ends every session of `user` (and their unspent sign-in links); how many sessions that ended.
pub fn end_all(store: &dyn Store, user: &str) -> store::Result<usize> {
    end_all_at(store, user, store::now())
}

/// [`end_all`], counting the sessions live at `now`.
pub fn end_all_at(store: &dyn Store, user: &str, now: u64) -> store::Result<usize> {
    store.delete_web_sessions_of(user, now)
}

/// Whether a request's `X-CSRF-Token` header is this session's token, compared in constant time.
pub fn csrf_ok(session: &Session, header: Option<&str>) -> bool {
    match header {
        Some(h) if !session.csrf.is_empty() => h.as_bytes().ct_eq(session.csrf.as_bytes()).into(),
        _ => false,
    }
}

/// What is kept of a browser's label: no control characters (it is shown to people and may be logged), no
/// bidirectional formatting (which could make one label read as another), at most [`MAX_CLIENT_CHARS`]
/// characters, trimmed.
pub fn client_label(raw: &str) -> String {
    let kept: String = raw
        .chars()
        .filter(|c| !c.is_control() && !is_bidi_format(*c))
        .take(MAX_CLIENT_CHARS)
        .collect();
    kept.trim().to_string()
}

fn is_bidi_format(c: char) -> bool {
    matches!(c, '\u{200e}' | '\u{200f}' | '\u{061c}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// A new secret, as it goes into a link or a cookie.
fn new_secret() -> String {
    URL_SAFE_NO_PAD.encode(random_bytes::<SECRET_BYTES>())
}

/// A new public id.
fn random_id() -> String {
    URL_SAFE_NO_PAD.encode(random_bytes::<ID_BYTES>())
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0; N];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b
}

/// The store key of a secret someone presented, or `None` when it is not a secret this module could have
/// made: wrong length, outside the URL-safe alphabet, or not 32 bytes once decoded.
fn hash_of(secret: &str) -> Option<String> {
    if secret.len() != SECRET_CHARS {
        return None;
    }
    let bytes = URL_SAFE_NO_PAD.decode(secret).ok()?;
    (bytes.len() == SECRET_BYTES).then(|| hash_hex(secret))
}

/// Hex SHA-256 of a secret as written.
fn hash_hex(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::sled::SledStore;

    const T0: u64 = 1_800_000_000;

    fn store() -> (tempfile::TempDir, Arc<dyn Store>) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        (dir, store)
    }

    /// A session for `user`, signed in at `now`: the session and its cookie secret.
    fn signed_in(store: &dyn Store, user: &str, now: u64) -> (Session, String) {
        let token = mint_link(store, user, now).unwrap();
        redeem(store, &token, "Firefox on Linux", now)
            .unwrap()
            .expect("a fresh link signs in")
    }

    #[test]
    fn a_link_signs_in_once_and_its_session_is_found_by_the_cookie() {
        let (_dir, store) = store();
        let store = &*store;
        let token = mint_link(store, "42", T0).unwrap();
        assert_eq!(token.len(), SECRET_CHARS);
        assert!(URL_SAFE_NO_PAD.decode(&token).is_ok());
        // Only the hash is stored: the token itself finds nothing.
        assert!(store.web_session(&token, T0).unwrap().is_none());
        assert!(store.web_session(&hash_hex(&token), T0).unwrap().is_some());

        let (s, cookie) = redeem(store, &token, "Firefox on Linux", T0 + 10)
            .unwrap()
            .expect("signed in");
        assert_eq!(s.user, "42");
        assert_eq!(s.client, "Firefox on Linux");
        assert_eq!(s.created_at, T0 + 10);
        assert_eq!(s.expires_at, T0 + 10 + SESSION_TTL.as_secs());
        assert_eq!(s.csrf.len(), 64);
        assert!(s.csrf.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(cookie, token, "the cookie is a new secret, not the link's");
        assert_ne!(s.id, cookie);
        assert!(!cookie.contains(&s.id) && !s.id.contains(&cookie));
        assert!(
            store
                .web_session(&hash_hex(&token), T0 + 10)
                .unwrap()
                .is_none(),
            "the link is gone once spent"
        );

        let found = session(store, &cookie, T0 + 20).unwrap().expect("live");
        assert_eq!(found, s);
        assert_eq!(sessions_of(store, "42", T0 + 20).unwrap(), vec![s]);
    }

    #[test]
    fn a_link_redeemed_twice_signs_in_only_once() {
        let (_dir, store) = store();
        let token = mint_link(&*store, "42", T0).unwrap();
        assert!(redeem(&*store, &token, "a", T0).unwrap().is_some());
        assert!(redeem(&*store, &token, "b", T0).unwrap().is_none());
        assert_eq!(sessions_of(&*store, "42", T0).unwrap().len(), 1);
    }

    #[test]
    fn racing_redeems_of_one_link_make_one_session() {
        let (_dir, store) = store();
        let token = mint_link(&*store, "42", T0).unwrap();
        let start = Arc::new(std::sync::Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (store, token, start) = (store.clone(), token.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    redeem(&*store, &token, "x", T0).unwrap().is_some()
                })
            })
            .collect();
        let won = threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .filter(|w| *w)
            .count();
        assert_eq!(won, 1);
        assert_eq!(sessions_of(&*store, "42", T0).unwrap().len(), 1);
    }

    #[test]
    fn an_expired_link_does_not_sign_in() {
        let (_dir, store) = store();
        let token = mint_link(&*store, "42", T0).unwrap();
        let late = T0 + LINK_TTL.as_secs();
        assert!(redeem(&*store, &token, "x", late).unwrap().is_none());
        assert!(sessions_of(&*store, "42", late).unwrap().is_empty());
        // One second earlier, the same kind of link still works.
        let token = mint_link(&*store, "42", T0).unwrap();
        assert!(redeem(&*store, &token, "x", late - 1).unwrap().is_some());
    }

    #[test]
    fn a_session_ends_after_its_absolute_lifetime_however_busy() {
        let (_dir, store) = store();
        let (_, cookie) = signed_in(&*store, "42", T0);
        let end = T0 + SESSION_TTL.as_secs();
        // Used every hour: never idle, yet over at the end of its lifetime.
        let mut t = T0;
        while t + 3600 < end {
            t += 3600;
            assert!(session(&*store, &cookie, t).unwrap().is_some(), "at {t}");
        }
        assert!(session(&*store, &cookie, end - 1).unwrap().is_some());
        assert!(session(&*store, &cookie, end).unwrap().is_none());
        assert!(sessions_of(&*store, "42", end).unwrap().is_empty());
    }

    #[test]
    fn a_session_unused_for_the_idle_time_ends_and_use_keeps_it() {
        let (_dir, store) = store();
        let (_, cookie) = signed_in(&*store, "42", T0);
        let idle = IDLE_TTL.as_secs();
        let s = session(&*store, &cookie, T0 + idle - 1)
            .unwrap()
            .expect("used just in time");
        assert_eq!(s.last_seen, T0 + idle - 1);
        // That use counts from then on.
        assert!(session(&*store, &cookie, T0 + 2 * idle - 2)
            .unwrap()
            .is_some());
        let (_, other) = signed_in(&*store, "42", T0);
        assert!(
            session(&*store, &other, T0 + idle).unwrap().is_none(),
            "unused for the idle time"
        );
        // And using it after that does not bring it back.
        assert!(session(&*store, &other, T0 + idle + 1).unwrap().is_none());
    }

    #[test]
    fn last_seen_is_written_at_most_once_a_minute() {
        let (_dir, store) = store();
        let (s, cookie) = signed_in(&*store, "42", T0);
        let stored = |store: &dyn Store| {
            store
                .web_session(&hash_hex(&cookie), T0)
                .unwrap()
                .unwrap()
                .last_seen
        };
        assert_eq!(
            session(&*store, &cookie, T0 + 59)
                .unwrap()
                .unwrap()
                .last_seen,
            s.last_seen
        );
        assert_eq!(stored(&*store), T0, "not written within the minute");
        assert_eq!(
            session(&*store, &cookie, T0 + 60)
                .unwrap()
                .unwrap()
                .last_seen,
            T0 + 60
        );
        assert_eq!(stored(&*store), T0 + 60);
    }

    #[test]
    fn an_ended_session_is_over_at_once_and_a_late_request_does_not_revive_it() {
        let (_dir, store) = store();
        let (s, cookie) = signed_in(&*store, "42", T0);
        assert!(end(&*store, "42", &s.id).unwrap());
        // The refresh that a request at this time would write finds nothing to write to.
        assert!(session(&*store, &cookie, T0 + 3600).unwrap().is_none());
        assert!(store.web_session(&hash_hex(&cookie), T0).unwrap().is_none());
    }

    #[test]
    fn tampered_or_malformed_secrets_find_nothing() {
        let (_dir, store) = store();
        let (_, cookie) = signed_in(&*store, "42", T0);
        let mut tampered = cookie.clone().into_bytes();
        tampered[5] = if tampered[5] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).unwrap();
        let long = "A".repeat(1 << 20);
        let padded = format!("{cookie}=");
        let standard_alphabet = cookie.replace('-', "+").replace('_', "/");
        for bad in [
            tampered.as_str(),
            &cookie[1..],
            padded.as_str(),
            "",
            "not a secret",
            long.as_str(),
            "ééééééééééééééééééééé\u{0}",
        ] {
            assert!(session(&*store, bad, T0).unwrap().is_none(), "{bad:.50}");
            assert!(
                redeem(&*store, bad, "x", T0).unwrap().is_none(),
                "{bad:.50}"
            );
        }
        if standard_alphabet != cookie {
            assert!(session(&*store, &standard_alphabet, T0).unwrap().is_none());
        }
        assert!(
            session(&*store, &cookie, T0).unwrap().is_some(),
            "the real one still works"
        );
    }

    #[test]
    fn a_link_is_not_a_session_and_a_session_is_not_a_link() {
        let (_dir, store) = store();
        let token = mint_link(&*store, "42", T0).unwrap();
        assert!(
            session(&*store, &token, T0).unwrap().is_none(),
            "a link is no cookie"
        );
        let (_, cookie) = redeem(&*store, &token, "x", T0).unwrap().unwrap();
        assert!(
            redeem(&*store, &cookie, "x", T0).unwrap().is_none(),
            "a cookie is no link"
        );
        assert!(
            session(&*store, &cookie, T0).unwrap().is_some(),
            "and trying it as one did not spend the session"
        );
    }

    #[test]
    fn people_end_only_their_own_sessions() {
        let (_dir, store) = store();
        let (a1, a1_cookie) = signed_in(&*store, "1", T0);
        let (_a2, a2_cookie) = signed_in(&*store, "1", T0 + 1);
        let (b, b_cookie) = signed_in(&*store, "12", T0 + 2);
        let b_link = mint_link(&*store, "12", T0 + 2).unwrap();

        assert!(!end(&*store, "1", &b.id).unwrap(), "not theirs");
        assert!(!end(&*store, "12", &a1.id).unwrap(), "not theirs");
        assert!(!end(&*store, "1", "").unwrap());
        assert!(!end(&*store, "1", &"x".repeat(10_000)).unwrap());
        assert!(session(&*store, &b_cookie, T0 + 3).unwrap().is_some());
        assert!(session(&*store, &a1_cookie, T0 + 3).unwrap().is_some());

        assert!(end(&*store, "1", &a1.id).unwrap());
        assert!(!end(&*store, "1", &a1.id).unwrap(), "already ended");
        assert!(session(&*store, &a1_cookie, T0 + 3).unwrap().is_none());
        assert!(session(&*store, &a2_cookie, T0 + 3).unwrap().is_some());

        let a_link = mint_link(&*store, "1", T0 + 3).unwrap();
        assert_eq!(
            end_all_at(&*store, "1", T0 + 3).unwrap(),
            1,
            "one session left"
        );
        assert!(session(&*store, &a2_cookie, T0 + 3).unwrap().is_none());
        assert!(
            redeem(&*store, &a_link, "x", T0 + 3).unwrap().is_none(),
            "signing out everywhere also retires unspent links"
        );
        assert!(
            session(&*store, &b_cookie, T0 + 3).unwrap().is_some(),
            "B is untouched"
        );
        assert!(redeem(&*store, &b_link, "x", T0 + 3).unwrap().is_some());
        assert_eq!(sessions_of(&*store, "12", T0 + 3).unwrap().len(), 2);
    }

    #[test]
    fn sessions_are_listed_newest_first_without_links() {
        let (_dir, store) = store();
        let (s1, _) = signed_in(&*store, "42", T0);
        let (s2, _) = signed_in(&*store, "42", T0 + 5);
        mint_link(&*store, "42", T0 + 6).unwrap();
        signed_in(&*store, "7", T0);
        let listed: Vec<String> = sessions_of(&*store, "42", T0 + 6)
            .unwrap()
            .into_iter()
            .map(|s| s.id)
            .collect();
        assert_eq!(listed, [s2.id, s1.id]);
    }

    #[test]
    fn outstanding_links_and_sessions_per_person_are_bounded() {
        let (_dir, store) = store();
        let tokens: Vec<String> = (0..MAX_LINKS_PER_USER as u64 + 2)
            .map(|i| mint_link(&*store, "42", T0 + i).unwrap())
            .collect();
        let now = T0 + 10;
        let links = store
            .web_sessions_of("42", now)
            .unwrap()
            .iter()
            .filter(|r| r.kind == WebSessionKind::Link)
            .count();
        assert_eq!(links, MAX_LINKS_PER_USER);
        assert!(
            redeem(&*store, &tokens[0], "x", now).unwrap().is_none(),
            "the oldest retired"
        );
        assert!(redeem(&*store, &tokens[1], "x", now).unwrap().is_none());
        assert!(redeem(&*store, tokens.last().unwrap(), "x", now)
            .unwrap()
            .is_some());

        let cookies: Vec<String> = (0..MAX_SESSIONS_PER_USER as u64 + 1)
            .map(|i| signed_in(&*store, "7", T0 + i).1)
            .collect();
        let now = T0 + 100;
        assert_eq!(
            sessions_of(&*store, "7", now).unwrap().len(),
            MAX_SESSIONS_PER_USER
        );
        assert!(
            session(&*store, &cookies[0], now).unwrap().is_none(),
            "least recently used ended"
        );
        assert!(session(&*store, &cookies[1], now).unwrap().is_some());
    }

    #[test]
    fn prune_forgets_only_what_ended() {
        let (_dir, store) = store();
        let link = mint_link(&*store, "42", T0).unwrap();
        let (_, cookie) = signed_in(&*store, "42", T0);
        let (_, busy) = signed_in(&*store, "7", T0);
        assert_eq!(store.prune_web_sessions(T0 + 1).unwrap(), 0);
        let idle = IDLE_TTL.as_secs();
        assert!(session(&*store, &busy, T0 + idle - 1).unwrap().is_some());
        // The link and the unused session have ended; the used one has not.
        assert_eq!(store.prune_web_sessions(T0 + idle).unwrap(), 2);
        assert!(store.web_session(&hash_hex(&link), 0).unwrap().is_none());
        assert!(store.web_session(&hash_hex(&cookie), 0).unwrap().is_none());
        assert!(session(&*store, &busy, T0 + idle).unwrap().is_some());
    }

    #[test]
    fn csrf_tokens_must_match_exactly() {
        let (_dir, store) = store();
        let (s, _) = signed_in(&*store, "42", T0);
        assert!(csrf_ok(&s, Some(&s.csrf)));
        assert!(!csrf_ok(&s, None));
        assert!(!csrf_ok(&s, Some("")));
        assert!(!csrf_ok(&s, Some(&s.csrf[..63])));
        assert!(!csrf_ok(&s, Some(&format!("{}0", s.csrf))));
        let (other, _) = signed_in(&*store, "42", T0);
        assert!(!csrf_ok(&s, Some(&other.csrf)), "another session's token");
        let blank = Session {
            csrf: String::new(),
            ..s
        };
        assert!(!csrf_ok(&blank, Some("")), "an empty token never matches");
        assert!(
            !format!("{blank:?}{other:?}").contains(&other.csrf),
            "Debug masks it"
        );
    }

    #[test]
    fn client_labels_are_cleaned_and_cut() {
        assert_eq!(client_label("  Chrome on Linux \n"), "Chrome on Linux");
        assert_eq!(
            client_label("Fire\u{1b}[31mfox\u{202e}xuniL"),
            "Fire[31mfoxxuniL"
        );
        assert_eq!(
            client_label(&"é".repeat(200)).chars().count(),
            MAX_CLIENT_CHARS
        );
        let (_dir, store) = store();
        let token = mint_link(&*store, "42", T0).unwrap();
        let (s, _) = redeem(
            &*store,
            &token,
            &format!("Safari\r\n{}", "x".repeat(500)),
            T0,
        )
        .unwrap()
        .unwrap();
        assert_eq!(s.client.chars().count(), MAX_CLIENT_CHARS);
        assert!(s.client.starts_with("Safarixxx"));
    }
}
