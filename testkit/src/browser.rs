//! A real headless Chromium, driven over W3C WebDriver by Debian's `chromedriver`, for the web dashboard's
//! end-to-end tests: [`Browser`] starts both, and its methods click, type, read and wait the way a person's
//! browser would, with the page's real cookies, CSP and JavaScript.
//!
//! The client is written here over reqwest rather than taken from `fantoccini`: reqwest (with rustls) is
//! already built for the bot and the agent, so this costs no new crate, while `fantoccini` brings the
//! `webdriver` and `cookie` crates and its own hyper client stack for what is a dozen JSON calls to
//! chromedriver on loopback over plain HTTP.
//!
//! Every wait polls every [`POLL`] and gives up after the browser's timeout ([`DEFAULT_TIMEOUT`] unless
//! [`Browser::set_timeout`] changed it) with what it waited for, the last thing it saw and the page it was on:
//! there is no bare sleep to synchronise on anywhere.

use crate::nats::find_binary;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use base64::Engine as _;
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

/// How long a wait lasts unless [`Browser::set_timeout`] says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20);

/// How often a wait looks again.
pub const POLL: Duration = Duration::from_millis(50);

/// How long chromedriver may take to listen, and then Chromium to start and open its first tab.
const START_LIMIT: Duration = Duration::from_secs(30);

/// How many ports to try when another process takes the free port we picked before chromedriver binds it.
const PORT_ATTEMPTS: usize = 5;

/// The key W3C WebDriver wraps an element reference in.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// The window size every browser starts with: a laptop screen, so the dashboard's wide layout is what is tested
/// unless a test calls [`Browser::set_window_size`].
const WINDOW: (u32, u32) = (1280, 900);

/// WebDriver errors that mean "not yet" while a page is still changing: a wait retries on them. Any other error
/// (a bad selector, a script that throws, an alert left open) fails the call at once.
const RETRY_ON: &[&str] = &[
    "no such element",
    "stale element reference",
    "element not interactable",
    "element click intercepted",
    "no such alert",
];

/// A headless Chromium session and the chromedriver that runs it. For a second user, start a second one: each
/// has its own profile, so its own cookies.
///
/// Dropping it kills chromedriver and Chromium (their whole process group, so no renderer is left behind even
/// when a test panics) and removes the profile; [`Browser::close`] ends the session politely first.
#[derive(Debug)]
pub struct Browser {
    session: Session,
    timeout: Duration,
    driver: Child,
    /// chromedriver's process group, which Chromium and its helpers inherit.
    group: Option<rustix::process::Pid>,
    dir: TempDir,
}

/// An element found on the page. It stays valid until the page replaces the node; then its calls fail with
/// "stale element reference" and the test should find it again (the [`Browser`] calls by selector do that).
#[derive(Debug, Clone)]
pub struct Element {
    session: Session,
    id: String,
    css: String,
}

/// One cookie as the browser holds it (including `HttpOnly` ones the page's script cannot see).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cookie {
    pub name: String,
    pub value: String,
    pub http_only: bool,
    pub secure: bool,
    /// `Strict`, `Lax` or `None`, as Chromium reports it.
    pub same_site: Option<String>,
}

/// The WebDriver session's address and the HTTP client that talks to it.
#[derive(Debug, Clone)]
struct Session {
    http: reqwest::Client,
    /// `http://127.0.0.1:PORT/session/ID`.
    url: String,
}

/// A failed WebDriver command: a W3C error (with its code, for [`RETRY_ON`]) or a transport failure.
#[derive(Debug)]
enum CmdError {
    WebDriver { code: String, message: String },
    Other(anyhow::Error),
}

impl std::fmt::Display for CmdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // chromedriver's messages carry a long native stack trace after the first line; it says nothing
            // about the page.
            CmdError::WebDriver { code, message } => {
                write!(f, "{code}: {}", message.lines().next().unwrap_or(""))
            }
            CmdError::Other(e) => write!(f, "{e:#}"),
        }
    }
}

impl std::error::Error for CmdError {}

impl CmdError {
    fn retriable(&self) -> bool {
        matches!(self, CmdError::WebDriver { code, .. } if RETRY_ON.contains(&code.as_str()))
    }
}

type CmdResult<T> = Result<T, CmdError>;

impl Session {
    /// Sends one WebDriver command (`path` relative to the session) and returns its `value`.
    async fn cmd(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> CmdResult<Value> {
        let url = format!("{}{path}", self.url);
        let mut req = self.http.request(method.clone(), &url);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("chromedriver did not answer {method} {path}"))
            .map_err(CmdError::Other)?;
        let status = resp.status();
        let json: Value = resp
            .json()
            .await
            .with_context(|| {
                format!("chromedriver's answer to {method} {path} is not JSON ({status})")
            })
            .map_err(CmdError::Other)?;
        let value = json.get("value").cloned().unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(value);
        }
        match value.get("error").and_then(Value::as_str) {
            Some(code) => Err(CmdError::WebDriver {
                code: code.to_owned(),
                message: value
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
            }),
            None => Err(CmdError::Other(anyhow!(
                "chromedriver answered {method} {path} with {status}: {json}"
            ))),
        }
    }

    async fn get(&self, path: &str) -> CmdResult<Value> {
        self.cmd(reqwest::Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Value) -> CmdResult<Value> {
        self.cmd(reqwest::Method::POST, path, Some(body)).await
    }

    /// The first element matching `css` (now, without waiting).
    async fn find(&self, css: &str) -> CmdResult<Element> {
        let v = self
            .post("/element", json!({"using": "css selector", "value": css}))
            .await?;
        self.element(&v, css)
    }

    async fn find_all(&self, css: &str) -> CmdResult<Vec<Element>> {
        let v = self
            .post("/elements", json!({"using": "css selector", "value": css}))
            .await?;
        let list = v.as_array().cloned().unwrap_or_default();
        list.iter().map(|e| self.element(e, css)).collect()
    }

    fn element(&self, v: &Value, css: &str) -> CmdResult<Element> {
        let id = v.get(ELEMENT_KEY).and_then(Value::as_str).ok_or_else(|| {
            CmdError::Other(anyhow!("chromedriver returned no element reference: {v}"))
        })?;
        Ok(Element {
            session: self.clone(),
            id: id.to_owned(),
            css: css.to_owned(),
        })
    }

    async fn script(&self, kind: &str, js: &str, args: Vec<Value>) -> CmdResult<Value> {
        self.post(
            &format!("/execute/{kind}"),
            json!({"script": js, "args": args}),
        )
        .await
    }
}

impl Element {
    fn path(&self, what: &str) -> String {
        format!("/element/{}{what}", self.id)
    }

    /// The element's rendered text (what a person sees; hidden text is left out).
    pub async fn text(&self) -> anyhow::Result<String> {
        let v = self
            .session
            .get(&self.path("/text"))
            .await
            .with_context(|| format!("reading the text of {}", self.css))?;
        Ok(v.as_str().unwrap_or_default().to_owned())
    }

    /// Clicks the element's centre, as a mouse would (so an element covered by another fails, as it should).
    pub async fn click(&self) -> anyhow::Result<()> {
        self.session
            .post(&self.path("/click"), json!({}))
            .await
            .with_context(|| format!("clicking {}", self.css))?;
        Ok(())
    }

    /// An attribute as the page's HTML has it (`None` when absent).
    pub async fn attr(&self, name: &str) -> anyhow::Result<Option<String>> {
        let v = self
            .session
            .get(&self.path(&format!("/attribute/{name}")))
            .await
            .with_context(|| format!("reading attribute {name} of {}", self.css))?;
        Ok(v.as_str().map(str::to_owned))
    }

    /// A DOM property (`value`, `checked`, `disabled`...), as the page's script would see it now.
    pub async fn prop(&self, name: &str) -> anyhow::Result<Value> {
        self.session
            .get(&self.path(&format!("/property/{name}")))
            .await
            .with_context(|| format!("reading property {name} of {}", self.css))
    }

    /// The element as a script argument for [`Browser::eval`].
    pub fn as_arg(&self) -> Value {
        json!({ ELEMENT_KEY: self.id })
    }
}

impl Browser {
    /// Starts chromedriver on a free loopback port and a headless Chromium session in it, with a fresh
    /// profile. Takes about a second on a warm machine (most of it Chromium's own start).
    pub async fn start() -> anyhow::Result<Browser> {
        let chromium = find_chromium()?;
        let chromedriver = find_binary("chromedriver", &["/usr/bin", "/usr/lib/chromium"]).context(
            "chromedriver is not installed: the dashboard tests drive a real Chromium with it. Run scripts/test, \
             which installs it (Debian packages chromium and chromium-driver), or \
             `apt-get install chromium chromium-driver`",
        )?;
        let dir = tempfile::Builder::new()
            .prefix("ct-browser-")
            .tempdir()
            .context("temp dir for the browser's profile")?;
        // Only loopback, and never through a proxy the environment may name: chromedriver is on 127.0.0.1.
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(START_LIMIT + Duration::from_secs(30))
            .build()
            .context("building the WebDriver HTTP client")?;

        let (driver, port) = spawn_driver(&chromedriver, dir.path()).await?;
        let group = driver
            .id()
            .and_then(|pid| rustix::process::Pid::from_raw(pid as i32));
        // From here on, the driver (and whatever Chromium it starts) dies with `browser` if anything fails.
        let mut browser = Browser {
            session: Session {
                http: http.clone(),
                url: String::new(),
            },
            timeout: DEFAULT_TIMEOUT,
            driver,
            group,
            dir,
        };
        let base = format!("http://127.0.0.1:{port}");
        browser.wait_driver_ready(&base).await?;

        let profile = browser.dir.path().join("profile");
        let mut args = vec![
            // The new headless mode is the real browser without a window (the old one was a separate
            // implementation with its own quirks).
            "--headless=new".to_owned(),
            "--disable-gpu".to_owned(),
            // Docker and CI give /dev/shm 64 MB, which Chromium's renderers outgrow; /tmp has room.
            "--disable-dev-shm-usage".to_owned(),
            format!("--user-data-dir={}", profile.display()),
            format!("--window-size={},{}", WINDOW.0, WINDOW.1),
            // Hermetic: no proxy from the environment, no first-run pages, no background traffic to Google.
            "--no-proxy-server".to_owned(),
            "--no-first-run".to_owned(),
            "--no-default-browser-check".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
        ];
        // Chromium refuses to start as root with its sandbox on (the sandbox needs an unprivileged user to
        // drop to), and test containers and CI often run as root. As any other user, keep the sandbox: the
        // renderer is then as confined as on a person's machine.
        if rustix::process::geteuid().is_root() {
            args.push("--no-sandbox".to_owned());
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            // The relay's certificate is self-signed, and so is the one the tests' servers use.
            "acceptInsecureCerts": true,
            // An alert or confirm stays open until a test accepts or dismisses it; any other command meanwhile
            // fails ("unexpected alert open") instead of WebDriver silently dismissing it.
            "unhandledPromptBehavior": "ignore",
            "pageLoadStrategy": "normal",
            "timeouts": {"implicit": 0, "pageLoad": 30_000, "script": 30_000},
            "goog:chromeOptions": {"binary": chromium, "args": args},
        }}});
        let resp = tokio::time::timeout(
            START_LIMIT,
            http.post(format!("{base}/session")).json(&caps).send(),
        )
        .await
        .map_err(|_| anyhow!("Chromium did not start within {START_LIMIT:?}"))
        .and_then(|r| r.context("asking chromedriver for a session"))
        .with_context(|| browser.driver_log())?;
        let status = resp.status();
        let json: Value = resp.json().await.context("chromedriver's new session")?;
        let id = json
            .pointer("/value/sessionId")
            .and_then(Value::as_str)
            .with_context(|| {
                format!(
                    "chromedriver could not start Chromium ({status}): {}\n{}",
                    json.pointer("/value/message")
                        .and_then(Value::as_str)
                        .unwrap_or(&json.to_string()),
                    browser.driver_log()
                )
            })?;
        browser.session.url = format!("{base}/session/{id}");
        Ok(browser)
    }

    /// Polls chromedriver's `/status` until it says it is ready for a session.
    async fn wait_driver_ready(&mut self, base: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_LIMIT;
        loop {
            let ready = self
                .session
                .http
                .get(format!("{base}/status"))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .ok();
            if let Some(resp) = ready {
                let v: Value = resp.json().await.unwrap_or(Value::Null);
                if v.pointer("/value/ready") == Some(&Value::Bool(true)) {
                    return Ok(());
                }
            }
            if let Ok(Some(status)) = self.driver.try_wait() {
                bail!(
                    "chromedriver exited ({status}) before it was ready\n{}",
                    self.driver_log()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "chromedriver was not ready within {START_LIMIT:?}\n{}",
                    self.driver_log()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The end of chromedriver's log (which includes what Chromium printed), for errors about the start.
    fn driver_log(&self) -> String {
        let path = self.dir.path().join("chromedriver.log");
        let log = std::fs::read_to_string(&path).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!(
            "chromedriver log ({}), last lines:\n{}",
            path.display(),
            tail.join("\n")
        )
    }

    /// How long each later wait lasts (default [`DEFAULT_TIMEOUT`]).
    pub fn set_timeout(&mut self, limit: Duration) {
        self.timeout = limit;
    }

    /// Polls `f` until it gives `Some`, retrying on the errors of a page still changing ([`RETRY_ON`]), for at
    /// most the browser's timeout. `what` names the wait in the error.
    async fn poll<T>(
        &self,
        what: &str,
        mut f: impl AsyncFnMut() -> CmdResult<Option<T>>,
    ) -> anyhow::Result<T> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let last = match f().await {
                Ok(Some(t)) => return Ok(t),
                Ok(None) => None,
                Err(e) if e.retriable() => Some(e),
                Err(e) => {
                    return Err(anyhow::Error::new(e)
                        .context(format!("{what} (on {})", self.where_().await)))
                }
            };
            if Instant::now() >= deadline {
                let last = last.map(|e| format!(" (last: {e})")).unwrap_or_default();
                bail!(
                    "{what}: not within {:?}{last}, on {}",
                    self.timeout,
                    self.where_().await
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The page's URL for error messages, or why it is unknown.
    async fn where_(&self) -> String {
        match self.session.get("/url").await {
            Ok(v) => v.as_str().unwrap_or("?").to_owned(),
            Err(e) => format!("an unknown page ({e})"),
        }
    }

    /// Opens `url` and waits for its load event (not for the page's own fetches: wait for what they show).
    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.session
            .post("/url", json!({ "url": url }))
            .await
            .with_context(|| format!("opening {url}"))?;
        Ok(())
    }

    /// The page's current URL.
    pub async fn current_url(&self) -> anyhow::Result<String> {
        let v = self.session.get("/url").await.context("reading the URL")?;
        Ok(v.as_str().unwrap_or_default().to_owned())
    }

    /// Waits until an element matches `css` and returns the first.
    pub async fn wait_for(&self, css: &str) -> anyhow::Result<Element> {
        self.poll(&format!("waiting for {css}"), async || {
            self.session.find(css).await.map(Some)
        })
        .await
    }

    /// Waits until no element matches `css` (a dialog closed, a row removed).
    pub async fn wait_gone(&self, css: &str) -> anyhow::Result<()> {
        self.poll(&format!("waiting for {css} to go"), async || {
            Ok((self.session.find_all(css).await?.is_empty()).then_some(()))
        })
        .await
    }

    /// Waits until an element matching `css` has rendered text containing `contains`, and returns that
    /// element's whole text.
    pub async fn wait_for_text(&self, css: &str, contains: &str) -> anyhow::Result<String> {
        let mut seen = Vec::new();
        let found = self
            .poll(
                &format!("waiting for {css} to contain {contains:?}"),
                async || {
                    seen.clear();
                    for el in self.session.find_all(css).await? {
                        let text = el.session.get(&el.path("/text")).await?;
                        let text = text.as_str().unwrap_or_default().to_owned();
                        if text.contains(contains) {
                            return Ok(Some(text));
                        }
                        seen.push(text);
                    }
                    Ok(None)
                },
            )
            .await;
        found.with_context(|| format!("texts seen last: {seen:?}"))
    }

    /// Waits for `css` to be clickable and clicks it (retrying while something covers it or it is not yet
    /// shown, as a person would wait).
    pub async fn click(&self, css: &str) -> anyhow::Result<()> {
        self.poll(&format!("clicking {css}"), async || {
            let el = self.session.find(css).await?;
            el.session.post(&el.path("/click"), json!({})).await?;
            Ok(Some(()))
        })
        .await
    }

    /// Waits for the field `css`, empties it and types `text` into it key by key (so the page sees `input`
    /// events as from a keyboard).
    pub async fn fill(&self, css: &str, text: &str) -> anyhow::Result<()> {
        self.poll(&format!("typing into {css}"), async || {
            let el = self.session.find(css).await?;
            el.session.post(&el.path("/clear"), json!({})).await?;
            el.session
                .post(&el.path("/value"), json!({ "text": text }))
                .await?;
            Ok(Some(()))
        })
        .await
    }

    /// Waits for the `<select>` at `css` to have an option with `value`, chooses it and fires `input` and
    /// `change` as a person's choice does.
    pub async fn select(&self, css: &str, value: &str) -> anyhow::Result<()> {
        const JS: &str = "const [css, value] = arguments;
            const el = document.querySelector(css);
            if (!el) return {state: 'missing'};
            const options = Array.from(el.options || [], o => o.value);
            if (!options.includes(value)) return {state: 'no option', options};
            el.value = value;
            el.dispatchEvent(new Event('input', {bubbles: true}));
            el.dispatchEvent(new Event('change', {bubbles: true}));
            return {state: 'ok'};";
        let mut last = Value::Null;
        let done = self
            .poll(&format!("choosing {value:?} in {css}"), async || {
                last = self
                    .session
                    .script("sync", JS, vec![json!(css), json!(value)])
                    .await?;
                Ok((last.get("state").and_then(Value::as_str) == Some("ok")).then_some(()))
            })
            .await;
        done.with_context(|| format!("the select last said {last}"))
    }

    /// The rendered text of the first element matching `css`, waiting for one to exist.
    pub async fn text(&self, css: &str) -> anyhow::Result<String> {
        self.poll(&format!("reading the text of {css}"), async || {
            let el = self.session.find(css).await?;
            let v = el.session.get(&el.path("/text")).await?;
            Ok(Some(v.as_str().unwrap_or_default().to_owned()))
        })
        .await
    }

    /// How many elements match `css` now (no waiting: use [`Browser::wait_for`] first when the page is
    /// still loading).
    pub async fn count(&self, css: &str) -> anyhow::Result<usize> {
        let all = self
            .session
            .find_all(css)
            .await
            .with_context(|| format!("counting {css}"))?;
        Ok(all.len())
    }

    /// Whether any element matches `css` now (no waiting).
    pub async fn exists(&self, css: &str) -> anyhow::Result<bool> {
        Ok(self.count(css).await? > 0)
    }

    /// Runs `js` as a function body in the page (arguments in `arguments`, [`Element::as_arg`] for elements)
    /// and returns what it returns. Not subject to the page's CSP: WebDriver runs it, not the page.
    pub async fn eval(&self, js: &str, args: Vec<Value>) -> anyhow::Result<Value> {
        self.session
            .script("sync", js, args)
            .await
            .with_context(|| format!("running script {}", short(js)))
    }

    /// Like [`Browser::eval`], for a script that finishes by calling its last argument with the result (within
    /// 30 s).
    pub async fn eval_async(&self, js: &str, args: Vec<Value>) -> anyhow::Result<Value> {
        self.session
            .script("async", js, args)
            .await
            .with_context(|| format!("running async script {}", short(js)))
    }

    /// Waits until `js` (as in [`Browser::eval`]) returns something truthy, and returns it.
    pub async fn wait_for_js(&self, js: &str, args: Vec<Value>) -> anyhow::Result<Value> {
        self.poll(
            &format!("waiting for script {} to hold", short(js)),
            async || {
                let v = self.session.script("sync", js, args.clone()).await?;
                let truthy = match &v {
                    Value::Null | Value::Bool(false) => false,
                    Value::Number(n) => n.as_f64() != Some(0.0),
                    Value::String(s) => !s.is_empty(),
                    _ => true,
                };
                Ok(truthy.then_some(v))
            },
        )
        .await
    }

    /// Sends a request from the page with JavaScript's `fetch`, with the page's cookies (`credentials:
    /// 'same-origin'`) and only the `headers` given: a test forges requests this way, with the real session
    /// cookie but without the CSRF token, exactly as a script on the page could. `path` is resolved against the
    /// page's URL. Returns the status and the body as text.
    pub async fn fetch(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> anyhow::Result<(u16, String)> {
        const JS: &str = "const [method, path, headers, body, done] = arguments;
            fetch(path, {method, headers, body: body === null ? undefined : body,
                         credentials: 'same-origin', cache: 'no-store'})
              .then(async r => done({status: r.status, body: await r.text()}),
                    e => done({error: String(e)}));";
        let headers: serde_json::Map<String, Value> = headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), json!(v)))
            .collect();
        let what = format!("fetch {method} {path} from the page");
        let v = self
            .session
            .script(
                "async",
                JS,
                vec![
                    json!(method),
                    json!(path),
                    Value::Object(headers),
                    json!(body),
                ],
            )
            .await
            .with_context(|| what.clone())?;
        if let Some(err) = v.get("error").and_then(Value::as_str) {
            bail!("{what}: {err}");
        }
        let status = v
            .get("status")
            .and_then(Value::as_u64)
            .with_context(|| format!("{what}: no status in {v}"))?;
        let text = v.get("body").and_then(Value::as_str).unwrap_or_default();
        Ok((status as u16, text.to_owned()))
    }

    /// Every cookie the browser holds for the current page, `HttpOnly` ones included.
    pub async fn cookies(&self) -> anyhow::Result<Vec<Cookie>> {
        let v = self
            .session
            .get("/cookie")
            .await
            .context("reading cookies")?;
        let list = v.as_array().cloned().unwrap_or_default();
        Ok(list
            .iter()
            .map(|c| Cookie {
                name: c["name"].as_str().unwrap_or_default().to_owned(),
                value: c["value"].as_str().unwrap_or_default().to_owned(),
                http_only: c["httpOnly"].as_bool().unwrap_or(false),
                secure: c["secure"].as_bool().unwrap_or(false),
                same_site: c["sameSite"].as_str().map(str::to_owned),
            })
            .collect())
    }

    /// The cookie called `name`, if the browser holds one for the current page.
    pub async fn cookie(&self, name: &str) -> anyhow::Result<Option<Cookie>> {
        Ok(self.cookies().await?.into_iter().find(|c| c.name == name))
    }

    /// Resizes the window (the page's viewport is a little smaller), for narrow-screen layouts.
    pub async fn set_window_size(&self, width: u32, height: u32) -> anyhow::Result<()> {
        self.session
            .post("/window/rect", json!({"width": width, "height": height}))
            .await
            .with_context(|| format!("resizing the window to {width}x{height}"))?;
        Ok(())
    }

    /// Waits for an alert or `window.confirm` to open, presses OK, and returns its message.
    pub async fn accept_alert(&self) -> anyhow::Result<String> {
        self.close_alert("accept").await
    }

    /// Waits for an alert or `window.confirm` to open, presses Cancel, and returns its message.
    pub async fn dismiss_alert(&self) -> anyhow::Result<String> {
        self.close_alert("dismiss").await
    }

    async fn close_alert(&self, how: &str) -> anyhow::Result<String> {
        self.poll(&format!("waiting for a dialog to {how}"), async || {
            let text = self.session.get("/alert/text").await?;
            self.session
                .post(&format!("/alert/{how}"), json!({}))
                .await?;
            Ok(Some(text.as_str().unwrap_or_default().to_owned()))
        })
        .await
    }

    /// Saves a PNG of the viewport to `path`: call it when a test fails to see what the page showed.
    pub async fn screenshot(&self, path: impl AsRef<Path>) -> anyhow::Result<()> {
        let path = path.as_ref();
        let v = self
            .session
            .get("/screenshot")
            .await
            .context("taking a screenshot")?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or_default())
            .context("chromedriver's screenshot is not base64")?;
        std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))
    }

    /// Ends the session (Chromium closes its windows and exits) and stops chromedriver. Dropping the browser
    /// kills both instead, which is as good for a test but leaves no chance to see a failure to quit.
    pub async fn close(mut self) -> anyhow::Result<()> {
        self.session
            .cmd(reqwest::Method::DELETE, "", None)
            .await
            .context("ending the WebDriver session")?;
        // Group first, while chromedriver is unreaped and so still holds the group's id.
        if let Some(group) = self.group.take() {
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        }
        self.driver.kill().await.context("stopping chromedriver")?;
        Ok(())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // chromedriver runs in a process group of its own that Chromium and its helpers inherit: killing the
        // group leaves no renderer behind, which killing chromedriver alone (kill_on_drop) would.
        if let Some(group) = self.group {
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        }
    }
}

/// Starts chromedriver on a port that was free a moment ago, and waits until it says it listens. chromedriver
/// cannot pick a port itself (`--port=0` is refused), so another process may take ours between our probe and
/// its bind: then it exits saying so, and we try another port.
async fn spawn_driver(chromedriver: &Path, dir: &Path) -> anyhow::Result<(Child, u16)> {
    let mut failures = Vec::new();
    for _ in 0..PORT_ATTEMPTS {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("finding a free port for chromedriver")?
            .port();
        let mut child = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .arg(format!(
                "--log-path={}",
                dir.join("chromedriver.log").display()
            ))
            // Its own process group, so Drop can kill Chromium with it.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", chromedriver.display()))?;
        let stdout = child.stdout.take().context("chromedriver's stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let started = tokio::time::timeout(START_LIMIT, async {
            let mut said = Vec::new();
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("started successfully") {
                    return Ok(());
                }
                said.push(line);
            }
            Err(said.join("\n"))
        })
        .await;
        match started {
            Ok(Ok(())) => {
                // Keep reading so chromedriver never blocks on a full pipe; ends when it exits.
                tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                return Ok((child, port));
            }
            Ok(Err(said)) => failures.push(format!("port {port}: {said}")),
            Err(_) => bail!("chromedriver did not start listening within {START_LIMIT:?}"),
        }
        let _ = child.kill().await;
    }
    bail!(
        "chromedriver could not listen on any of {PORT_ATTEMPTS} free ports:\n{}",
        failures.join("\n")
    )
}

/// Chromium itself. Debian's `/usr/bin/chromium` is a shell wrapper that adds flags from `/etc/chromium.d`;
/// the binary it runs is taken directly when present, so the tests' flags are the only ones.
fn find_chromium() -> anyhow::Result<PathBuf> {
    let direct = PathBuf::from("/usr/lib/chromium/chromium");
    if direct.is_file() {
        return Ok(direct);
    }
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| find_binary(name, &["/usr/bin"]))
        .context(
            "Chromium is not installed: the dashboard tests drive a real one. Run scripts/test, which \
             installs it (Debian packages chromium and chromium-driver), or \
             `apt-get install chromium chromium-driver`",
        )
}

/// The start of a script, for error messages.
fn short(js: &str) -> String {
    let one_line = js.split_whitespace().collect::<Vec<_>>().join(" ");
    match one_line.char_indices().nth(60) {
        Some((i, _)) => format!("{:?}...", &one_line[..i]),
        None => format!("{one_line:?}"),
    }
}

#[cfg(test)]
mod tests {
    //! Drives the real Chromium against a page served the way the relay serves the dashboard: HTTPS with a
    //! self-signed certificate, a `__Host-` cookie and a CSP that allows only the page's own scripts. Fails
    //! (never skips) when Chromium is missing, with the error saying to run scripts/test.

    use std::sync::Arc;

    use axum::http::{header, HeaderMap, Method};
    use axum::response::IntoResponse;
    use axum::routing::{any, get};
    use axum::Router;
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpListener;
    use tokio_rustls::rustls;

    use super::*;

    const CSP: &str = "default-src 'none'; script-src 'self'; connect-src 'self'";

    const PAGE: &str = r#"<!doctype html><html><head><title>t</title></head><body>
<button id="b">Press</button><p id="out">before</p>
<input id="name"><p id="typed"></p>
<select id="pick"><option value="a">A</option><option value="b">B</option></select><p id="picked"></p>
<button id="ask">Ask</button><p id="answer"></p>
<script>document.title = 'inline ran';</script>
<script src="/app.js"></script></body></html>"#;

    const APP_JS: &str = "const $ = id => document.getElementById(id);
$('b').addEventListener('click', () => { $('out').textContent = 'after'; });
$('name').addEventListener('input', e => { $('typed').textContent = 'typed ' + e.target.value; });
$('pick').addEventListener('change', e => { $('picked').textContent = 'picked ' + e.target.value; });
$('ask').addEventListener('click', () => { $('answer').textContent = confirm('Really?') ? 'yes' : 'no'; });";

    /// Serves the page, its script and an echo of what a request carried, over HTTPS on 127.0.0.1:0.
    async fn serve() -> anyhow::Result<std::net::SocketAddr> {
        let key = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])?;
        let cert = key.cert.der().clone();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.key_pair.serialize_der().into());
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)?;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

        let app = Router::new()
            .route(
                "/",
                get(|| async {
                    (
                        [
                            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                            (header::CONTENT_SECURITY_POLICY, CSP),
                            (
                                header::SET_COOKIE,
                                "__Host-t=1; Path=/; Secure; HttpOnly; SameSite=Strict",
                            ),
                        ],
                        PAGE,
                    )
                }),
            )
            .route(
                "/app.js",
                get(|| async {
                    (
                        [
                            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
                            (header::CONTENT_SECURITY_POLICY, CSP),
                        ],
                        APP_JS,
                    )
                }),
            )
            .route(
                "/echo",
                any(
                    |method: Method, headers: HeaderMap, body: String| async move {
                        let h = |name: &str| {
                            headers
                                .get(name)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("-")
                                .to_owned()
                        };
                        let text = format!(
                            "{method} cookie={} x-test={} body={body}",
                            h("cookie"),
                            h("x-test")
                        );
                        (axum::http::StatusCode::ACCEPTED, text).into_response()
                    },
                ),
            );

        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        // Served until the test's runtime ends, which drops these tasks.
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, app) = (acceptor.clone(), app.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper_util::service::TowerToHyperService::new(app);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Ok(addr)
    }

    #[tokio::test]
    async fn drives_a_page_over_https_with_csp_and_host_cookie() -> anyhow::Result<()> {
        let addr = serve().await?;
        let started = Instant::now();
        let mut browser = Browser::start().await?;
        eprintln!("Browser::start took {:?}", started.elapsed());

        browser.goto(&format!("https://{addr}/")).await?;
        assert_eq!(browser.current_url().await?, format!("https://{addr}/"));
        // The CSP held: the inline script did not run, the page's own script file did (the click works).
        assert_eq!(
            browser.eval("return document.title", vec![]).await?,
            json!("t")
        );
        assert_eq!(browser.text("#out").await?, "before");
        browser.click("#b").await?;
        assert_eq!(browser.wait_for_text("#out", "after").await?, "after");

        let cookie = browser
            .cookie("__Host-t")
            .await?
            .context("no __Host-t cookie")?;
        assert_eq!(cookie.value, "1");
        assert!(cookie.http_only && cookie.secure, "{cookie:?}");
        assert_eq!(cookie.same_site.as_deref(), Some("Strict"));
        // HttpOnly: the page's own script cannot read it.
        assert_eq!(
            browser.eval("return document.cookie", vec![]).await?,
            json!("")
        );

        let (status, body) = browser
            .fetch("POST", "/echo", &[("X-Test", "yes")], Some("hello"))
            .await?;
        assert_eq!(status, 202);
        assert_eq!(body, "POST cookie=__Host-t=1 x-test=yes body=hello");

        browser.fill("#name", "first").await?;
        browser.fill("#name", "Ada").await?;
        browser.wait_for_text("#typed", "typed Ada").await?;
        browser.select("#pick", "b").await?;
        browser.wait_for_text("#picked", "picked b").await?;
        // A choice the select lacks fails at the timeout, saying which options there were.
        browser.set_timeout(Duration::from_millis(300));
        let err = browser.select("#pick", "zzz").await.unwrap_err();
        assert!(
            format!("{err:#}").contains(r#""options":["a","b"]"#),
            "{err:#}"
        );
        browser.set_timeout(DEFAULT_TIMEOUT);

        browser.click("#ask").await?;
        assert_eq!(browser.dismiss_alert().await?, "Really?");
        browser.wait_for_text("#answer", "no").await?;
        browser.click("#ask").await?;
        assert_eq!(browser.accept_alert().await?, "Really?");
        browser.wait_for_text("#answer", "yes").await?;

        assert_eq!(browser.count("p").await?, 4);
        assert!(!browser.exists("#nothing").await?);
        browser.set_window_size(400, 700).await?;
        let width = browser.eval("return window.innerWidth", vec![]).await?;
        assert!(width.as_u64().is_some_and(|w| w <= 400), "{width}");

        let png = browser.dir.path().join("shot.png");
        browser.screenshot(&png).await?;
        assert!(std::fs::read(&png)?.starts_with(b"\x89PNG"));

        // A second browser is a second user: its own profile, so no cookie until it visits.
        let mut short_wait = Browser::start().await?;
        short_wait.set_timeout(Duration::from_millis(300));
        short_wait.goto(&format!("https://{addr}/echo")).await?;
        assert_eq!(
            short_wait.text("body").await?,
            "GET cookie=- x-test=- body="
        );
        // A wait that cannot succeed ends at the timeout with what it waited for.
        let started = Instant::now();
        let err = short_wait.wait_for("#never").await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(format!("{err:#}").contains("waiting for #never"), "{err:#}");
        // One ends politely, the other is dropped (killed with its process group), as a failing test's would be.
        browser.close().await?;
        drop(short_wait);
        Ok(())
    }
}
