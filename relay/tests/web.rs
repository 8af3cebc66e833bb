//! The web dashboard's API over the relay's real HTTPS port, as a browser (or someone pretending to be one)
//! would call it: signing in with a one-time link, the session cookie, CSRF and same-origin checks, another
//! user's task, bodies and streams too large or too many. The page itself is driven in a real Chromium by
//! `agent/tests/dashboard.rs`.

use std::net::SocketAddr;
use std::time::Duration;

use ct_bot::backend::Backend;
use ct_protocol::task::{FinalState, TaskEvent};
use ct_relay::discord::CoreBackend;
use ct_relay::sessions as auth;
use ct_relay::tasks::Submit;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{event_acked, expect_start, finished, https_connect, TestRelay};

/// What the relay answered.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

/// One request on its own connection, with the headers a same-origin fetch from the page would carry plus
/// `extra`; the body as JSON when given.
async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    extra: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Answer {
    let mut tls = https_connect(addr).await.expect("TLS to the relay");
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: relay\r\nconnection: close\r\n");
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!(
            "content-type: application/json\r\ncontent-length: {}\r\n",
            b.len()
        ));
    }
    head.push_str("\r\n");
    tls.write_all(head.as_bytes()).await.unwrap();
    if let Some(b) = body {
        // A relay that refuses a large body early may close before it is all written.
        let _ = tls.write_all(b).await;
    }
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Answer {
        status,
        head: head.to_string(),
        body,
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A task of user 1's in `project`, submitted as the bot would; its id.
async fn submit(relay: &TestRelay, project: &str, prompt: &str) -> String {
    relay
        .core
        .submit_task(Submit {
            user: "1".into(),
            project: project.into(),
            prompt: prompt.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .spec
        .task
}

/// A signed-in browser: its cookie and CSRF token.
struct Browser {
    addr: SocketAddr,
    cookie: String,
    csrf: String,
    session: String,
}

impl Browser {
    async fn get(&self, path: &str) -> Answer {
        call(self.addr, "GET", path, &[("cookie", &self.cookie)], None).await
    }

    /// A change as the page makes it: cookie, CSRF token, same origin.
    async fn send(&self, method: &str, path: &str, body: Value) -> Answer {
        let body = body.to_string();
        call(
            self.addr,
            method,
            path,
            &[
                ("cookie", &self.cookie),
                ("x-csrf-token", &self.csrf),
                ("origin", "https://relay"),
                ("sec-fetch-site", "same-origin"),
            ],
            Some(body.as_bytes()),
        )
        .await
    }
}

/// The token of a fresh `/dashboard` link for `user`, as the bot would give it.
async fn link_token(relay: &TestRelay, user: &str) -> String {
    let link = CoreBackend::new(relay.core.clone())
        .dashboard_link(user)
        .await
        .unwrap();
    let (base, token) = link
        .url
        .split_once("#t=")
        .expect("the token in the fragment");
    assert!(
        base.starts_with("https://") && base.ends_with("/dashboard/signin"),
        "{}",
        link.url
    );
    assert!(link.expires_in <= 600, "{link:?}");
    token.to_string()
}

async fn spend(addr: SocketAddr, token: &str) -> Answer {
    let body = json!({ "token": token }).to_string();
    call(
        addr,
        "POST",
        "/dashboard/api/signin",
        &[("origin", "https://relay")],
        Some(body.as_bytes()),
    )
    .await
}

async fn sign_in(relay: &TestRelay, user: &str) -> Browser {
    let token = link_token(relay, user).await;
    let signed = spend(relay.addr, &token).await;
    assert_eq!(signed.status, 204, "{signed:?}");
    let set = signed.header("set-cookie").expect("a session cookie");
    let cookie = set.split(';').next().unwrap().to_string();
    let me = call(
        relay.addr,
        "GET",
        "/dashboard/api/me",
        &[("cookie", &cookie)],
        None,
    )
    .await;
    assert_eq!(me.status, 200, "{me:?}");
    let me = me.json();
    assert_eq!(me["user"], user);
    Browser {
        addr: relay.addr,
        cookie,
        csrf: me["csrf"].as_str().unwrap().to_string(),
        session: me["session"].as_str().unwrap().to_string(),
    }
}

#[tokio::test]
async fn a_link_signs_in_once_and_sessions_end_from_the_page_or_from_discord() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(dir.path()).await;
    let token = link_token(&relay, "1").await;

    let signed = spend(relay.addr, &token).await;
    assert_eq!(signed.status, 204, "{signed:?}");
    let set = signed.header("set-cookie").unwrap();
    for part in [
        "__Host-ct_session=",
        "Secure",
        "HttpOnly",
        "SameSite=Strict",
        "Path=/",
    ] {
        assert!(set.contains(part), "{set}");
    }
    // The secret of the link is not the secret of the session.
    assert!(!set.contains(&token), "{set}");

    // Used once: refused with words saying what to do.
    let again = spend(relay.addr, &token).await;
    assert_eq!(again.status, 410, "{again:?}");
    assert!(again.json()["error"]
        .as_str()
        .unwrap()
        .contains("/dashboard"));
    // Made up, and expired.
    assert_eq!(spend(relay.addr, "made-up").await.status, 410);
    let old = relay
        .core
        .read(|store| auth::mint_link(store, "1", ct_relay::store::now() - 3600))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(spend(relay.addr, &old).await.status, 410);

    // Two browsers; the first ends the second's session from the page.
    let cookie = set.split(';').next().unwrap().to_string();
    let me = call(
        relay.addr,
        "GET",
        "/dashboard/api/me",
        &[("cookie", &cookie)],
        None,
    )
    .await
    .json();
    let first = Browser {
        addr: relay.addr,
        cookie,
        csrf: me["csrf"].as_str().unwrap().into(),
        session: me["session"].as_str().unwrap().into(),
    };
    let second = sign_in(&relay, "1").await;
    let listed = first.get("/dashboard/api/sessions").await.json();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(listed
        .iter()
        .any(|s| s["id"] == first.session.as_str() && s["current"] == true));
    let ended = first
        .send(
            "DELETE",
            &format!("/dashboard/api/sessions/{}", second.session),
            json!({}),
        )
        .await;
    assert_eq!(ended.status, 204, "{ended:?}");
    assert_eq!(second.get("/dashboard/api/me").await.status, 401);
    assert_eq!(first.get("/dashboard/api/me").await.status, 200);

    // Someone else cannot end this user's session by its id.
    let stranger = sign_in(&relay, "2").await;
    let tried = stranger
        .send(
            "DELETE",
            &format!("/dashboard/api/sessions/{}", first.session),
            json!({}),
        )
        .await;
    assert_eq!(tried.status, 404, "{tried:?}");
    assert_eq!(first.get("/dashboard/api/me").await.status, 200);

    // `/dashboard signout:all` in Discord ends every session of the user's, and only theirs.
    let third = sign_in(&relay, "1").await;
    let n = CoreBackend::new(relay.core.clone())
        .end_dashboard_sessions("1")
        .await
        .unwrap();
    assert_eq!(n, 2);
    for b in [&first, &third] {
        let me = b.get("/dashboard/api/me").await;
        assert_eq!(me.status, 401, "{me:?}");
        assert!(me.json()["error"].as_str().unwrap().contains("/dashboard"));
    }
    assert_eq!(stranger.get("/dashboard/api/me").await.status, 200);
}

#[tokio::test]
async fn forged_tampered_and_missing_cookies_get_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(dir.path()).await;
    let real = sign_in(&relay, "1").await;
    let secret = real.cookie.split_once('=').unwrap().1.to_string();
    let mut tampered = secret.clone().into_bytes();
    tampered[5] = if tampered[5] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let long = "A".repeat(5000);
    for cookie in [
        None,
        Some(format!("__Host-ct_session={tampered}")),
        Some("__Host-ct_session=".to_string()),
        Some(format!("__Host-ct_session={long}")),
        Some(format!("ct_session={secret}")),
        Some(format!("__Host-ct_session={}", "x".repeat(43))),
    ] {
        let headers: Vec<(&str, &str)> = cookie.iter().map(|c| ("cookie", c.as_str())).collect();
        for path in [
            "/dashboard/api/me",
            "/dashboard/api/tasks",
            "/dashboard/api/agents",
        ] {
            let got = call(relay.addr, "GET", path, &headers, None).await;
            assert_eq!(got.status, 401, "{cookie:?} {path}: {got:?}");
        }
    }
    assert_eq!(real.get("/dashboard/api/me").await.status, 200);
}

#[tokio::test]
async fn changes_need_the_csrf_token_and_the_pages_own_origin() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(dir.path()).await;
    let b = sign_in(&relay, "1").await;
    let body = json!({ "prompt": "hi", "project": "web" }).to_string();
    let forged = [
        vec![("cookie", b.cookie.as_str())],
        vec![("cookie", b.cookie.as_str()), ("x-csrf-token", "0000")],
        vec![
            ("cookie", b.cookie.as_str()),
            ("x-csrf-token", b.csrf.as_str()),
            ("origin", "https://evil.example"),
        ],
        vec![
            ("cookie", b.cookie.as_str()),
            ("x-csrf-token", b.csrf.as_str()),
            ("sec-fetch-site", "cross-site"),
        ],
    ];
    for headers in forged {
        let got = call(
            relay.addr,
            "POST",
            "/dashboard/api/tasks",
            &headers,
            Some(body.as_bytes()),
        )
        .await;
        assert_eq!(got.status, 403, "{headers:?}: {got:?}");
        assert!(got.json()["error"].is_string());
    }
    // Another user's CSRF token does not go with this cookie.
    let other = sign_in(&relay, "2").await;
    let mixed = call(
        relay.addr,
        "POST",
        "/dashboard/api/signout",
        &[("cookie", &b.cookie), ("x-csrf-token", &other.csrf)],
        Some(b"{}"),
    )
    .await;
    assert_eq!(mixed.status, 403, "{mixed:?}");
    // With both, the request reaches the backend, which refuses it for its own reason (no agent).
    let real = b
        .send(
            "POST",
            "/dashboard/api/tasks",
            json!({ "prompt": "hi", "project": "web" }),
        )
        .await;
    assert_eq!(real.status, 400, "{real:?}");
    assert_eq!(b.get("/dashboard/api/me").await.status, 200);
}

#[tokio::test]
async fn another_users_task_is_not_found_and_cannot_be_touched() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(dir.path()).await;
    let (_, mut agent) = crate::support::agent(&relay, "1").await;
    let task = submit(&relay, "web", "secret plans").await;
    assert_eq!(expect_start(&mut agent).await.task, task);
    event_acked(
        &mut agent,
        &task,
        1,
        TaskEvent::Text {
            text: "the secret".into(),
        },
    )
    .await;

    let owner = sign_in(&relay, "1").await;
    let seen = owner.get(&format!("/dashboard/api/tasks/{task}")).await;
    assert_eq!(seen.status, 200, "{seen:?}");
    assert_eq!(seen.json()["events"][0]["event"]["text"], "the secret");
    assert_eq!(seen.json()["can_cancel"], true);

    let stranger = sign_in(&relay, "2").await;
    let made_up = stranger.get("/dashboard/api/tasks/t_doesnotexist").await;
    assert_eq!(made_up.status, 404);
    for got in [
        stranger.get(&format!("/dashboard/api/tasks/{task}")).await,
        stranger
            .get(&format!("/dashboard/api/tasks/{task}/live"))
            .await,
        stranger
            .send(
                "POST",
                &format!("/dashboard/api/tasks/{task}/cancel"),
                json!({}),
            )
            .await,
        stranger
            .send(
                "POST",
                &format!("/dashboard/api/tasks/{task}/reply"),
                json!({ "prompt": "leak it" }),
            )
            .await,
        stranger
            .send(
                "POST",
                &format!("/dashboard/api/tasks/{task}/approvals/a1"),
                json!({ "decision": "allow_once" }),
            )
            .await,
    ] {
        assert_eq!(got.status, 404, "{got:?}");
        assert_eq!(
            got.body, made_up.body,
            "a stranger's task reads as no task at all"
        );
        assert!(!got.body.contains("secret"));
    }
    let listed = stranger.get("/dashboard/api/tasks").await.json();
    assert_eq!(listed["tasks"], json!([]), "{listed}");
    // Still open: the stranger's cancel did nothing.
    let state = owner
        .get(&format!("/dashboard/api/tasks/{task}"))
        .await
        .json();
    assert_eq!(
        state["task"]["state"],
        seen.json()["task"]["state"],
        "{state}"
    );
    assert_eq!(state["open"], true, "{state}");
}

#[tokio::test]
async fn a_huge_message_is_refused_and_the_relay_serves_on() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(dir.path()).await;
    let b = sign_in(&relay, "1").await;
    // 10 MB: refused from its declared length before it is read.
    let huge = json!({ "prompt": "x".repeat(10 * 1024 * 1024) }).to_string();
    let got = call(
        relay.addr,
        "POST",
        "/dashboard/api/tasks/t_x/reply",
        &[
            ("cookie", &b.cookie),
            ("x-csrf-token", &b.csrf),
            ("origin", "https://relay"),
        ],
        Some(huge.as_bytes()),
    )
    .await;
    assert_eq!(got.status, 413, "{:?}", got.head);
    // Within the body limit but over the prompt's: refused with the limit named.
    let long = b
        .send(
            "POST",
            "/dashboard/api/tasks",
            json!({ "prompt": "y".repeat(20_000), "project": "web" }),
        )
        .await;
    assert_eq!(long.status, 413, "{long:?}");
    assert!(long.json()["error"].as_str().unwrap().contains("16000"));
    // Not JSON, wrong shape: a JSON error, not a panic.
    let bad = call(
        relay.addr,
        "POST",
        "/dashboard/api/tasks",
        &[
            ("cookie", &b.cookie),
            ("x-csrf-token", &b.csrf),
            ("origin", "https://relay"),
        ],
        Some(b"{not json"),
    )
    .await;
    assert_eq!(bad.status, 400, "{bad:?}");
    assert!(bad.json()["error"].is_string());
    assert_eq!(b.get("/dashboard/api/me").await.status, 200);
    let health = call(relay.addr, "GET", "/healthz", &[], None).await;
    assert_eq!(health.status, 200);
}

/// Opens a live stream and reads until its headers and `want` are in; the connection stays open.
async fn open_stream(
    addr: SocketAddr,
    cookie: &str,
    path: &str,
    want: &str,
) -> (
    u16,
    String,
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) {
    open_stream_after(addr, cookie, path, None, want).await
}

/// [`open_stream`] as EventSource reconnects: with the last id it saw.
async fn open_stream_after(
    addr: SocketAddr,
    cookie: &str,
    path: &str,
    last_event_id: Option<u64>,
    want: &str,
) -> (
    u16,
    String,
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) {
    let mut tls = https_connect(addr).await.unwrap();
    let resume = last_event_id
        .map(|id| format!("last-event-id: {id}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "GET {path} HTTP/1.1\r\nhost: relay\r\ncookie: {cookie}\r\naccept: text/event-stream\r\n{resume}\r\n"
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    let mut got = String::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            let n = tls.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            got.push_str(&String::from_utf8_lossy(&buf[..n]));
            if got.contains("\r\n\r\n") && got.contains(want) {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .unwrap_or_else(|_| panic!("no {want:?} on {path}: {got:?}"));
    let status = got
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, got, tls)
}

#[tokio::test]
async fn live_events_resume_after_the_last_seen_and_streams_per_session_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(dir.path()).await;
    let (_, mut agent) = crate::support::agent(&relay, "1").await;
    let task = submit(&relay, "web", "go").await;
    assert_eq!(expect_start(&mut agent).await.task, task);
    // A second task, left open for the part about many streams (submitted now, while the test agent is
    // surely connected).
    let open = submit(&relay, "web", "long").await;
    for seq in 1..=3 {
        let text = format!("part {seq}");
        event_acked(&mut agent, &task, seq, TaskEvent::Text { text }).await;
    }
    let b = sign_in(&relay, "1").await;
    let path = format!("/dashboard/api/tasks/{task}/live?after=1");
    let (status, got, mut stream) = open_stream(relay.addr, &b.cookie, &path, "part 3").await;
    assert_eq!(status, 200, "{got}");
    assert!(got.contains("text/event-stream"), "{got}");
    assert!(
        !got.contains("part 1") && got.contains("id: 2") && got.contains("part 2"),
        "{got}"
    );

    // A live event arrives on the open stream, and the stream ends after the task's last.
    event_acked(
        &mut agent,
        &task,
        4,
        TaskEvent::Text {
            text: "part 4".into(),
        },
    )
    .await;
    event_acked(&mut agent, &task, 5, finished(FinalState::Done)).await;
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut rest))
        .await
        .expect("the stream ends after the task finished")
        .ok();
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        rest.contains("part 4") && rest.contains("\"finished\""),
        "{rest}"
    );

    // A reconnect's Last-Event-ID wins over the page's `after`.
    let (_, resumed, _) = open_stream_after(
        relay.addr,
        &b.cookie,
        &format!("/dashboard/api/tasks/{task}/live?after=0"),
        Some(3),
        "finished",
    )
    .await;
    assert!(
        !resumed.contains("part 3") && resumed.contains("part 4"),
        "{resumed}"
    );

    // Streams per session: six stay open (an open task's stream does not end), the seventh is refused, and
    // another session is served all the while.
    let live = format!("/dashboard/api/tasks/{open}/live");
    let mut held = Vec::new();
    for _ in 0..6 {
        let (status, got, s) = open_stream(relay.addr, &b.cookie, &live, "\r\n\r\n").await;
        assert_eq!(status, 200, "{got}");
        held.push(s);
    }
    let seventh = b.get(&live).await;
    assert_eq!(seventh.status, 429, "{seventh:?}");
    assert!(seventh.json()["error"].as_str().unwrap().contains("tabs"));
    let other = sign_in(&relay, "1").await;
    let (status, _, _s) = open_stream(relay.addr, &other.cookie, &live, "\r\n\r\n").await;
    assert_eq!(status, 200);
    // One closed, one more may open.
    drop(held.pop());
    let reopened = async {
        loop {
            let (status, _, s) = open_stream(relay.addr, &b.cookie, &live, "\r\n\r\n").await;
            if status == 200 {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let _s = tokio::time::timeout(Duration::from_secs(10), reopened)
        .await
        .expect("a slot comes back when a stream closes");
}

#[tokio::test]
async fn the_page_is_served_with_a_strict_policy_and_the_api_is_never_cached() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(dir.path()).await;
    for path in ["/dashboard", "/dashboard/", "/dashboard/signin"] {
        let page = call(relay.addr, "GET", path, &[], None).await;
        assert_eq!(page.status, 200, "{path}");
        let csp = page.header("content-security-policy").unwrap();
        assert!(
            csp.contains("default-src 'none'")
                && csp.contains("script-src 'self'")
                && !csp.contains("unsafe")
                && csp.contains("frame-ancestors 'none'"),
            "{csp}"
        );
        assert_eq!(page.header("x-content-type-options").unwrap(), "nosniff");
        assert_eq!(page.header("referrer-policy").unwrap(), "no-referrer");
        // No inline script or style: everything the page runs comes from this origin's files.
        assert!(
            !page.body.contains("<script>") && !page.body.contains("style="),
            "{}",
            page.body
        );
    }
    let js = call(relay.addr, "GET", "/dashboard/app.js", &[], None).await;
    assert!(js
        .header("content-type")
        .unwrap()
        .starts_with("text/javascript"));
    let api = call(relay.addr, "GET", "/dashboard/api/me", &[], None).await;
    assert_eq!(api.status, 401);
    assert_eq!(api.header("cache-control").unwrap(), "no-store");
    let unknown = call(relay.addr, "GET", "/dashboard/api/nothing", &[], None).await;
    assert_eq!(unknown.status, 404);
    assert!(unknown.json()["error"].is_string());
}

#[tokio::test]
async fn guessing_sign_in_tokens_is_slowed_per_address_and_spends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(dir.path()).await;
    let token = link_token(&relay, "1").await;
    let mut statuses = Vec::new();
    for n in 0..11 {
        statuses.push(spend(relay.addr, &format!("guess-{n}")).await.status);
    }
    assert_eq!(statuses[..10], [410; 10]);
    assert_eq!(statuses[10], 429);
    // Refused before the store is asked: the real link is still unspent afterwards (once the budget is back).
    let refused = spend(relay.addr, &token).await;
    assert_eq!(refused.status, 429, "{refused:?}");
    assert!(refused.header("retry-after").is_some());
    let left = relay
        .core
        .read(|store| auth::sessions_of(store, "1", ct_relay::store::now()))
        .await
        .unwrap()
        .unwrap();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test]
async fn the_task_list_filters_by_project_state_and_requester() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(dir.path()).await;
    let (_, mut agent) = crate::support::agent(&relay, "1").await;
    let mut ids = Vec::new();
    for project in ["web", "api"] {
        let id = submit(&relay, project, &format!("work on {project}")).await;
        assert_eq!(expect_start(&mut agent).await.task, id);
        ids.push(id);
    }
    event_acked(&mut agent, &ids[0], 1, finished(FinalState::Done)).await;
    let b = sign_in(&relay, "1").await;
    let listed = |q: &'static str| {
        let b = &b;
        async move {
            let got = b.get(&format!("/dashboard/api/tasks{q}")).await;
            assert_eq!(got.status, 200, "{q}: {got:?}");
            got.json()["tasks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["id"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(listed("").await, [ids[1].clone(), ids[0].clone()]);
    assert_eq!(listed("?project=api").await, [ids[1].clone()]);
    assert_eq!(listed("?state=done").await, [ids[0].clone()]);
    assert_eq!(
        listed("?state=open&project=web").await,
        Vec::<String>::new()
    );
    assert_eq!(listed("?requester=1&page=0").await.len(), 2);
    assert_eq!(listed("?requester=2").await, Vec::<String>::new());
    assert_eq!(listed("?page=1").await, Vec::<String>::new());
    // A filter that is not text on one line is refused with words, not a panic.
    let bad = b.get("/dashboard/api/tasks?agent=a%0Ab").await;
    assert_eq!(bad.status, 400, "{bad:?}");
    let bad = b.get("/dashboard/api/tasks?page=x").await;
    assert_eq!(bad.status, 400, "{bad:?}");
    assert!(
        bad.json()["error"].as_str().unwrap().contains("page"),
        "{bad:?}"
    );
}
