//! The dashboard's JSON API: each handler is one [`Backend`](ct_bot::backend::Backend) call (or a few) made as
//! the signed-in user, so the bot's permission checks are the dashboard's too. Handlers only translate:
//! request JSON to the backend's terms, its answers and refusals to JSON.

use std::collections::BTreeMap;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ct_bot::backend::{HistoryQuery, ShareLevel, TaskInfo, TaskRequest};
use ct_protocol::task::{Decision, TaskEvent, TaskOptions};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::guard::{self, backend_err, ApiError, Signed};
use super::Web;
use crate::sessions as auth;
use crate::store::now;

/// Tasks per page of the task list.
const PAGE: usize = 20;
/// The longest prompt or follow-up taken, as in Discord's modal (a 10 MB message is refused, not stored).
pub const MAX_PROMPT_CHARS: usize = 16_000;
/// The longest reason given with a denial.
const MAX_REASON_CHARS: usize = 1_000;
/// Days of the user's own tasks `/usage` adds up, and at most how many tasks it reads.
const USAGE_DAYS: u64 = 30;
const USAGE_TASKS: usize = 200;

type ApiResult<T = Response> = Result<T, ApiError>;

/// A JSON body whose every rejection (not JSON, wrong shape, too large) is an [`ApiError`] in JSON with words
/// for the person, rather than axum's plain-text default.
#[derive(Debug)]
pub struct Body<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Self(v)),
            Err(JsonRejection::BytesRejection(_)) => Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "That is too large to send: shorten it and try again.",
            )),
            Err(e) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("The request could not be read: {}", e.body_text()),
            )),
        }
    }
}

/// Query parameters whose rejection is an [`ApiError`] in JSON, like [`Body`]'s.
#[derive(Debug)]
pub struct Params<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> axum::extract::FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(v)| Self(v))
            .map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("The address could not be read: {}", e.body_text()),
                )
            })
    }
}

/// A task as the page shows it.
#[derive(Debug, Serialize)]
pub struct TaskJson {
    id: String,
    project: String,
    agent: String,
    requester: String,
    owner: String,
    state: String,
    created_at: u64,
    model: Option<String>,
    mode: Option<String>,
    prompt: String,
    follows: Option<String>,
    session_id: Option<String>,
}

impl From<TaskInfo> for TaskJson {
    fn from(t: TaskInfo) -> Self {
        Self {
            id: t.id,
            project: t.project,
            agent: t.agent,
            requester: t.requester,
            owner: t.owner,
            state: t.state,
            created_at: t.created_at,
            model: t.model,
            mode: t.mode,
            prompt: t.prompt,
            follows: t.follows,
            session_id: t.session_id,
        }
    }
}

fn is_open(state: &str) -> bool {
    matches!(state, "queued" | "running" | "waiting_approval")
}

/// A task the user may not see, and one that does not exist, answer alike: the id tells a stranger nothing.
fn no_such_task() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "There is no task with that id that you can see.",
    )
}

/// The task `id` as `user` may see it, or 404.
async fn visible(web: &Web, user: &str, id: &str) -> ApiResult<TaskInfo> {
    match web.backend().task(user, id).await {
        Ok(t) => Ok(t),
        Err(ct_bot::backend::BackendError::Refused(_)) => Err(no_such_task()),
        Err(e) => Err(backend_err(e)),
    }
}

/// A prompt or message: not blank, within [`MAX_PROMPT_CHARS`].
fn prompt(text: &str) -> ApiResult<String> {
    let text = text.trim();
    if text.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "Write what Claude should do first.",
        ));
    }
    let chars = text.chars().count();
    if chars > MAX_PROMPT_CHARS {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "That message is {chars} characters; the limit is {MAX_PROMPT_CHARS}. Put long material in a \
                 file in the project and point Claude at it."
            ),
        ));
    }
    Ok(text.to_string())
}

/// An optional short text field: trimmed, blank is none, at most `max` characters.
fn short(field: &str, value: Option<String>, max: usize) -> ApiResult<Option<String>> {
    let Some(v) = value
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
    else {
        return Ok(None);
    };
    if v.chars().count() > max || v.chars().any(char::is_control) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("The {field} is not valid: at most {max} characters, on one line."),
        ));
    }
    Ok(Some(v))
}

/// A Discord user id as typed: digits only.
fn user_id(field: &str, value: &str) -> ApiResult<String> {
    let v = value.trim();
    if v.is_empty() || v.len() > 20 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "The {field} must be a Discord user id (digits; in Discord: Developer Mode, then right-click \
                 the person → Copy User ID)."
            ),
        ));
    }
    Ok(v.to_string())
}

fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

// ----- signing in and out -----

#[derive(Debug, Deserialize)]
pub struct SigninBody {
    token: String,
}

/// Spends a one-time link for a session cookie.
pub async fn signin(
    State(web): State<Web>,
    peer: Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
    headers: HeaderMap,
    Body(body): Body<SigninBody>,
) -> ApiResult {
    guard::same_origin(&headers, web.inner.core.config().dashboard_url.as_deref())?;
    guard::signin_allowed(&web, peer.map(|p| p.0 .0.ip()))?;
    let token = body.token.trim().to_string();
    let unusable = || {
        ApiError::new(
            StatusCode::GONE,
            "This sign-in link was already used or has expired: type /dashboard in Discord for a new one.",
        )
    };
    if token.is_empty() || token.len() > 128 {
        return Err(unusable());
    }
    let client = guard::browser_name(&headers);
    let redeemed = web
        .inner
        .core
        .read(move |store| auth::redeem(store, &token, &client, now()))
        .await??;
    let (session, secret) = redeemed.ok_or_else(unusable)?;
    tracing::info!(user = %session.user, session = %session.id, "signed in to the dashboard");
    let max_age = session.expires_at.saturating_sub(now());
    Ok((
        StatusCode::NO_CONTENT,
        [(header::SET_COOKIE, guard::set_cookie(&secret, max_age))],
    )
        .into_response())
}

/// Who is signed in, and the CSRF token the page sends back on every change.
pub async fn me(Signed(s): Signed) -> Json<Value> {
    Json(json!({
        "user": s.user,
        "csrf": s.csrf,
        "session": s.id,
        "expires_at": s.expires_at,
    }))
}

/// Ends this session.
pub async fn signout(State(web): State<Web>, Signed(s): Signed) -> ApiResult {
    web.inner
        .core
        .read(move |store| auth::end(store, &s.user, &s.id))
        .await??;
    Ok((
        StatusCode::NO_CONTENT,
        [(header::SET_COOKIE, guard::clear_cookie())],
    )
        .into_response())
}

/// The user's sessions, this one marked.
pub async fn sessions(State(web): State<Web>, Signed(s): Signed) -> ApiResult<Json<Value>> {
    let user = s.user.clone();
    let all = web
        .inner
        .core
        .read(move |store| auth::sessions_of(store, &user, now()))
        .await??;
    Ok(Json(Value::Array(
        all.into_iter()
            .map(|o| {
                json!({
                    "current": o.id == s.id,
                    "id": o.id,
                    "created_at": o.created_at,
                    "last_seen": o.last_seen,
                    "expires_at": o.expires_at,
                    "client": o.client,
                })
            })
            .collect(),
    )))
}

/// Ends one of the user's sessions (another browser, or this one).
pub async fn end_session(
    State(web): State<Web>,
    Signed(s): Signed,
    Path(id): Path<String>,
) -> ApiResult {
    let (user, current) = (s.user.clone(), id == s.id);
    let ended = web
        .inner
        .core
        .read(move |store| auth::end(store, &user, &id))
        .await??;
    if !ended {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "There is no such session of yours: it may have ended already.",
        ));
    }
    Ok(if current {
        (
            StatusCode::NO_CONTENT,
            [(header::SET_COOKIE, guard::clear_cookie())],
        )
            .into_response()
    } else {
        no_content()
    })
}

/// Ends every session of the user's, this one included.
pub async fn end_all(State(web): State<Web>, Signed(s): Signed) -> ApiResult {
    let ended = web
        .inner
        .core
        .read(move |store| auth::end_all(store, &s.user))
        .await??;
    Ok((
        [(header::SET_COOKIE, guard::clear_cookie())],
        Json(json!({ "ended": ended })),
    )
        .into_response())
}

// ----- agents and projects -----

/// The user's agents (and those shared with them), with their projects.
pub async fn agents(State(web): State<Web>, Signed(s): Signed) -> ApiResult<Json<Value>> {
    let backend = web.backend();
    let agents = backend.agents(&s.user).await.map_err(backend_err)?;
    let projects = backend.projects(&s.user).await.map_err(backend_err)?;
    let default = backend.default_agent(&s.user).await.map_err(backend_err)?;
    let mut by_agent: BTreeMap<(String, String), Vec<Value>> = BTreeMap::new();
    for p in projects {
        by_agent
            .entry((p.owner, p.agent))
            .or_default()
            .push(json!({ "name": p.name, "path": p.path }));
    }
    let mut out: Vec<Value> = agents
        .into_iter()
        .map(|a| {
            let mine = a.owner == s.user;
            let projects = by_agent
                .remove(&(a.owner.clone(), a.name.clone()))
                .unwrap_or_default();
            json!({
                "default": mine && default.as_deref() == Some(a.name.as_str()),
                "name": a.name,
                "fingerprint": a.fingerprint,
                "owner": a.owner,
                "online": a.online,
                "since": a.since,
                "transport": a.transport,
                "version": a.version,
                "mine": mine,
                "projects": projects,
            })
        })
        .collect();
    // In cluster mode, the pool worker holding the user's workspace, with the projects in it.
    let mode = backend.mode(&s.user).await.map_err(backend_err)?;
    if let (Some(pool), Some(worker)) = (mode.pool, mode.worker) {
        let projects = by_agent
            .remove(&(s.user.clone(), worker.clone()))
            .unwrap_or_default();
        out.push(json!({
            "default": false,
            "name": worker,
            "owner": format!("pool {pool}"),
            "online": mode.worker_online,
            "mine": false,
            "pool": pool,
            "projects": projects,
        }));
    }
    Ok(Json(Value::Array(out)))
}

/// Where the user may start tasks: their own projects and those shared with them.
pub async fn projects(State(web): State<Web>, Signed(s): Signed) -> ApiResult<Json<Value>> {
    let projects = web.backend().projects(&s.user).await.map_err(backend_err)?;
    Ok(Json(Value::Array(
        projects
            .into_iter()
            .map(|p| json!({ "name": p.name, "path": p.path, "agent": p.agent, "owner": p.owner }))
            .collect(),
    )))
}

// ----- tasks -----

#[derive(Debug, Deserialize)]
pub struct TaskFilter {
    agent: Option<String>,
    project: Option<String>,
    state: Option<String>,
    requester: Option<String>,
    #[serde(default)]
    page: usize,
}

/// One page of the user's tasks and those run on their agents, newest first.
pub async fn tasks(
    State(web): State<Web>,
    Signed(s): Signed,
    Params(f): Params<TaskFilter>,
) -> ApiResult<Json<Value>> {
    let query = HistoryQuery {
        agent: short("agent", f.agent, 100)?,
        state: short("state", f.state, 40)?,
        project: short("project", f.project, 100)?,
        requester: short("requester", f.requester, 40)?,
        skip: f.page.min(10_000).saturating_mul(PAGE),
        take: PAGE,
    };
    let page = web
        .backend()
        .history(&s.user, &query)
        .await
        .map_err(backend_err)?;
    let tasks: Vec<TaskJson> = page.entries.into_iter().map(|e| e.task.into()).collect();
    Ok(Json(json!({ "tasks": tasks, "more": page.more })))
}

/// A task with everything it did so far, and what the user may do with it.
pub async fn task(
    State(web): State<Web>,
    Signed(s): Signed,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let (info, events) = match web.backend().task_events(&s.user, &id).await {
        Ok(found) => found,
        Err(ct_bot::backend::BackendError::Refused(_)) => return Err(no_such_task()),
        Err(e) => return Err(backend_err(e)),
    };
    let open = is_open(&info.state);
    let approver = if open {
        web.backend().approver(&info.id).await.ok()
    } else {
        None
    };
    let can_cancel = open && (info.requester == s.user || info.owner == s.user);
    let events: Vec<Value> = events
        .into_iter()
        .map(|(seq, event)| json!({ "seq": seq, "event": event }))
        .collect();
    Ok(Json(json!({
        "can_approve": approver.as_deref() == Some(s.user.as_str()),
        "approver": approver,
        "can_cancel": can_cancel,
        "open": open,
        "task": TaskJson::from(info),
        "events": events,
    })))
}

#[derive(Debug, Deserialize)]
pub struct NewTask {
    prompt: String,
    project: Option<String>,
    agent: Option<String>,
    target: Option<String>,
    model: Option<String>,
    mode: Option<String>,
}

/// Starts a task, as `/task` does.
pub async fn start_task(
    State(web): State<Web>,
    Signed(s): Signed,
    Body(body): Body<NewTask>,
) -> ApiResult {
    let mode = short("mode", body.mode, 40)?;
    if let Some(m) = &mode {
        if !matches!(
            m.as_str(),
            "default" | "acceptEdits" | "plan" | "bypassPermissions"
        ) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "The mode must be one of default, acceptEdits, plan or bypassPermissions.",
            ));
        }
    }
    let target = match body.target.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(t) if t == s.user => None,
        Some(t) => Some(user_id("target", t)?),
    };
    let req = TaskRequest {
        user: s.user.clone(),
        prompt: prompt(&body.prompt)?,
        project: short("project", body.project, 200)?,
        target,
        agent: short("agent", body.agent, 100)?,
        options: TaskOptions {
            model: short("model", body.model, 100)?,
            permission_mode: mode,
            ..TaskOptions::default()
        },
        resume: None,
        name: None,
        // The page knows no guild: a pool open only to a role is refused here with words saying so.
        roles: Vec::new(),
    };
    let task = web.backend().submit(req).await.map_err(backend_err)?;
    tracing::info!(user = %s.user, task = %task.id, "task started from the dashboard");
    Ok((StatusCode::CREATED, Json(TaskJson::from(task))).into_response())
}

#[derive(Debug, Deserialize)]
pub struct Message {
    prompt: String,
}

/// A follow-up message: the running task takes it, or a finished one is continued by a new task.
pub async fn reply(
    State(web): State<Web>,
    Signed(s): Signed,
    Path(id): Path<String>,
    Body(body): Body<Message>,
) -> ApiResult<Json<TaskJson>> {
    let text = prompt(&body.prompt)?;
    visible(&web, &s.user, &id).await?;
    let task = web
        .backend()
        .reply(&s.user, &id, &text)
        .await
        .map_err(backend_err)?;
    Ok(Json(task.into()))
}

/// Stops a task.
pub async fn cancel(
    State(web): State<Web>,
    Signed(s): Signed,
    Path(id): Path<String>,
) -> ApiResult {
    visible(&web, &s.user, &id).await?;
    web.backend()
        .cancel(&s.user, &id)
        .await
        .map_err(backend_err)?;
    Ok(no_content())
}

#[derive(Debug, Deserialize)]
pub struct DecisionBody {
    decision: String,
    reason: Option<String>,
    /// For `answers`: each AskUserQuestion question's text and the answer chosen.
    answers: Option<serde_json::Map<String, Value>>,
}

/// Most questions one AskUserQuestion carries, and the longest question or answer taken, in characters.
const MAX_ANSWERS: usize = 20;
const MAX_ANSWER_CHARS: usize = 2_000;

/// Answers to an AskUserQuestion: a few questions, each answered with text.
fn answers(given: Option<serde_json::Map<String, Value>>) -> ApiResult<Value> {
    let bad = |why: &str| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("The answers are not valid: {why}."),
        )
    };
    let given = given.ok_or_else(|| bad("there are none"))?;
    if given.is_empty() || given.len() > MAX_ANSWERS {
        return Err(bad("give one answer for each question, at most 20"));
    }
    for (question, answer) in &given {
        let text = answer.as_str().ok_or_else(|| bad("each answer is text"))?;
        if question.chars().count() > MAX_ANSWER_CHARS || text.chars().count() > MAX_ANSWER_CHARS {
            return Err(bad("a question or an answer is too long"));
        }
    }
    Ok(Value::Object(given))
}

/// Answers an approval.
pub async fn decide(
    State(web): State<Web>,
    Signed(s): Signed,
    Path((id, approval)): Path<(String, String)>,
    Body(body): Body<DecisionBody>,
) -> ApiResult {
    let decision = match body.decision.as_str() {
        "allow_once" => Decision::AllowOnce {
            updated_input: None,
        },
        "allow_session" => Decision::AllowSession,
        "answers" => Decision::Answers {
            answers: answers(body.answers)?,
        },
        "deny" => Decision::Deny {
            reason: short("reason", body.reason, MAX_REASON_CHARS)?
                .unwrap_or_else(|| "Denied from the dashboard.".into()),
        },
        _ => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "The decision must be allow_once, allow_session, deny or answers.",
            ))
        }
    };
    visible(&web, &s.user, &id).await?;
    web.backend()
        .decide(&s.user, &id, &approval, decision)
        .await
        .map_err(backend_err)?;
    Ok(no_content())
}

// ----- shares, audit, usage -----

fn level_name(level: ShareLevel) -> &'static str {
    match level {
        ShareLevel::Run => "run",
        ShareLevel::Trusted => "trusted",
    }
}

fn share_json(s: ct_bot::backend::ShareInfo) -> Value {
    json!({
        "owner": s.owner,
        "grantee": s.grantee,
        "projects": s.projects,
        "level": level_name(s.level),
    })
}

/// Every share the user is part of, either way.
pub async fn shares(State(web): State<Web>, Signed(s): Signed) -> ApiResult<Json<Value>> {
    let shares = web.backend().shares(&s.user).await.map_err(backend_err)?;
    Ok(Json(Value::Array(
        shares.into_iter().map(share_json).collect(),
    )))
}

#[derive(Debug, Deserialize)]
pub struct NewShare {
    grantee: String,
    #[serde(default)]
    projects: Vec<String>,
    level: Option<String>,
}

/// Shares the user's agents with someone.
pub async fn add_share(
    State(web): State<Web>,
    Signed(s): Signed,
    Body(body): Body<NewShare>,
) -> ApiResult {
    let grantee = user_id("person to share with", &body.grantee)?;
    let level = match body.level.as_deref() {
        None | Some("run") => ShareLevel::Run,
        Some("trusted") => ShareLevel::Trusted,
        Some(_) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "The level must be run or trusted.",
            ))
        }
    };
    if body.projects.len() > 50 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "Name at most 50 projects, or none to share them all.",
        ));
    }
    let mut projects = Vec::new();
    for p in body.projects {
        projects.extend(short("project", Some(p), 200)?);
    }
    let share = web
        .backend()
        .share(&s.user, &grantee, projects, level)
        .await
        .map_err(backend_err)?;
    Ok((StatusCode::CREATED, Json(share_json(share))).into_response())
}

/// Ends a share the user gave.
pub async fn remove_share(
    State(web): State<Web>,
    Signed(s): Signed,
    Path(grantee): Path<String>,
) -> ApiResult {
    let grantee = user_id("person", &grantee)?;
    web.backend()
        .unshare(&s.user, &grantee)
        .await
        .map_err(backend_err)?;
    Ok(no_content())
}

/// Recent tasks and approvals on the user's agents, as `/audit` shows them.
pub async fn audit(State(web): State<Web>, Signed(s): Signed) -> ApiResult<Json<Value>> {
    let entries = web.backend().audit(&s.user).await.map_err(backend_err)?;
    Ok(Json(Value::Array(
        entries
            .into_iter()
            .map(|e| json!({ "at": e.at, "actor": e.actor, "what": e.what }))
            .collect(),
    )))
}

/// Tokens and cost of one day (or all of them).
#[derive(Debug, Default, Serialize)]
struct Usage {
    tasks: u64,
    input_tokens: u64,
    output_tokens: u64,
    cost_usd: f64,
}

impl Usage {
    fn add(&mut self, events: &[(u64, TaskEvent)]) {
        self.tasks += 1;
        // Tokens are each turn's own; the cost is Claude Code's running total for its process (one per task),
        // so the task's last figure is its cost.
        let mut cost = 0.0;
        for (_, event) in events {
            if let TaskEvent::TurnFinished {
                cost_usd,
                input_tokens,
                output_tokens,
                ..
            } = event
            {
                self.input_tokens += input_tokens.unwrap_or(0);
                self.output_tokens += output_tokens.unwrap_or(0);
                cost = cost_usd.unwrap_or(cost);
            }
        }
        self.cost_usd += cost;
    }

    fn merge(&mut self, other: &Usage) {
        self.tasks += other.tasks;
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.cost_usd += other.cost_usd;
    }
}

/// What the user's own tasks of the last 30 days used, by day (UTC), as their agents reported it.
pub async fn usage(State(web): State<Web>, Signed(s): Signed) -> ApiResult<Json<Value>> {
    let since = now().saturating_sub(USAGE_DAYS * 86_400);
    let query = HistoryQuery {
        requester: Some(s.user.clone()),
        take: USAGE_TASKS,
        ..HistoryQuery::default()
    };
    let page = web
        .backend()
        .history(&s.user, &query)
        .await
        .map_err(backend_err)?;
    // The history call decided which tasks are this user's. Their events are read in one job on the blocking
    // pool, a task at a time, keeping only the sums: a task's stored output may run to megabytes.
    let tasks: Vec<(String, u64)> = page
        .entries
        .into_iter()
        .filter(|e| e.task.created_at >= since)
        .map(|e| (e.task.id, e.task.created_at))
        .collect();
    let days = web
        .inner
        .core
        .read(move |store| {
            let mut days: BTreeMap<String, Usage> = BTreeMap::new();
            for (id, at) in tasks {
                days.entry(day(at)).or_default().add(&store.events(&id, 0)?);
            }
            Ok::<_, crate::store::StoreError>(days)
        })
        .await??;
    let mut total = Usage::default();
    for u in days.values() {
        total.merge(u);
    }
    let days: Vec<Value> = days
        .into_iter()
        .rev()
        .map(|(day, u)| {
            let mut v = serde_json::to_value(u).unwrap_or_default();
            v["day"] = Value::String(day);
            v
        })
        .collect();
    Ok(Json(json!({ "days": days, "total": total })))
}

/// `YYYY-MM-DD` of a Unix time, in UTC.
fn day(unix: u64) -> String {
    let mut date = crate::core::audit::utc(unix);
    date.truncate("YYYY-MM-DD".len());
    date
}

/// Any other path under the API.
pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "There is no such page in the API.")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tasks_cost_is_its_last_running_total_and_tokens_add_up() {
        let turn = |cost: f64, tokens: u64| TaskEvent::TurnFinished {
            is_error: false,
            subtype: "success".into(),
            text: None,
            cost_usd: Some(cost),
            turns: None,
            input_tokens: Some(tokens),
            output_tokens: Some(1),
            duration_ms: None,
        };
        let mut u = Usage::default();
        u.add(&[(1, turn(0.5, 10)), (2, turn(0.75, 20))]);
        u.add(&[(1, turn(0.25, 5))]);
        assert_eq!((u.tasks, u.input_tokens, u.output_tokens), (2, 35, 3));
        assert!((u.cost_usd - 1.0).abs() < 1e-9, "{}", u.cost_usd);
    }

    #[test]
    fn days_are_utc_calendar_dates() {
        assert_eq!(day(0), "1970-01-01");
        assert_eq!(day(951_782_400), "2000-02-29");
        assert_eq!(day(1_796_601_600), "2026-12-07");
        assert_eq!(day(1_796_687_999), "2026-12-07");
    }

    #[test]
    fn prompts_are_bounded_and_not_blank() {
        assert!(prompt("   ").is_err());
        assert_eq!(prompt(" fix it ").unwrap(), "fix it");
        let huge = "x".repeat(MAX_PROMPT_CHARS + 1);
        assert_eq!(
            prompt(&huge).unwrap_err().status,
            StatusCode::PAYLOAD_TOO_LARGE
        );
    }

    #[test]
    fn answers_are_a_few_short_texts() {
        let map = |v: Value| v.as_object().cloned();
        assert!(answers(None).is_err());
        assert!(answers(map(json!({}))).is_err());
        assert!(answers(map(json!({ "q": 1 }))).is_err());
        assert!(answers(map(json!({ "q": "x".repeat(MAX_ANSWER_CHARS + 1) }))).is_err());
        let many: serde_json::Map<String, Value> = (0..=MAX_ANSWERS)
            .map(|i| (format!("q{i}"), json!("a")))
            .collect();
        assert!(answers(Some(many)).is_err());
        assert_eq!(
            answers(map(json!({ "Which?": "SQLite" }))).unwrap(),
            json!({ "Which?": "SQLite" })
        );
    }

    #[test]
    fn user_ids_are_digits() {
        assert!(user_id("x", "123456789012345678").is_ok());
        for bad in ["", "abc", "12 34", "../1", "123456789012345678901"] {
            assert!(user_id("x", bad).is_err(), "{bad}");
        }
    }
}
