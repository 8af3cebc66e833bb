//! Summaries of measured samples (percentiles) and the units figures are printed in.

use std::time::Duration;

/// Percentiles of a set of durations.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Summary {
    pub count: usize,
    pub p50: Duration,
    pub p95: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl Summary {
    /// Nearest-rank percentiles; an empty set gives zeros and a count of 0.
    pub fn of(mut samples: Vec<Duration>) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_unstable();
        let rank = |p: f64| {
            let i = ((p / 100.0) * samples.len() as f64).ceil() as usize;
            samples[i.clamp(1, samples.len()) - 1]
        };
        Self {
            count: samples.len(),
            p50: rank(50.0),
            p95: rank(95.0),
            p99: rank(99.0),
            max: *samples.last().expect("not empty"),
        }
    }
}

/// "0.42 ms", "1.3 s".
pub fn dur(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else if ms < 1000.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{:.2} s", ms / 1000.0)
    }
}

/// "23.4 KiB", "5.1 MiB".
pub fn kib(k: f64) -> String {
    if k.abs() < 1024.0 {
        format!("{k:.1} KiB")
    } else {
        format!("{:.1} MiB", k / 1024.0)
    }
}

/// Thousands separated: "10,000".
pub fn count(n: u64) -> String {
    let digits = n.to_string();
    let lead = match digits.len() % 3 {
        0 => 3,
        r => r,
    };
    let mut out = digits[..lead].to_string();
    for group in digits.as_bytes()[lead..].chunks(3) {
        out.push(',');
        out.push_str(std::str::from_utf8(group).expect("ASCII digits"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s = Summary::of((1..=100).map(Duration::from_millis).collect());
        assert_eq!(s.p50, Duration::from_millis(50));
        assert_eq!(s.p99, Duration::from_millis(99));
        assert_eq!(s.max, Duration::from_millis(100));
        assert_eq!(Summary::of(vec![]).count, 0);
    }

    #[test]
    fn units() {
        assert_eq!(count(10_000), "10,000");
        assert_eq!(count(999), "999");
        assert_eq!(dur(Duration::from_micros(420)), "0.42 ms");
        assert_eq!(kib(2048.0), "2.0 MiB");
    }
}
