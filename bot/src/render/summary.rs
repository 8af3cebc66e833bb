//! The embed posted when a task ends. Every value is cut to fit Discord's embed limits (title 256,
//! description 4096, field values 1024, 6000 in total), so a long failure message or project path can never
//! make Discord refuse the summary.

use std::time::Duration;

use serenity::all::{
    ButtonStyle, Colour, CreateButton, CreateEmbed, CreateEmbedFooter, CreateMessage,
};

use super::progress::{Phase, TaskProgress};
use super::{human_duration, truncate};

/// What the summary shows besides the task's own figures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SummaryContext {
    pub agent: String,
    pub project: String,
    /// Wall-clock time from submission to the end.
    pub elapsed: Duration,
}

fn colour(phase: Phase) -> Colour {
    match phase {
        Phase::Done => Colour::from_rgb(0x2e, 0xa0, 0x43),
        Phase::Failed | Phase::Lost => Colour::from_rgb(0xd2, 0x2d, 0x2d),
        Phase::Cancelled => Colour::from_rgb(0x80, 0x80, 0x80),
        _ => Colour::from_rgb(0x3b, 0x82, 0xf6),
    }
}

/// `$0.0123`, `$1.50`: cents matter for short tasks.
pub(crate) fn money(usd: f64) -> String {
    if usd < 1.0 {
        format!("${usd:.4}")
    } else {
        format!("${usd:.2}")
    }
}

/// `12.3k`: token counts at a glance.
pub(crate) fn count(n: u64) -> String {
    match n {
        0..=9_999 => n.to_string(),
        10_000..=999_999 => format!("{:.1}k", n as f64 / 1000.0),
        _ => format!("{:.1}M", n as f64 / 1_000_000.0),
    }
}

/// The summary embed for a finished (or still running, for `/status`) task.
pub fn summary_embed(p: &TaskProgress, ctx: &SummaryContext) -> CreateEmbed {
    let title = format!("{} {} · {}", p.phase.icon(), p.phase.label(), p.task);
    let field = |v: String| truncate(&v, 1024);
    let mut e = CreateEmbed::new()
        .title(truncate(&title, 256))
        .colour(colour(p.phase))
        .field("Duration", human_duration(ctx.elapsed), true)
        .field("Turns", p.turns.to_string(), true)
        .field("Cost", money(p.cost_usd), true)
        .field(
            "Tokens",
            format!(
                "{} in · {} out",
                count(p.input_tokens),
                count(p.output_tokens)
            ),
            true,
        )
        .field(
            "Model",
            field(p.model.clone().unwrap_or_else(|| "—".into())),
            true,
        )
        .field("Agent", field(ctx.agent.clone()), true)
        .field("Project", field(ctx.project.clone()), true);
    if let Some(w) = &p.worktree {
        let mut value = crate::render::escape::inline_code(&w.branch, 200);
        if let Some(c) = &w.change {
            value.push_str(&format!(
                " · {} file{} changed, +{} −{}",
                c.files_changed,
                if c.files_changed == 1 { "" } else { "s" },
                c.insertions,
                c.deletions
            ));
            if w.diff_cut {
                value.push_str(" (the attached diff is cut)");
            }
        }
        if let Some(note) = &w.note {
            value.push_str(&format!("\n{note}"));
        }
        e = e.field("Branch", field(value), false);
    }
    if let Some(m) = &p.message {
        e = e.description(truncate(m, 1500));
    }
    if let Some(s) = &p.session_id {
        // Lets a user resume the same session from their own terminal (`claude --resume <id>`).
        e = e.footer(CreateEmbedFooter::new(truncate(
            &format!("session {s}"),
            200,
        )));
    }
    e
}

/// The "Full output" button under a summary: the task's whole transcript, for whoever may see the task (the
/// relay checks who clicks). `None` for a task id that cannot be carried in a button.
pub fn full_output_button(task: &str) -> Option<CreateButton> {
    let id = crate::custom_id::Action::FullOutput {
        task: task.to_string(),
    }
    .encode()
    .ok()?;
    Some(
        CreateButton::new(id)
            .label("Full output")
            .emoji('📜')
            .style(ButtonStyle::Secondary),
    )
}

/// `msg` (a summary) with the [`full_output_button`] added after any buttons it has.
pub fn with_full_output(msg: CreateMessage, task: &str) -> CreateMessage {
    match full_output_button(task) {
        Some(button) => msg.button(button),
        None => msg,
    }
}

#[cfg(test)]
mod tests {
    use ct_protocol::task::{FinalState, TaskEvent};
    use serde_json::json;

    use super::*;

    fn ctx(agent: &str, project: &str) -> SummaryContext {
        SummaryContext {
            agent: agent.into(),
            project: project.into(),
            elapsed: Duration::from_secs(125),
        }
    }

    fn done() -> TaskProgress {
        let mut p = TaskProgress::new("t_abc");
        p.apply(&TaskEvent::Session {
            session_id: "0b6c-session".into(),
            model: Some("claude-sonnet-4".into()),
            claude_version: None,
        });
        p.apply(&TaskEvent::TurnFinished {
            is_error: false,
            subtype: "success".into(),
            text: None,
            cost_usd: Some(0.0123),
            turns: Some(4),
            input_tokens: Some(12_345),
            output_tokens: Some(678),
            duration_ms: Some(9000),
        });
        p.apply(&TaskEvent::Finished {
            state: FinalState::Done,
            message: None,
        });
        p
    }

    #[test]
    fn shows_every_figure() {
        let v = serde_json::to_value(summary_embed(&done(), &ctx("laptop", "web"))).unwrap();
        assert_eq!(v["title"], "✅ Done · t_abc");
        let fields: Vec<(String, String)> = v["fields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                (
                    f["name"].as_str().unwrap().into(),
                    f["value"].as_str().unwrap().into(),
                )
            })
            .collect();
        let get = |n: &str| fields.iter().find(|(k, _)| k == n).unwrap().1.clone();
        assert_eq!(get("Duration"), "2m 05s");
        assert_eq!(get("Turns"), "4");
        assert_eq!(get("Cost"), "$0.0123");
        assert_eq!(get("Tokens"), "12.3k in · 678 out");
        assert_eq!(get("Model"), "claude-sonnet-4");
        assert_eq!(get("Agent"), "laptop");
        assert_eq!(get("Project"), "web");
        assert_eq!(v["footer"]["text"], "session 0b6c-session");
    }

    #[test]
    fn names_the_branch_and_its_change_and_stays_within_limits() {
        let mut p = done();
        p.apply(&TaskEvent::Worktree {
            branch: "ct/t_abc".into(),
            base: "abc".into(),
            note: None,
            change: Some(ct_protocol::task::DiffStat {
                files_changed: 2,
                insertions: 3,
                deletions: 1,
            }),
            diff: Some("+x".into()),
            diff_cut: true,
        });
        let v = serde_json::to_value(summary_embed(&p, &ctx("laptop", "web"))).unwrap();
        let branch = v["fields"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == "Branch")
            .expect("a Branch field")["value"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(
            branch,
            "`ct/t_abc` · 2 files changed, +3 −1 (the attached diff is cut)"
        );
        // A branch name and note from the agent cannot break the embed.
        p.apply(&TaskEvent::Worktree {
            branch: "b".repeat(5000),
            base: "abc".into(),
            note: Some("n".repeat(5000)),
            change: None,
            diff: None,
            diff_cut: false,
        });
        let body = json!({"embeds": [summary_embed(&p, &ctx("laptop", "web"))]});
        if let Err(err) = ct_testkit::discord::limits::check_message(&body, 0, false) {
            panic!("Discord would refuse the summary: {}", err.body);
        }
    }

    #[test]
    fn stays_within_embed_limits_whatever_the_input() {
        let mut p = done();
        p.task = "t".repeat(300);
        p.model = Some("m".repeat(5000));
        p.message = Some("why ".repeat(3000));
        p.session_id = Some("s".repeat(3000));
        let e = summary_embed(&p, &ctx(&"a".repeat(2000), &"/very/long/path".repeat(200)));
        let body = json!({"embeds": [e]});
        if let Err(err) = ct_testkit::discord::limits::check_message(&body, 0, false) {
            panic!("Discord would refuse the summary: {}", err.body);
        }
    }
}
