//! Long output (a tool's result, a diff, a log) in a task thread: a couple of messages when it is short
//! enough to read in place, otherwise a file attachment within the upload limit Discord reported for the
//! interaction (`attachment_size_limit`), cut with a note when even that is too small.

use crate::split::split;

/// Discord's upload limit without boosts; used when no interaction told us the guild's (e.g. after the
/// 15-minute interaction token expired and the task posts through channel messages).
pub const DEFAULT_ATTACHMENT_LIMIT: u64 = 10 * 1024 * 1024;
/// More messages than this for one output would bury the conversation; use a file instead.
pub const MAX_INLINE_MESSAGES: usize = 2;

/// What the output is; decides the code-block language and the file extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    /// Prose (markdown).
    Text,
    /// A unified diff.
    Diff,
    /// Command or tool output.
    Log,
}

impl OutputKind {
    fn extension(self) -> &'static str {
        match self {
            Self::Text => "md",
            Self::Diff => "diff",
            Self::Log => "txt",
        }
    }
}

/// Where the output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// Message contents, in order.
    Messages(Vec<String>),
    /// One file, and the line to post with it.
    Attachment {
        filename: String,
        data: Vec<u8>,
        note: String,
    },
}

pub(crate) fn size(n: u64) -> String {
    match n {
        0..=1023 => format!("{n} B"),
        1024..=1_048_575 => format!("{:.1} KiB", n as f64 / 1024.0),
        _ => format!("{:.1} MiB", n as f64 / 1_048_576.0),
    }
}

/// A file name from `name`: letters, digits, `-`, `_` and `.` only (Discord and every OS accept it), at most
/// 60 characters, with the kind's extension.
fn filename(name: &str, kind: OutputKind) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .take(60)
        .collect();
    let clean = clean.trim_matches(['.', '_']);
    let stem = if clean.is_empty() { "output" } else { clean };
    format!("{stem}.{}", kind.extension())
}

/// Decides how to post `text`. `name` becomes the file name if it is attached; `limit` is the upload limit
/// in bytes.
pub fn place(text: &str, kind: OutputKind, name: &str, limit: u64) -> Placement {
    let wrapped = match kind {
        OutputKind::Text => text.to_string(),
        OutputKind::Diff => format!("```diff\n{}\n```", text.trim_end_matches('\n')),
        OutputKind::Log => format!("```\n{}\n```", text.trim_end_matches('\n')),
    };
    let parts = split(&wrapped);
    if parts.len() <= MAX_INLINE_MESSAGES {
        return Placement::Messages(parts);
    }
    let filename = filename(name, kind);
    let total = text.len() as u64;
    if total <= limit {
        return Placement::Attachment {
            note: format!("📎 `{filename}` ({})", size(total)),
            filename,
            data: text.as_bytes().to_vec(),
        };
    }
    let marker = format!("\n\n[… cut here: the full output was {} bytes]\n", total);
    let keep = usize::try_from(limit)
        .unwrap_or(usize::MAX)
        .saturating_sub(marker.len());
    let mut cut = keep.min(text.len());
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut data = text.as_bytes()[..cut].to_vec();
    data.extend_from_slice(marker.as_bytes());
    Placement::Attachment {
        note: format!(
            "📎 `{filename}`: the first {} of {} (this server's upload limit is {})",
            size(cut as u64),
            size(total),
            size(limit)
        ),
        filename,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_output_stays_in_messages() {
        let p = place(
            "ok\n",
            OutputKind::Log,
            "cargo test",
            DEFAULT_ATTACHMENT_LIMIT,
        );
        assert_eq!(p, Placement::Messages(vec!["```\nok\n```".into()]));
        let diff = "-a\n+b\n".repeat(300); // ~1800 characters in a fence: 2 messages at most
        let Placement::Messages(m) = place(&diff, OutputKind::Diff, "d", DEFAULT_ATTACHMENT_LIMIT)
        else {
            panic!("expected messages")
        };
        assert!(m.len() <= 2 && m[0].starts_with("```diff\n"));
    }

    #[test]
    fn long_output_becomes_an_attachment() {
        let log = "line of output\n".repeat(1000); // 15,000 characters
        let Placement::Attachment {
            filename,
            data,
            note,
        } = place(
            &log,
            OutputKind::Log,
            "Bash: cargo test --all",
            DEFAULT_ATTACHMENT_LIMIT,
        )
        else {
            panic!("expected an attachment")
        };
        assert_eq!(filename, "Bash__cargo_test_--all.txt");
        assert_eq!(data, log.as_bytes());
        assert_eq!(note, "📎 `Bash__cargo_test_--all.txt` (14.6 KiB)");
    }

    #[test]
    fn too_big_even_for_a_file_is_cut_with_a_note() {
        let text = "é".repeat(20_000); // 40,000 bytes
        let limit = 10_001; // odd, so the cut lands inside a two-byte character
        let Placement::Attachment { data, note, .. } = place(&text, OutputKind::Text, "", limit)
        else {
            panic!("expected an attachment")
        };
        assert!(data.len() as u64 <= limit);
        let s = String::from_utf8(data).expect("cut at a character boundary");
        assert!(s.ends_with("[… cut here: the full output was 40000 bytes]\n"));
        assert!(note.contains("of 39.1 KiB"), "{note}");
        assert!(note.contains("output.md"));
    }
}
