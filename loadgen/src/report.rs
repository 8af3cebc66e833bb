//! The table every run prints: one row per figure, with its goal and whether the goal was met.

use std::fmt;

/// Whether a figure meets its goal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Met,
    Missed,
    /// Reported for comparison; there is no goal.
    Info,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Met => "met",
            Verdict::Missed => "**missed**",
            Verdict::Info => "",
        })
    }
}

/// One figure.
#[derive(Debug, Clone)]
pub struct Row {
    pub scenario: String,
    pub metric: String,
    pub goal: String,
    pub measured: String,
    pub verdict: Verdict,
}

/// Rows in the order they were measured.
#[derive(Debug, Default)]
pub struct Report {
    pub rows: Vec<Row>,
}

impl Report {
    /// A figure with a goal: `met` says whether it was reached.
    pub fn goal(&mut self, scenario: &str, metric: &str, goal: &str, measured: String, met: bool) {
        self.rows.push(Row {
            scenario: scenario.into(),
            metric: metric.into(),
            goal: goal.into(),
            measured,
            verdict: if met { Verdict::Met } else { Verdict::Missed },
        });
    }

    /// A figure reported for context.
    pub fn info(&mut self, scenario: &str, metric: &str, measured: String) {
        self.rows.push(Row {
            scenario: scenario.into(),
            metric: metric.into(),
            goal: String::new(),
            measured,
            verdict: Verdict::Info,
        });
    }

    pub fn extend(&mut self, other: Report) {
        self.rows.extend(other.rows);
    }
}

impl fmt::Display for Report {
    /// A Markdown table; the scenario is named once per group of rows.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "| scenario | figure | goal | measured | |")?;
        writeln!(f, "|---|---|---|---|---|")?;
        let mut last = "";
        for r in &self.rows {
            let scenario = if r.scenario == last { "" } else { &r.scenario };
            last = &r.scenario;
            writeln!(
                f,
                "| {scenario} | {} | {} | {} | {} |",
                r.metric, r.goal, r.measured, r.verdict
            )?;
        }
        Ok(())
    }
}
