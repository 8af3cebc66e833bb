//! Text that Claude Code or the model wrote (commands, paths, descriptions) shown in Discord as exactly what
//! it is, never as Markdown and never with hidden characters.
//!
//! - Characters a reader cannot see, or that reorder what they see, are written out as `<U+XXXX>`: control
//!   characters (but line feed and tab), format characters (zero-width, bidirectional overrides and isolates,
//!   the BOM, tag characters...), other default-ignorable characters, line and paragraph separators, and every
//!   space but the plain one. So `rm -rf ~/<U+202E>txt.dab` (which shows reversed without it) cannot pass for a harmless file name.
//! - A fenced block cannot be broken out of: a run of backticks is split by a zero-width space of ours (the
//!   text's own zero-width spaces are shown as `<U+200B>`, so ours are the only invisible ones).
//! - An inline code span cannot hold a backtick at all, so it shows `ˋ` (U+02CB) instead; a real `ˋ` in the
//!   text is shown as `<U+02CB>`, so `ˋ` always means a backtick.

/// Our own separator between backticks inside a fenced block.
const ZWSP: char = '\u{200B}';
/// What a backtick looks like in an inline code span.
const BACKTICK_STAND_IN: char = 'ˋ';

/// Whether `c` is written out as `<U+XXXX>`.
pub fn hidden(c: char) -> bool {
    if c == '\n' || c == '\t' {
        return false;
    }
    c.is_control()
        || c == BACKTICK_STAND_IN
        || matches!(c as u32,
            // Format characters (Cf).
            0x00AD | 0x0600..=0x0605 | 0x061C | 0x06DD | 0x070F | 0x0890..=0x0891 | 0x08E2 | 0x180E
            | 0x200B..=0x200F | 0x202A..=0x202E | 0x2060..=0x206F | 0xFEFF | 0xFFF9..=0xFFFB
            | 0x110BD | 0x110CD | 0x13430..=0x1343F | 0x1BCA0..=0x1BCA3 | 0x1D173..=0x1D17A
            // Other default-ignorable characters: combining grapheme joiner, fillers, variation selectors, tags.
            | 0x034F | 0x115F..=0x1160 | 0x17B4..=0x17B5 | 0x180B..=0x180D | 0x180F | 0x3164
            | 0xFE00..=0xFE0F | 0xFFA0 | 0xE0000..=0xE0FFF
            // Line and paragraph separators, blank-looking characters, and spaces other than U+0020.
            | 0x2028 | 0x2029 | 0x2800 | 0x00A0 | 0x1680 | 0x2000..=0x200A | 0x202F | 0x205F | 0x3000)
}

fn code_point(c: char) -> String {
    format!("<U+{:04X}>", c as u32)
}

/// `text` with every [`hidden`] character written out.
pub fn visible(text: &str) -> String {
    text.chars()
        .map(|c| {
            if hidden(c) {
                code_point(c)
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// A fenced code block showing `text` exactly, taking at most `max` characters for the text. Returns the
/// block and whether the text was cut to fit.
pub fn code_block(text: &str, max: usize) -> (String, bool) {
    let mut body = String::new();
    let mut used = 0;
    let mut cut = false;
    let mut last = None;
    for c in text.chars() {
        let piece = if hidden(c) {
            code_point(c)
        } else if c == '`' && last == Some('`') {
            format!("{ZWSP}`")
        } else {
            c.to_string()
        };
        let n = piece.chars().count();
        if used + n > max {
            cut = true;
            break;
        }
        used += n;
        body.push_str(&piece);
        last = Some(c);
    }
    if body.trim().is_empty() {
        // An empty block would not render as one.
        body = if text.is_empty() {
            "(empty)".into()
        } else {
            "(only spaces)".into()
        };
    }
    (format!("```\n{body}\n```"), cut)
}

/// A one-line inline code span showing `text`: hidden characters written out, line breaks as `⏎`,
/// backticks as `ˋ`, at most `max` characters inside (ending with `…` when cut).
pub fn inline_code(text: &str, max: usize) -> String {
    let mut inner = String::new();
    let mut used = 0;
    for c in text.chars() {
        let piece = match c {
            '\n' => " ⏎ ".to_string(),
            '`' => BACKTICK_STAND_IN.to_string(),
            c if hidden(c) => code_point(c),
            c => c.to_string(),
        };
        let n = piece.chars().count();
        if used + n > max.saturating_sub(1) {
            inner.push('…');
            break;
        }
        used += n;
        inner.push_str(&piece);
    }
    if inner.trim().is_empty() {
        inner = "(empty)".into();
    }
    format!("`{inner}`")
}

/// The name a tool shows as (the CLI names its tools, but an MCP server names its own), with nothing that
/// Markdown or mentions could act on.
pub fn tool_name(name: &str) -> String {
    super::truncate(&visible(name), 60)
        .replace(['*', '_', '`', '~', '|', '<', '>', '@', '#', '['], "·")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invisible_and_bidirectional_characters_are_written_out() {
        let text = "rm -rf ~/\u{202E}txt.dab\u{200B} x\u{00A0}y\r\u{2066}z\u{E0041}";
        assert_eq!(
            visible(text),
            "rm -rf ~/<U+202E>txt.dab<U+200B> x<U+00A0>y<U+000D><U+2066>z<U+E0041>"
        );
        assert_eq!(visible("a\tb\nc é ü 日本"), "a\tb\nc é ü 日本");
        assert_eq!(visible("ˋ"), "<U+02CB>");
    }

    #[test]
    fn a_code_block_cannot_be_broken_out_of() {
        let (block, cut) = code_block("echo ```\n**bold** @everyone", 100);
        assert!(!cut);
        assert!(block.starts_with("```\n") && block.ends_with("\n```"));
        let inner = &block[4..block.len() - 4];
        assert!(!inner.contains("```"), "{inner}");
        assert!(!inner.contains("``"), "{inner}");
        assert_eq!(inner.replace(ZWSP, ""), "echo ```\n**bold** @everyone");
        // Cut on a whole character's rendering, and said so.
        let (block, cut) = code_block(&format!("{}\u{202E}", "a".repeat(10)), 15);
        assert!(cut);
        assert_eq!(block, format!("```\n{}\n```", "a".repeat(10)));
        assert_eq!(code_block("", 10).0, "```\n(empty)\n```");
    }

    #[test]
    fn inline_code_is_one_line_without_backticks() {
        assert_eq!(
            inline_code("echo `date`\nrm x", 100),
            "`echo ˋdateˋ ⏎ rm x`"
        );
        assert_eq!(
            inline_code("**x** [a](http://b)", 100),
            "`**x** [a](http://b)`"
        );
        let long = inline_code(&"x".repeat(500), 50);
        assert_eq!(long.chars().count(), 52);
        assert!(long.ends_with("…`"));
    }
}
