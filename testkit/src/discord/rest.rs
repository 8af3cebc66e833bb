//! The fake REST API: one fallback handler that records every call, applies rate limits, and routes by path
//! segments below `/api/v10` to the endpoints the bot uses. Anything else is recorded and answered 404 with
//! Discord's error body, so a call the simulator does not know shows up in the call log instead of vanishing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::to_bytes;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};

use super::limits::{self, DiscordError};
use super::model::timestamp_now;
use super::state::{path_matches, Bucket, Call, FilePart, SimAttachment, SimChannel, SimMessage};
use super::Shared;

/// Larger than any upload Discord accepts (500 MiB for the biggest boost), so size checks are ours to make.
const MAX_BODY: usize = 64 * 1024 * 1024;

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .fallback(handle)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(shared)
}

/// A parsed request, as the endpoint functions see it.
struct Req {
    method: String,
    path: String,
    auth: Option<String>,
    body: Value,
    files: Vec<FilePart>,
}

type Outcome = Result<(u16, Value), DiscordError>;

async fn handle(State(sh): State<Arc<Shared>>, req: Request) -> Response {
    let at = Instant::now();
    let method = req.method().to_string();
    let full_path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("multipart/form-data"));
    let parsed = if multipart {
        read_multipart(req).await
    } else {
        match to_bytes(req.into_body(), MAX_BODY).await {
            Ok(b) if b.is_empty() => Ok((Value::Null, Vec::new())),
            Ok(b) => serde_json::from_slice(&b)
                .map(|v| (v, Vec::new()))
                .map_err(|e| format!("body is not JSON: {e}")),
            Err(e) => Err(format!("reading the body: {e}")),
        }
    };
    let path = full_path
        .strip_prefix("/api/v10")
        .unwrap_or(&full_path)
        .to_string();
    let (body, files) = match parsed {
        Ok(p) => p,
        Err(e) => (json!({ "_unparsed": e }), Vec::new()),
    };
    let req = Req {
        method,
        path,
        auth,
        body,
        files,
    };

    let (outcome, headers) = {
        let mut st = sh.lock();
        let (limited, headers) = rate_limit(&mut st, &req, at);
        let outcome = match limited {
            Some(err) => Err(err),
            None if req.method == "GET" && full_path.starts_with("/attachments/") => {
                return cdn(&sh, &mut st, &req, query, at);
            }
            None if !full_path.starts_with("/api/v10/") => Err(not_found()),
            None => route(&sh, &mut st, &req, at),
        };
        let (status, response) = match &outcome {
            Ok((s, v)) => (*s, v.clone()),
            Err(e) => (e.status, e.body.clone()),
        };
        let seq = st.calls.len();
        st.calls.push(Call {
            seq,
            at,
            method: req.method.clone(),
            path: req.path.clone(),
            query,
            body: req.body.clone(),
            files: req.files.clone(),
            status,
            response,
        });
        (outcome, headers)
    };
    sh.bump();
    if let Err(e) = &outcome {
        tracing::debug!(method = %req.method, path = %req.path, status = e.status, body = %e.body, "simulated Discord refused a call");
    }

    let (status, body) = match outcome {
        Ok(ok) => ok,
        Err(e) => (e.status, e.body),
    };
    let mut resp = if status == 204 {
        StatusCode::NO_CONTENT.into_response()
    } else {
        (
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            axum::Json(body),
        )
            .into_response()
    };
    resp.headers_mut().extend(headers);
    resp
}

/// Discord's CDN: the bytes of an attachment a test uploaded, by its id (the path's second-to-last
/// segment), with no token needed (CDN URLs are public); recorded in the call log like any other call.
fn cdn(
    sh: &Shared,
    st: &mut super::state::State,
    req: &Req,
    query: Option<String>,
    at: Instant,
) -> Response {
    let segs: Vec<&str> = req.path.trim_matches('/').split('/').collect();
    let bytes = match segs.as_slice() {
        ["attachments", _, id, _] => st.uploads.get(*id).cloned(),
        _ => None,
    };
    let status = if bytes.is_some() { 200 } else { 404 };
    let seq = st.calls.len();
    st.calls.push(Call {
        seq,
        at,
        method: req.method.clone(),
        path: req.path.clone(),
        query,
        body: Value::Null,
        files: Vec::new(),
        status,
        response: json!({ "bytes": bytes.as_ref().map(Vec::len) }),
    });
    sh.bump();
    match bytes {
        Some(b) => (StatusCode::OK, b).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn read_multipart(req: Request) -> Result<(Value, Vec<FilePart>), String> {
    let mut form = Multipart::from_request(req, &())
        .await
        .map_err(|e| format!("bad multipart: {e}"))?;
    let mut body = serde_json::Map::new();
    let mut payload = None;
    let mut files = Vec::new();
    while let Some(field) = form.next_field().await.map_err(|e| e.to_string())? {
        let name = field.name().unwrap_or_default().to_string();
        let filename = field.file_name().map(str::to_string);
        let content_type = field.content_type().map(str::to_string);
        let data = field.bytes().await.map_err(|e| e.to_string())?;
        match filename {
            Some(filename) => files.push(FilePart {
                field: name,
                filename,
                size: data.len(),
                content_type,
            }),
            None if name == "payload_json" => {
                payload = Some(serde_json::from_slice(&data).map_err(|e| e.to_string())?);
            }
            None => {
                body.insert(name, json!(String::from_utf8_lossy(&data)));
            }
        }
    }
    Ok((payload.unwrap_or(Value::Object(body)), files))
}

fn not_found() -> DiscordError {
    DiscordError::new(404, 0, "404: Not Found")
}

fn unknown(what: &str, code: u32) -> DiscordError {
    DiscordError::new(404, code, &format!("Unknown {what}"))
}

/// The bucket a route counts against: method plus path, with message ids folded together the way Discord
/// keys buckets by their "major" parameters (channel, guild, webhook) only.
fn bucket_key(method: &str, path: &str) -> String {
    let mut out = Vec::new();
    let mut prev = "";
    for seg in path.trim_matches('/').split('/') {
        out.push(if prev == "messages" && seg != "@original" {
            ":id"
        } else {
            seg
        });
        prev = seg;
    }
    format!("{method} /{}", out.join("/"))
}

/// Applies a scripted 429 or the bucket's limit; returns the refusal (if any) and the headers to send.
fn rate_limit(
    st: &mut super::state::State,
    req: &Req,
    now: Instant,
) -> (Option<DiscordError>, HeaderMap) {
    let mut headers = HeaderMap::new();
    let mut put = |k: &'static str, v: String| {
        if let Ok(v) = HeaderValue::from_str(&v) {
            headers.insert(k, v);
        }
    };
    let key = bucket_key(&req.method, &req.path);
    put("x-ratelimit-bucket", format!("{:016x}", fnv(&key)));

    let scripted = st.rate_rules.iter_mut().find(|r| {
        r.times > 0
            && r.method.eq_ignore_ascii_case(&req.method)
            && path_matches(&r.pattern, &req.path)
    });
    if let Some(rule) = scripted {
        rule.times -= 1;
        let retry = rule.retry_after.as_secs_f64();
        put("retry-after", retry.ceil().max(1.0).to_string());
        put("x-ratelimit-limit", st.settings.bucket_limit.to_string());
        put("x-ratelimit-remaining", "0".into());
        put("x-ratelimit-reset-after", format!("{retry:.3}"));
        put("x-ratelimit-reset", reset_at(rule.retry_after));
        put(
            "x-ratelimit-scope",
            if rule.global { "global" } else { "user" }.into(),
        );
        if rule.global {
            put("x-ratelimit-global", "true".into());
        }
        let body = json!({
            "message": "You are being rate limited.",
            "retry_after": retry,
            "global": rule.global,
        });
        return (Some(DiscordError { status: 429, body }), headers);
    }

    let (limit, window) = (st.settings.bucket_limit, st.settings.bucket_window);
    let bucket = st.buckets.entry(key).or_insert(Bucket {
        window_start: now,
        used: 0,
    });
    if now.duration_since(bucket.window_start) >= window {
        *bucket = Bucket {
            window_start: now,
            used: 0,
        };
    }
    let reset_after = window.saturating_sub(now.duration_since(bucket.window_start));
    put("x-ratelimit-limit", limit.to_string());
    put(
        "x-ratelimit-reset-after",
        format!("{:.3}", reset_after.as_secs_f64()),
    );
    put("x-ratelimit-reset", reset_at(reset_after));
    if bucket.used >= limit {
        // The caller went past what the headers told it: Discord answers 429 (and counts it as invalid).
        put("x-ratelimit-remaining", "0".into());
        put("x-ratelimit-scope", "user".into());
        put(
            "retry-after",
            reset_after.as_secs_f64().ceil().max(1.0).to_string(),
        );
        let body = json!({
            "message": "You are being rate limited.",
            "retry_after": reset_after.as_secs_f64(),
            "global": false,
        });
        return (Some(DiscordError { status: 429, body }), headers);
    }
    bucket.used += 1;
    put("x-ratelimit-remaining", (limit - bucket.used).to_string());
    (None, headers)
}

fn reset_at(after: Duration) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{:.3}", (now + after).as_secs_f64())
}

/// FNV-1a: a stable, dependency-free stand-in for Discord's opaque bucket hashes.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Pinned messages a channel may hold.
const MAX_PINS: usize = 50;

fn route(sh: &Shared, st: &mut super::state::State, req: &Req, now: Instant) -> Outcome {
    let segs: Vec<&str> = req.path.trim_matches('/').split('/').collect();
    let m = req.method.as_str();
    // Bot-token routes need the token; interaction callbacks and webhooks are authorised by their token.
    let open = matches!(segs.as_slice(), ["interactions", ..] | ["webhooks", ..]);
    if !open && req.auth.as_deref() != Some(&format!("Bot {}", sh.cfg.token)) {
        return Err(DiscordError::new(401, 0, "401: Unauthorized"));
    }
    match (m, segs.as_slice()) {
        ("GET", ["gateway"]) => Ok((200, json!({ "url": sh.gateway_url() }))),
        ("GET", ["gateway", "bot"]) => Ok((
            200,
            json!({
                "url": sh.gateway_url(),
                "shards": 1,
                "session_start_limit": {"total": 1000, "remaining": 999, "reset_after": 86_400_000, "max_concurrency": 1},
            }),
        )),
        ("GET", ["users", "@me"]) => Ok((200, sh.cfg.bot.json())),
        ("GET", ["applications", "@me"] | ["oauth2", "applications", "@me"]) => {
            Ok((200, sh.application_json()))
        }
        (_, ["applications", app, "commands"]) => {
            check_app(sh, app)?;
            commands(sh, &mut st.global_commands, m, &req.body, None)
        }
        (_, ["applications", app, "guilds", guild, "commands"]) => {
            check_app(sh, app)?;
            if *guild != sh.cfg.guild_id {
                return Err(unknown("Guild", 10004));
            }
            let list = st.guild_commands.entry(guild.to_string()).or_default();
            commands(sh, list, m, &req.body, Some(guild))
        }
        ("POST", ["interactions", id, token, "callback"]) => callback(sh, st, id, token, req, now),
        (_, ["webhooks", app, token]) if m == "POST" => {
            check_app(sh, app)?;
            followup(sh, st, token, req, now)
        }
        (_, ["webhooks", app, token, "messages", which]) => {
            check_app(sh, app)?;
            webhook_message(sh, st, token, which, req, now)
        }
        // Someone deletes a channel or thread: it and its messages are gone, and later calls on it get
        // Unknown Channel, as Discord answers them.
        ("DELETE", ["channels", c]) => {
            let ch = st
                .channels
                .remove(*c)
                .ok_or_else(|| unknown("Channel", 10003))?;
            st.messages.remove(*c);
            Ok((200, ch.json()))
        }
        ("GET", ["channels", c]) => st
            .channels
            .get(*c)
            .map(|ch| (200, ch.json()))
            .ok_or_else(|| unknown("Channel", 10003)),
        ("POST", ["channels", c, "messages"]) => {
            if !st.channels.contains_key(*c) {
                return Err(unknown("Channel", 10003));
            }
            limits::check_message(&req.body, req.files.len(), false)?;
            // `enforce_nonce`: a message the bot already created with this nonce is returned, and none is
            // created (Discord checks the past few minutes; the simulator's runs are shorter than that).
            if req.body["enforce_nonce"] == json!(true) {
                if let Some(nonce) = nonce_of(&req.body) {
                    let existing = st.messages.get(*c).and_then(|ms| {
                        ms.iter().find(|m| {
                            m.nonce.as_deref() == Some(nonce.as_str())
                                && m.author.id == sh.cfg.bot.id
                        })
                    });
                    if let Some(m) = existing {
                        return Ok((200, m.json(&sh.cfg.guild_id)));
                    }
                }
            }
            let msg = new_message(sh, c, &req.body, &req.files, sh.cfg.bot.clone());
            let json = msg.json(&sh.cfg.guild_id);
            st.messages.entry(c.to_string()).or_default().push(msg);
            Ok((200, json))
        }
        (_, ["channels", c, "messages", id]) => {
            if !st.channels.contains_key(*c) {
                return Err(unknown("Channel", 10003));
            }
            existing_message(sh, st, c, id, req)
        }
        ("POST", ["channels", c, "messages", id, "threads"]) => {
            let Some(parent) = st.channels.get(*c).cloned() else {
                return Err(unknown("Channel", 10003));
            };
            let Some(msg) = st.message_mut(c, id) else {
                return Err(unknown("Message", 10008));
            };
            if msg.thread_id.is_some() {
                return Err(DiscordError::new(
                    400,
                    160_004,
                    "A thread has already been created for this message",
                ));
            }
            thread_name(&req.body)?;
            // Discord gives a thread started from a message the message's id.
            msg.thread_id = Some(id.to_string());
            let thread = new_thread(sh, &parent, id.to_string(), 11, &req.body);
            let json = thread.json();
            st.channels.insert(thread.id.clone(), thread);
            Ok((201, json))
        }
        // Pinning: the route serenity 0.12 uses, and the one Discord documents now. Discord caps a channel at
        // 50 pinned messages; pinning one already pinned is a no-op.
        (
            "PUT" | "DELETE",
            ["channels", c, "pins", id] | ["channels", c, "messages", "pins", id],
        ) => {
            if !st.channels.contains_key(*c) {
                return Err(unknown("Channel", 10003));
            }
            let pinned = st
                .messages
                .get(*c)
                .map_or(0, |ms| ms.iter().filter(|m| m.pinned).count());
            let Some(msg) = st.message_mut(c, id) else {
                return Err(unknown("Message", 10008));
            };
            if m == "PUT" && !msg.pinned && pinned >= MAX_PINS {
                return Err(DiscordError::new(
                    400,
                    30_003,
                    "Maximum number of pins reached (50)",
                ));
            }
            msg.pinned = m == "PUT";
            Ok((204, Value::Null))
        }
        ("PUT", ["channels", t, "thread-members", _user]) => match st.channels.get(*t) {
            Some(thread) if matches!(thread.kind, 10..=12) => Ok((204, Value::Null)),
            Some(_) => Err(DiscordError::new(
                400,
                50_024,
                "Cannot execute action on this channel type",
            )),
            None => Err(unknown("Channel", 10003)),
        },
        ("POST", ["channels", c, "threads"]) => {
            let Some(parent) = st.channels.get(*c).cloned() else {
                return Err(unknown("Channel", 10003));
            };
            thread_name(&req.body)?;
            let kind = req.body["type"].as_u64().unwrap_or(12) as u8;
            let thread = new_thread(sh, &parent, sh.ids.next(), kind, &req.body);
            let json = thread.json();
            st.channels.insert(thread.id.clone(), thread);
            Ok((201, json))
        }
        _ => Err(not_found()),
    }
}

fn check_app(sh: &Shared, app: &str) -> Result<(), DiscordError> {
    if app == sh.cfg.application_id {
        Ok(())
    } else {
        Err(unknown("Application", 10002))
    }
}

fn thread_name(body: &Value) -> Result<(), DiscordError> {
    let mut e = limits::FormErrors::default();
    let n = body["name"].as_str().map_or(0, |s| s.chars().count());
    if n == 0 || n > 100 {
        e.add(
            "name",
            "BASE_TYPE_BAD_LENGTH",
            "Must be between 1 and 100 in length.",
        );
    }
    e.into_result()
}

fn new_thread(sh: &Shared, parent: &SimChannel, id: String, kind: u8, body: &Value) -> SimChannel {
    SimChannel {
        id,
        kind,
        name: body["name"].as_str().unwrap_or_default().to_string(),
        guild_id: parent.guild_id.clone(),
        parent_id: Some(parent.id.clone()),
        owner_id: Some(sh.cfg.bot.id.clone()),
    }
}

fn commands(
    sh: &Shared,
    list: &mut Vec<Value>,
    method: &str,
    body: &Value,
    guild: Option<&str>,
) -> Outcome {
    let stamp = |cmd: &Value, id: String| {
        let mut c = cmd.clone();
        c["id"] = json!(id);
        c["application_id"] = json!(sh.cfg.application_id);
        c["version"] = json!(sh.ids.next());
        c["type"] = json!(cmd["type"].as_u64().unwrap_or(1));
        c["default_member_permissions"] = cmd
            .get("default_member_permissions")
            .cloned()
            .unwrap_or(Value::Null);
        c["nsfw"] = json!(cmd["nsfw"].as_bool().unwrap_or(false));
        if let Some(g) = guild {
            c["guild_id"] = json!(g);
        }
        c
    };
    match method {
        "GET" => Ok((200, json!(list))),
        "PUT" => {
            limits::check_commands(body)?;
            // Bulk overwrite keeps the ids of commands that keep their name, as Discord does.
            let old = std::mem::take(list);
            for cmd in body.as_array().into_iter().flatten() {
                let id = old
                    .iter()
                    .find(|o| o["name"] == cmd["name"])
                    .and_then(|o| o["id"].as_str())
                    .map_or_else(|| sh.ids.next(), str::to_string);
                list.push(stamp(cmd, id));
            }
            Ok((200, json!(list)))
        }
        "POST" => {
            limits::check_command(body)?;
            let existing = list.iter().position(|o| o["name"] == body["name"]);
            let id = existing
                .and_then(|i| list[i]["id"].as_str().map(str::to_string))
                .unwrap_or_else(|| sh.ids.next());
            let cmd = stamp(body, id);
            match existing {
                Some(i) => list[i] = cmd.clone(),
                None => list.push(cmd.clone()),
            }
            Ok((if existing.is_some() { 200 } else { 201 }, cmd))
        }
        _ => Err(DiscordError::new(405, 0, "405: Method Not Allowed")),
    }
}

/// A new message from `author` in `channel`, from a create body (JSON or `payload_json`) and its files.
fn new_message(
    sh: &Shared,
    channel: &str,
    body: &Value,
    files: &[FilePart],
    author: super::model::SimUser,
) -> SimMessage {
    let mut msg = SimMessage {
        id: sh.ids.next(),
        channel_id: channel.to_string(),
        author,
        content: String::new(),
        embeds: json!([]),
        components: json!([]),
        attachments: Vec::new(),
        flags: 0,
        edits: 0,
        interaction_id: None,
        webhook_id: None,
        timestamp: timestamp_now(),
        edited_timestamp: None,
        thread_id: None,
        nonce: nonce_of(body),
        pinned: false,
    };
    apply_edit(sh, &mut msg, body, files);
    msg
}

/// A create body's `nonce`, string or number, as a string.
fn nonce_of(body: &Value) -> Option<String> {
    match &body["nonce"] {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Applies the fields present in `body`; absent fields keep their value, as PATCH does on Discord.
fn apply_edit(sh: &Shared, msg: &mut SimMessage, body: &Value, files: &[FilePart]) {
    if let Some(c) = body.get("content") {
        msg.content = c.as_str().unwrap_or_default().to_string();
    }
    for (k, slot) in [
        ("embeds", &mut msg.embeds),
        ("components", &mut msg.components),
    ] {
        if let Some(v) = body.get(k) {
            *slot = if v.is_null() { json!([]) } else { v.clone() };
        }
    }
    if let Some(f) = body["flags"].as_u64() {
        // Only ephemeral (64) and suppress-embeds (4) can be set by a bot; loading (128) is Discord's own.
        msg.flags = (msg.flags & 128) | (f & (64 | 4));
    }
    // `attachments` in an edit lists the existing ones to keep (by id); new files are added.
    if let Some(keep) = body.get("attachments").and_then(Value::as_array) {
        let keep_ids: Vec<&str> = keep.iter().filter_map(|a| a["id"].as_str()).collect();
        msg.attachments
            .retain(|a| keep_ids.contains(&a.id.as_str()));
    }
    for f in files {
        msg.attachments.push(SimAttachment {
            id: sh.ids.next(),
            filename: f.filename.clone(),
            size: f.size,
        });
    }
}

fn existing_message(
    sh: &Shared,
    st: &mut super::state::State,
    channel: &str,
    id: &str,
    req: &Req,
) -> Outcome {
    let guild = sh.cfg.guild_id.clone();
    match req.method.as_str() {
        "GET" => st
            .message_mut(channel, id)
            .map(|m| (200, m.json(&guild)))
            .ok_or_else(|| unknown("Message", 10008)),
        "PATCH" => {
            let bot_id = sh.cfg.bot.id.clone();
            let msg = st
                .message_mut(channel, id)
                .ok_or_else(|| unknown("Message", 10008))?;
            if msg.author.id != bot_id {
                return Err(DiscordError::new(
                    403,
                    50005,
                    "Cannot edit a message authored by another user",
                ));
            }
            edit(sh, msg, req)
        }
        "DELETE" => {
            let list = st
                .messages
                .get_mut(channel)
                .ok_or_else(|| unknown("Message", 10008))?;
            let before = list.len();
            list.retain(|m| m.id != id);
            if list.len() == before {
                return Err(unknown("Message", 10008));
            }
            Ok((204, Value::Null))
        }
        _ => Err(DiscordError::new(405, 0, "405: Method Not Allowed")),
    }
}

fn edit(sh: &Shared, msg: &mut SimMessage, req: &Req) -> Outcome {
    limits::check_message(&req.body, req.files.len(), true)?;
    let mut edited = msg.clone();
    apply_edit(sh, &mut edited, &req.body, &req.files);
    // The message as it would stand must still be a valid message.
    let whole = json!({"content": edited.content, "embeds": edited.embeds, "components": edited.components});
    limits::check_message(&whole, edited.attachments.len(), false)?;
    edited.flags &= !128;
    edited.edits += 1;
    edited.edited_timestamp = Some(timestamp_now());
    *msg = edited;
    Ok((200, msg.json(&sh.cfg.guild_id)))
}

/// An interaction's initial response given as the HTTP reply to Discord's POST (HTTP-interactions mode),
/// taken as Discord takes it: the same as a callback, so a deferral leaves a "thinking…" placeholder that
/// `@original` edits replace. Returns Discord's refusal, if it would refuse the response.
pub(crate) fn http_reply(sh: &Shared, id: &str, body: &Value) -> Result<(), DiscordError> {
    let mut st = sh.lock();
    let Some(token) = st.interactions.get(id).map(|ix| ix.token.clone()) else {
        return Err(unknown("interaction", 10062));
    };
    let req = Req {
        method: "POST".into(),
        path: format!("/interactions/{id}/{token}/callback"),
        auth: None,
        body: body.clone(),
        files: Vec::new(),
    };
    callback(sh, &mut st, id, &token, &req, Instant::now()).map(|_| ())
}

fn callback(
    sh: &Shared,
    st: &mut super::state::State,
    id: &str,
    token: &str,
    req: &Req,
    now: Instant,
) -> Outcome {
    let deadline = st.settings.interaction_deadline;
    let Some(ix) = st.interactions.get(id).cloned() else {
        return Err(unknown("interaction", 10062));
    };
    if ix.token != token {
        return Err(unknown("interaction", 10062));
    }
    if ix.response_type.is_some() {
        return Err(DiscordError::new(
            400,
            40060,
            "Interaction has already been acknowledged.",
        ));
    }
    // Past the initial-response deadline the token no longer works for a callback: Discord says unknown.
    if now.duration_since(ix.dispatched_at) > deadline {
        return Err(unknown("interaction", 10062));
    }
    let kind = req.body["type"].as_u64().unwrap_or(0) as u8;
    let data = &req.body["data"];
    let allowed = match kind {
        4 | 5 => matches!(ix.kind, 2 | 3 | 5),
        6 | 7 => matches!(ix.kind, 3 | 5) && ix.message_id.is_some(),
        8 => ix.kind == 4,
        9 => matches!(ix.kind, 2 | 3),
        _ => false,
    };
    if !allowed {
        let mut e = limits::FormErrors::default();
        e.add(
            "type",
            "INTERACTION_RESPONSE_TYPE_INVALID",
            format!(
                "Response type {kind} is not valid for interaction type {}",
                ix.kind
            ),
        );
        return e.into_result().map(|()| (204, Value::Null));
    }
    let channel = ix.origin.channel_id.clone();
    let mut original = None;
    match kind {
        4 => {
            limits::check_message(data, req.files.len(), false)?;
            let mut msg = new_message(sh, &channel, data, &req.files, sh.cfg.bot.clone());
            msg.interaction_id = Some(ix.id.clone());
            msg.webhook_id = Some(sh.cfg.application_id.clone());
            original = Some(msg.id.clone());
            st.messages.entry(channel).or_default().push(msg);
        }
        5 => {
            // The "thinking..." placeholder; @original edits replace it.
            let mut msg = new_message(sh, &channel, &json!({}), &[], sh.cfg.bot.clone());
            msg.flags = 128 | (data["flags"].as_u64().unwrap_or(0) & 64);
            msg.interaction_id = Some(ix.id.clone());
            msg.webhook_id = Some(sh.cfg.application_id.clone());
            original = Some(msg.id.clone());
            st.messages.entry(channel).or_default().push(msg);
        }
        6 => original = ix.message_id.clone(),
        7 => {
            let mid = ix.message_id.clone().unwrap_or_default();
            let fake = Req {
                method: "PATCH".into(),
                path: String::new(),
                auth: None,
                body: data.clone(),
                files: req.files.clone(),
            };
            let msg = st
                .message_mut(&channel, &mid)
                .ok_or_else(|| unknown("Message", 10008))?;
            edit(sh, msg, &fake)?;
            original = Some(mid);
        }
        8 => limits::check_autocomplete(data)?,
        9 => limits::check_modal(data)?,
        _ => {}
    }
    if let Some(ix) = st.interactions.get_mut(id) {
        ix.response_type = Some(kind);
        ix.original_message = original;
    }
    Ok((204, Value::Null))
}

/// Looks up the interaction behind a webhook token and checks the token is still usable.
fn webhook_interaction(
    st: &super::state::State,
    token: &str,
    now: Instant,
) -> Result<super::state::SimInteraction, DiscordError> {
    let ix = st
        .interaction_by_token(token)
        .cloned()
        .ok_or_else(|| unknown("Webhook", 10015))?;
    if now.duration_since(ix.dispatched_at) > st.settings.token_ttl {
        return Err(DiscordError::new(401, 50027, "Invalid Webhook Token"));
    }
    if ix.response_type.is_none() {
        // Nothing to follow up on before the interaction is acknowledged.
        return Err(unknown("Webhook", 10015));
    }
    Ok(ix)
}

fn followup(
    sh: &Shared,
    st: &mut super::state::State,
    token: &str,
    req: &Req,
    now: Instant,
) -> Outcome {
    let ix = webhook_interaction(st, token, now)?;
    limits::check_message(&req.body, req.files.len(), false)?;
    let channel = ix.origin.channel_id.clone();
    let mut msg = new_message(sh, &channel, &req.body, &req.files, sh.cfg.bot.clone());
    msg.interaction_id = Some(ix.id.clone());
    msg.webhook_id = Some(sh.cfg.application_id.clone());
    let json = msg.json(&sh.cfg.guild_id);
    if let Some(i) = st.interactions.get_mut(&ix.id) {
        i.followups.push(msg.id.clone());
    }
    st.messages.entry(channel).or_default().push(msg);
    Ok((200, json))
}

fn webhook_message(
    sh: &Shared,
    st: &mut super::state::State,
    token: &str,
    which: &str,
    req: &Req,
    now: Instant,
) -> Outcome {
    let ix = webhook_interaction(st, token, now)?;
    let id = if which == "@original" {
        ix.original_message
            .clone()
            .ok_or_else(|| unknown("Message", 10008))?
    } else if ix.followups.iter().any(|f| f == which)
        || ix.original_message.as_deref() == Some(which)
    {
        which.to_string()
    } else {
        return Err(unknown("Message", 10008));
    };
    let channel = st
        .find_message(&id)
        .map(|m| m.channel_id.clone())
        .ok_or_else(|| unknown("Message", 10008))?;
    match req.method.as_str() {
        "PATCH" => {
            let msg = st
                .message_mut(&channel, &id)
                .ok_or_else(|| unknown("Message", 10008))?;
            edit(sh, msg, req)
        }
        _ => existing_message(sh, st, &channel, &id, req),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_fold_message_ids_but_keep_channels() {
        assert_eq!(
            bucket_key("PATCH", "/channels/1/messages/2"),
            bucket_key("PATCH", "/channels/1/messages/3")
        );
        assert_ne!(
            bucket_key("PATCH", "/channels/1/messages/2"),
            bucket_key("PATCH", "/channels/9/messages/2")
        );
        assert_ne!(
            bucket_key("GET", "/channels/1"),
            bucket_key("PATCH", "/channels/1")
        );
    }
}
