//! Metering shared tasks: what each grantee's tasks spent through the API, and the budget the owner set.
//!
//! A grantee's sandbox never holds a real credential: its Claude Code talks to the agent's local proxy
//! ([`proxy`]), which adds the key outside the sandbox, reads the usage the API streams back
//! (`message_start` and `message_delta`), adds it to that grantee's total, and refuses further requests once
//! the budget the owner set (`ct-agent sharing budget ID 5usd|200000tokens`) is spent.
//!
//! Budgets live in `budgets.json` (written by the CLI), usage in `usage.json` (written by the agent only), both
//! in the config directory, so neither writer can undo the other. Cost is estimated from list prices per model
//! family; a token budget is exact.

pub mod proxy;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::config::{ConfigDir, ConfigError};

/// The owner's budgets per grantee (Discord id).
pub const BUDGETS_FILE: &str = "budgets.json";
/// What each grantee's shared tasks have used so far.
pub const USAGE_FILE: &str = "usage.json";

/// How much a grantee's shared tasks may use, in total.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Budget {
    /// US dollars, estimated at list prices.
    Usd(f64),
    /// Tokens of every kind (input, output, cache).
    Tokens(u64),
}

impl Budget {
    /// `5usd`, `$5`, `2.50usd`, `200000tokens`, `200k` (tokens).
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim().to_ascii_lowercase().replace(['_', ','], "");
        let bad = || {
            format!("`{text}` is not a budget: give dollars (`5usd`, `$2.50`) or tokens (`200000tokens`, `200k`)")
        };
        if let Some(n) = t.strip_prefix('$').or_else(|| t.strip_suffix("usd")) {
            let usd: f64 = n.trim().parse().map_err(|_| bad())?;
            return (usd.is_finite() && usd >= 0.0)
                .then_some(Budget::Usd(usd))
                .ok_or_else(bad);
        }
        let (n, scale) = match t.strip_suffix("tokens").or_else(|| t.strip_suffix("tok")) {
            Some(n) => (n.trim(), 1),
            None => match t.strip_suffix('k') {
                Some(n) => (n.trim(), 1_000),
                None => match t.strip_suffix('m') {
                    Some(n) => (n.trim(), 1_000_000),
                    None => return Err(bad()),
                },
            },
        };
        let n: u64 = n.parse().map_err(|_| bad())?;
        n.checked_mul(scale).map(Budget::Tokens).ok_or_else(bad)
    }

    /// Whether `used` has reached this budget.
    pub fn spent(&self, used: &Usage) -> bool {
        match *self {
            Budget::Usd(limit) => used.usd >= limit,
            Budget::Tokens(limit) => used.tokens() >= limit,
        }
    }
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Budget::Usd(usd) => write!(f, "${usd:.2}"),
            Budget::Tokens(t) => write!(f, "{t} tokens"),
        }
    }
}

/// One grantee's use of the API through the proxy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_tokens: u64,
    /// Estimated from list prices.
    pub usd: f64,
    pub requests: u64,
}

impl Usage {
    pub fn tokens(&self) -> u64 {
        self.input_tokens + self.output_tokens + self.cache_tokens
    }
}

impl fmt::Display for Usage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} tokens (~${:.2}) in {} requests",
            self.tokens(),
            self.usd,
            self.requests
        )
    }
}

/// Dollars per million tokens (input, output) for a model, at list prices; unknown models count as Opus,
/// so an estimate errs on the side of the owner.
fn price(model: &str) -> (f64, f64) {
    let m = model.to_ascii_lowercase();
    if m.contains("haiku") {
        (1.0, 5.0)
    } else if m.contains("sonnet") {
        (3.0, 15.0)
    } else {
        (15.0, 75.0)
    }
}

/// What one response reported, turned into [`Usage`] (cache writes at 1.25× and reads at 0.1× input).
pub fn cost(model: &str, input: u64, cache_write: u64, cache_read: u64, output: u64) -> Usage {
    let (inp, out) = price(model);
    let usd = (input as f64 * inp
        + cache_write as f64 * inp * 1.25
        + cache_read as f64 * inp * 0.1
        + output as f64 * out)
        / 1_000_000.0;
    Usage {
        input_tokens: input,
        output_tokens: output,
        cache_tokens: cache_write + cache_read,
        usd,
        requests: 0,
    }
}

/// Why a request or a task is refused: the grantee's budget is spent.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "the budget the owner of this agent set for your shared tasks is spent ({used} used of {budget}): ask them \
     to raise it on that machine with `ct-agent sharing budget {user} <amount>`"
)]
pub struct BudgetSpent {
    pub user: String,
    pub used: Usage,
    pub budget: Budget,
}

/// The meter: budgets (re-read on every check, so `ct-agent sharing budget` applies at once) and usage.
/// Cheap to clone.
#[derive(Debug, Clone)]
pub struct Meter {
    dir: ConfigDir,
    usage: Arc<Mutex<BTreeMap<String, Usage>>>,
    /// Held while `usage.json` is written, so writes never interleave.
    saving: Arc<Mutex<()>>,
}

impl Meter {
    /// Loads what was used so far from `usage.json`.
    pub fn load(dir: &ConfigDir) -> Result<Self, ConfigError> {
        let usage = dir.load_json(USAGE_FILE)?.unwrap_or_default();
        Ok(Self {
            dir: dir.clone(),
            usage: Arc::new(Mutex::new(usage)),
            saving: Arc::new(Mutex::new(())),
        })
    }

    /// A meter that starts from zero (when `usage.json` cannot be read).
    pub fn empty(dir: &ConfigDir) -> Self {
        Self {
            dir: dir.clone(),
            usage: Arc::default(),
            saving: Arc::default(),
        }
    }

    fn usage_map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Usage>> {
        self.usage.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What `user` used so far.
    pub fn used(&self, user: &str) -> Usage {
        self.usage_map().get(user).cloned().unwrap_or_default()
    }

    /// `Err` when `user`'s budget is spent. No budget set means no limit beyond the key's own.
    pub fn check(&self, user: &str) -> Result<(), BudgetSpent> {
        let budget = match budgets(&self.dir) {
            Ok(b) => b.get(user).copied(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the budgets; refusing shared use until it is fixed");
                Some(Budget::Tokens(0))
            }
        };
        let used = self.used(user);
        match budget {
            Some(budget) if budget.spent(&used) => Err(BudgetSpent {
                user: user.to_owned(),
                used,
                budget,
            }),
            _ => Ok(()),
        }
    }

    /// Adds `delta` to `user`'s usage and saves it (off the async threads when there are some).
    pub fn add(&self, user: &str, delta: &Usage) {
        {
            let mut map = self.usage_map();
            let u = map.entry(user.to_owned()).or_default();
            u.input_tokens += delta.input_tokens;
            u.output_tokens += delta.output_tokens;
            u.cache_tokens += delta.cache_tokens;
            u.usd += delta.usd;
            u.requests += delta.requests;
        }
        let meter = self.clone();
        let save = move || meter.save();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(save)),
            Err(_) => save(),
        }
    }

    /// Writes the current totals; each write takes them when it runs, so the last write is the newest.
    fn save(&self) {
        let _one_at_a_time = self.saving.lock().unwrap_or_else(|p| p.into_inner());
        let snapshot = self.usage_map().clone();
        if let Err(e) = self.dir.store_json(USAGE_FILE, &snapshot, 0o600) {
            tracing::warn!(error = %e, "cannot save shared-task usage");
        }
    }
}

/// The owner's budgets, by grantee id.
pub fn budgets(dir: &ConfigDir) -> Result<BTreeMap<String, Budget>, ConfigError> {
    Ok(dir.load_json(BUDGETS_FILE)?.unwrap_or_default())
}

/// Sets (or, with `None`, removes) `user`'s budget.
pub fn set_budget(dir: &ConfigDir, user: &str, budget: Option<Budget>) -> Result<(), ConfigError> {
    let mut all = budgets(dir)?;
    match budget {
        Some(b) => all.insert(user.to_owned(), b),
        None => all.remove(user),
    };
    dir.store_json(BUDGETS_FILE, &all, 0o600)
}

/// Reads the usage a streamed Messages API response reports, as it passes: `message_start` carries the input
/// (and cache) tokens and the model, each `message_delta` the output tokens so far.
#[derive(Debug, Default)]
pub struct UsageScan {
    line: Vec<u8>,
    model: String,
    input: u64,
    cache_write: u64,
    cache_read: u64,
    output: u64,
}

/// Longest SSE line kept for parsing; usage lines are short, and longer ones (text deltas) are skipped.
const MAX_SCAN_LINE: usize = 64 * 1024;

impl UsageScan {
    /// Feeds response bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                let line = std::mem::take(&mut self.line);
                self.on_line(&line);
            } else if self.line.len() < MAX_SCAN_LINE {
                self.line.push(b);
            }
        }
    }

    fn on_line(&mut self, line: &[u8]) {
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
            return;
        };
        let n = |u: &serde_json::Value, k: &str| u[k].as_u64().unwrap_or(0);
        match v["type"].as_str() {
            Some("message_start") => {
                let m = &v["message"];
                self.model = m["model"].as_str().unwrap_or_default().to_owned();
                let u = &m["usage"];
                self.input = n(u, "input_tokens");
                self.cache_write = n(u, "cache_creation_input_tokens");
                self.cache_read = n(u, "cache_read_input_tokens");
                self.output = self.output.max(n(u, "output_tokens"));
            }
            Some("message_delta") => {
                self.output = self.output.max(n(&v["usage"], "output_tokens"));
            }
            _ => {}
        }
    }

    /// Everything seen so far, as usage of one request.
    pub fn usage(&self) -> Usage {
        let mut u = cost(
            &self.model,
            self.input,
            self.cache_write,
            self.cache_read,
            self.output,
        );
        u.requests = 1;
        u
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_parse_in_dollars_or_tokens() {
        assert_eq!(Budget::parse("5usd"), Ok(Budget::Usd(5.0)));
        assert_eq!(Budget::parse("$2.50"), Ok(Budget::Usd(2.5)));
        assert_eq!(Budget::parse("200000tokens"), Ok(Budget::Tokens(200_000)));
        assert_eq!(Budget::parse("200k"), Ok(Budget::Tokens(200_000)));
        assert_eq!(Budget::parse("1m"), Ok(Budget::Tokens(1_000_000)));
        for bad in ["", "5", "-1usd", "nanusd", "lots", "99999999999999999999m"] {
            assert!(Budget::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn usage_is_read_from_the_stream_even_in_pieces() {
        let sse = concat!(
            "event: message_start\n",
            "data: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-sonnet-4-5\",\"usage\":",
            "{\"input_tokens\":1000,\"cache_creation_input_tokens\":200,\"cache_read_input_tokens\":0,\"output_tokens\":1}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"hi\"}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":500}}\n\n",
        );
        let mut scan = UsageScan::default();
        for piece in sse.as_bytes().chunks(7) {
            scan.feed(piece);
        }
        let u = scan.usage();
        assert_eq!(
            (u.input_tokens, u.output_tokens, u.cache_tokens),
            (1000, 500, 200)
        );
        let want = (1000.0 * 3.0 + 200.0 * 3.75 + 500.0 * 15.0) / 1e6;
        assert!((u.usd - want).abs() < 1e-12, "{}", u.usd);
        assert!(Budget::Tokens(1700).spent(&u));
        assert!(!Budget::Tokens(1701).spent(&u));
    }
}
