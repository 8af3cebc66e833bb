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

/// How much: dollars or tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Amount {
    /// US dollars, estimated at list prices.
    Usd(f64),
    /// Tokens of every kind (input, output, cache).
    Tokens(u64),
}

/// Over what time a budget is counted: everything ever, or a calendar day or month in UTC (a pool's budgets
/// start again at midnight UTC, the same moment for every user wherever they are).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    #[default]
    Total,
    Day,
    Month,
}

/// How much a person's tasks may use, per period. Stored in `budgets.json` as the amount's fields plus the
/// period (`{"usd":5.0,"period":"day"}`); files written before periods existed read as totals.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Budget {
    #[serde(flatten)]
    pub amount: Amount,
    #[serde(default)]
    pub period: Period,
}

impl Budget {
    /// `amount` for everything ever spent.
    pub fn total(amount: Amount) -> Self {
        Self {
            amount,
            period: Period::Total,
        }
    }

    /// `5usd`, `$5`, `2.50usd`, `200000tokens`, `200k` (tokens), each optionally per period: `5usd/day`,
    /// `200k/month` (`/total`, the default, counts everything ever).
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim().to_ascii_lowercase().replace(['_', ','], "");
        let bad = || {
            format!(
                "`{text}` is not a budget: give dollars (`5usd`, `$2.50`) or tokens (`200000tokens`, `200k`), \
                 optionally per day or month (`5usd/day`, `200000tokens/month`)"
            )
        };
        let (t, period) = match t.split_once('/') {
            None => (t.as_str(), Period::Total),
            Some((amount, per)) => {
                let period = match per.trim() {
                    "day" | "d" | "daily" => Period::Day,
                    "month" | "mo" | "monthly" => Period::Month,
                    "total" => Period::Total,
                    _ => return Err(bad()),
                };
                (amount.trim(), period)
            }
        };
        let amount = if let Some(n) = t.strip_prefix('$').or_else(|| t.strip_suffix("usd")) {
            let usd: f64 = n.trim().parse().map_err(|_| bad())?;
            if !(usd.is_finite() && usd >= 0.0) {
                return Err(bad());
            }
            Amount::Usd(usd)
        } else {
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
            Amount::Tokens(n.checked_mul(scale).ok_or_else(bad)?)
        };
        Ok(Self { amount, period })
    }

    /// Whether `used` (in this budget's period) has reached this budget.
    pub fn spent(&self, used: &Usage) -> bool {
        match self.amount {
            Amount::Usd(limit) => used.usd >= limit,
            Amount::Tokens(limit) => used.tokens() >= limit,
        }
    }

    /// What is left of it after `used`, in words (`$3.20`, `120000 tokens`).
    pub fn left(&self, used: &Usage) -> String {
        match self.amount {
            Amount::Usd(limit) => format!("${:.2}", (limit - used.usd).max(0.0)),
            Amount::Tokens(limit) => format!("{} tokens", limit.saturating_sub(used.tokens())),
        }
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Amount::Usd(usd) => write!(f, "${usd:.2}"),
            Amount::Tokens(t) => write!(f, "{t} tokens"),
        }
    }
}

impl fmt::Display for Budget {
    /// `$5.00`, `$5.00 a day`, `1000 tokens a month`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.period {
            Period::Total => write!(f, "{}", self.amount),
            Period::Day => write!(f, "{} a day", self.amount),
            Period::Month => write!(f, "{} a month", self.amount),
        }
    }
}

/// Days since 1970-01-01 as (year, month 1..=12, day 1..=31), proleptic Gregorian (H. Hinnant's algorithm).
pub(crate) fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Days since 1970-01-01 of a civil date (the inverse of [`civil`]).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl Period {
    /// The name of the period holding Unix time `now` (`2026-12-07`, `2026-12`; `None` for totals), which is
    /// how usage is kept per period.
    pub fn key(&self, now: u64) -> Option<String> {
        let (y, m, d) = civil((now / 86_400) as i64);
        match self {
            Period::Total => None,
            Period::Day => Some(format!("{y:04}-{m:02}-{d:02}")),
            Period::Month => Some(format!("{y:04}-{m:02}")),
        }
    }

    /// When the period holding `now` ends (Unix seconds), for days and months.
    pub fn resets_at(&self, now: u64) -> Option<u64> {
        let today = (now / 86_400) as i64;
        let next = match self {
            Period::Total => return None,
            Period::Day => today + 1,
            Period::Month => {
                let (y, m, _) = civil(today);
                let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                days_from_civil(y, m, 1)
            }
        };
        u64::try_from(next * 86_400).ok()
    }
}

/// Now, in Unix seconds.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// When a period that ends at `at` starts again, in words: `at 00:00 UTC` for tomorrow, else the date.
fn reset_words(period: Period, at: u64) -> String {
    let (y, m, d) = civil((at / 86_400) as i64);
    match period {
        Period::Day => "at 00:00 UTC".into(),
        _ => format!("on {y:04}-{m:02}-{d:02} at 00:00 UTC"),
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

    fn add(&mut self, delta: &Usage) {
        self.input_tokens += delta.input_tokens;
        self.output_tokens += delta.output_tokens;
        self.cache_tokens += delta.cache_tokens;
        self.usd += delta.usd;
        self.requests += delta.requests;
    }
}

/// What one person used: everything ever (the fields `usage.json` always had), and the current UTC day and
/// month, each named (`2026-12-07`, `2026-12`) so that a new period starts from zero. Only the current day
/// and month are kept, so the file stays as small as the number of people.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    #[serde(flatten)]
    pub total: Usage,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub day: Option<(String, Usage)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub month: Option<(String, Usage)>,
}

impl Record {
    /// What was used in `period` as of `now`.
    pub fn in_period(&self, period: Period, now: u64) -> Usage {
        let slot = match period {
            Period::Total => return self.total.clone(),
            Period::Day => &self.day,
            Period::Month => &self.month,
        };
        match (slot, period.key(now)) {
            (Some((key, used)), Some(now)) if *key == now => used.clone(),
            _ => Usage::default(),
        }
    }

    fn add(&mut self, delta: &Usage, now: u64) {
        self.total.add(delta);
        for (slot, period) in [
            (&mut self.day, Period::Day),
            (&mut self.month, Period::Month),
        ] {
            let key = period.key(now).unwrap_or_default();
            match slot {
                Some((k, used)) if *k == key => used.add(delta),
                _ => *slot = Some((key, delta.clone())),
            }
        }
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

/// Why a request or a task is refused: the person's budget is spent.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetSpent {
    pub user: String,
    /// What was used in the budget's period.
    pub used: Usage,
    pub budget: Budget,
    /// When the period starts again (Unix seconds), for budgets per day or month.
    pub resets_at: Option<u64>,
    /// Spent on a pool worker (whose operator sets budgets for everyone), not on someone's shared agent.
    pub pool: bool,
}

impl fmt::Display for BudgetSpent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let spent = match self.budget.amount {
            Amount::Usd(_) => format!("${:.2} spent", self.used.usd),
            Amount::Tokens(_) => format!("{} tokens used", self.used.tokens()),
        };
        let resets = self
            .resets_at
            .map(|at| format!("; it resets {}", reset_words(self.budget.period, at)))
            .unwrap_or_default();
        if self.pool {
            write!(
                f,
                "your pool budget of {} is used up ({spent}){resets}. Ask the pool's operator for more if you \
                 need it sooner",
                self.budget
            )
        } else {
            write!(
                f,
                "the budget the owner of this agent set for your shared tasks is spent ({spent} of {}){resets}: \
                 ask them to raise it on that machine with `ct-agent sharing budget {} <amount>`",
                self.budget, self.user
            )
        }
    }
}

impl std::error::Error for BudgetSpent {}

/// The meter: budgets (re-read on every check, so `ct-agent sharing budget` applies at once) and usage.
/// Cheap to clone.
#[derive(Debug, Clone)]
pub struct Meter {
    dir: ConfigDir,
    usage: Arc<Mutex<BTreeMap<String, Record>>>,
    /// The budget of everyone without one of their own (a pool worker's `--budget-per-user`).
    default: Option<Budget>,
    /// A pool worker's meter: refusals speak of the pool's budget.
    pool: bool,
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
            default: None,
            pool: false,
            saving: Arc::new(Mutex::new(())),
        })
    }

    /// A meter that starts from zero (when `usage.json` cannot be read).
    pub fn empty(dir: &ConfigDir) -> Self {
        Self {
            dir: dir.clone(),
            usage: Arc::default(),
            default: None,
            pool: false,
            saving: Arc::default(),
        }
    }

    /// This meter for a pool worker: `default` applies to every user without a budget of their own in
    /// `budgets.json` (`ct-agent sharing budget ID ...` overrides it per user).
    pub fn for_pool(mut self, default: Option<Budget>) -> Self {
        self.default = default;
        self.pool = true;
        self
    }

    fn usage_map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Record>> {
        self.usage.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What `user` used so far, in total.
    #[cfg(test)]
    pub fn used(&self, user: &str) -> Usage {
        self.record(user).total
    }

    /// Everything kept of `user`'s use.
    pub fn record(&self, user: &str) -> Record {
        self.usage_map().get(user).cloned().unwrap_or_default()
    }

    /// The budget that applies to `user`: their own, else the default. A budgets file that cannot be read
    /// gives a budget of nothing, so a broken file stops spending instead of lifting every limit.
    pub fn budget_of(&self, user: &str) -> Option<Budget> {
        match budgets(&self.dir) {
            Ok(b) => b.get(user).copied().or(self.default),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the budgets; refusing shared use until it is fixed");
                Some(Budget::total(Amount::Tokens(0)))
            }
        }
    }

    /// `Err` when `user`'s budget is spent. No budget set means no limit beyond the key's own.
    pub fn check(&self, user: &str) -> Result<(), BudgetSpent> {
        self.check_at(user, now_secs())
    }

    /// [`Meter::check`] as of Unix time `now`.
    pub fn check_at(&self, user: &str, now: u64) -> Result<(), BudgetSpent> {
        let Some(budget) = self.budget_of(user) else {
            return Ok(());
        };
        let used = self.record(user).in_period(budget.period, now);
        if budget.spent(&used) {
            return Err(BudgetSpent {
                user: user.to_owned(),
                used,
                budget,
                resets_at: budget.period.resets_at(now),
                pool: self.pool,
            });
        }
        Ok(())
    }

    /// What `user` spent in their budget's period (the day or month under way; everything for a total budget
    /// or none), with the budget and what is left of it, as `/usage` shows it.
    pub fn report(&self, user: &str) -> ct_protocol::project::UsageReport {
        let now = now_secs();
        let budget = self.budget_of(user);
        let period = budget.map_or(Period::Total, |b| b.period);
        let used = self.record(user).in_period(period, now);
        ct_protocol::project::UsageReport {
            spent_micro_usd: (used.usd * 1e6).round() as u64,
            input_tokens: used.input_tokens + used.cache_tokens,
            output_tokens: used.output_tokens,
            budget: budget.map(|b| b.to_string()),
            left: budget.map(|b| b.left(&used)),
            resets_at: period.resets_at(now),
        }
    }

    /// Adds `delta` to `user`'s usage and saves it (off the async threads when there are some).
    pub fn add(&self, user: &str, delta: &Usage) {
        self.usage_map()
            .entry(user.to_owned())
            .or_default()
            .add(delta, now_secs());
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
        let total = |a| Ok(Budget::total(a));
        assert_eq!(Budget::parse("5usd"), total(Amount::Usd(5.0)));
        assert_eq!(Budget::parse("$2.50"), total(Amount::Usd(2.5)));
        assert_eq!(
            Budget::parse("200000tokens"),
            total(Amount::Tokens(200_000))
        );
        assert_eq!(Budget::parse("200k"), total(Amount::Tokens(200_000)));
        assert_eq!(Budget::parse("1m"), total(Amount::Tokens(1_000_000)));
        let per = |amount, period| Ok(Budget { amount, period });
        assert_eq!(
            Budget::parse("5usd/day"),
            per(Amount::Usd(5.0), Period::Day)
        );
        assert_eq!(
            Budget::parse("200000tokens/month"),
            per(Amount::Tokens(200_000), Period::Month)
        );
        assert_eq!(
            Budget::parse("5usd/day").unwrap().to_string(),
            "$5.00 a day"
        );
        for bad in [
            "",
            "5",
            "-1usd",
            "nanusd",
            "lots",
            "99999999999999999999m",
            "5usd/week",
            "/day",
        ] {
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
        assert!(Budget::total(Amount::Tokens(1700)).spent(&u));
        assert!(!Budget::total(Amount::Tokens(1701)).spent(&u));
    }

    #[test]
    fn budgets_written_before_periods_read_as_totals_and_round_trip() {
        let old: BTreeMap<String, Budget> =
            serde_json::from_str(r#"{"200":{"usd":5.0},"300":{"tokens":7}}"#).unwrap();
        assert_eq!(old["200"], Budget::total(Amount::Usd(5.0)));
        assert_eq!(old["300"], Budget::total(Amount::Tokens(7)));
        let daily = Budget::parse("5usd/day").unwrap();
        let json = serde_json::to_string(&daily).unwrap();
        assert_eq!(json, r#"{"usd":5.0,"period":"day"}"#);
        assert_eq!(serde_json::from_str::<Budget>(&json).unwrap(), daily);
        let old_usage: BTreeMap<String, Record> = serde_json::from_str(
            r#"{"200":{"input_tokens":1,"output_tokens":2,"cache_tokens":0,"usd":0.5,"requests":1}}"#,
        )
        .unwrap();
        assert_eq!(old_usage["200"].total.tokens(), 3);
    }

    #[test]
    fn periods_are_utc_calendar_days_and_months() {
        // 2026-12-31T23:59:59Z and a second later.
        let eve = 1_798_761_599;
        assert_eq!(Period::Day.key(eve).unwrap(), "2026-12-31");
        assert_eq!(Period::Month.key(eve).unwrap(), "2026-12");
        assert_eq!(Period::Day.key(eve + 1).unwrap(), "2027-01-01");
        assert_eq!(Period::Day.resets_at(eve), Some(eve + 1));
        assert_eq!(Period::Month.resets_at(eve), Some(eve + 1));
        // 2024-02-10: a leap February ends on the 29th.
        let feb = 1_707_523_200;
        assert_eq!(Period::Day.key(feb).unwrap(), "2024-02-10");
        assert_eq!(
            Period::Month.resets_at(feb),
            Some(1_709_251_200) // 2024-03-01
        );
        assert_eq!(Period::Total.resets_at(feb), None);
    }

    #[test]
    fn a_daily_budget_counts_today_only_and_says_when_it_resets() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = ConfigDir::open(tmp.path()).unwrap();
        let meter = Meter::empty(&dir).for_pool(Some(Budget::parse("100tokens/day").unwrap()));
        let day1 = 1_798_700_000; // 2026-12-31
        let spend = Usage {
            input_tokens: 60,
            output_tokens: 50,
            ..Usage::default()
        };
        meter
            .usage_map()
            .entry("7".into())
            .or_default()
            .add(&spend, day1);
        let spent = meter.check_at("7", day1).unwrap_err();
        let text = spent.to_string();
        assert!(
            text.contains("your pool budget of 100 tokens a day is used up (110 tokens used)")
                && text.contains("resets at 00:00 UTC"),
            "{text}"
        );
        // The next UTC day starts from zero; the total keeps counting.
        assert!(meter.check_at("7", day1 + 86_400).is_ok());
        assert_eq!(meter.used("7").tokens(), 110);
        // A budget of one's own overrides the pool's default.
        set_budget(&dir, "7", Some(Budget::parse("1000tokens/day").unwrap())).unwrap();
        assert!(meter.check_at("7", day1).is_ok());
        // Someone else still has the default.
        meter
            .usage_map()
            .entry("8".into())
            .or_default()
            .add(&spend, day1);
        assert!(meter.check_at("8", day1).is_err());
    }
}
