//! Splitting assistant text into Discord messages: at most [`MESSAGE_LIMIT`] characters each (Discord
//! counts characters, not bytes), cut at line boundaries where possible, and never leaving a code block
//! open across a cut: a part that ends inside a ```` ``` ```` block closes it, and the next part reopens it
//! with the same language tag, so each message renders as the reader expects.

/// Discord's limit on message content, in characters.
pub const MESSAGE_LIMIT: usize = 2000;

/// A language tag longer than this is not reopened in full (it would eat the part's budget; no real
/// language tag is this long).
const MAX_REOPEN_TAG: usize = 64;

/// One message of a split: the fence line added in front (reopening a block the previous part closed),
/// the input text it carries, and the fence line added at the end (closing a block left open).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Part {
    pub reopen: String,
    pub body: String,
    pub close: String,
}

impl Part {
    /// The message content.
    pub fn text(&self) -> String {
        format!("{}{}{}", self.reopen, self.body, self.close)
    }

    /// Characters in the message, as Discord counts them.
    pub fn char_count(&self) -> usize {
        self.reopen.chars().count() + self.body.chars().count() + self.close.chars().count()
    }
}

/// The message contents for `text` (empty input gives no messages).
pub fn split(text: &str) -> Vec<String> {
    split_parts(text, MESSAGE_LIMIT)
        .iter()
        .map(Part::text)
        .collect()
}

/// The parts for `text` with at most `limit` characters each. The bodies, joined, are exactly `text`.
///
/// `limit` must leave room for fence lines: at least 144 characters.
pub fn split_parts(text: &str, limit: usize) -> Vec<Part> {
    assert!(
        limit >= 2 * (MAX_REOPEN_TAG + 8),
        "limit {limit} is too small"
    );
    let mut out = Vec::new();
    let mut cur = Part::default();
    let mut cur_len = 0usize; // characters of reopen + body
    let mut fence: Option<String> = None; // open block's tag at the end of `cur.body`

    for line in text.split_inclusive('\n') {
        let line_len = line.chars().count();
        let after = toggle(fence.as_deref(), line);
        if cur_len + line_len + close_len(after.is_some(), line) <= limit {
            cur.body.push_str(line);
            cur_len += line_len;
            fence = after;
            continue;
        }
        // Start a new part for the line if it fits in one; a line too long for any part is cut, starting
        // in this part unless little room is left (no near-empty fragments).
        let fresh = reopen_len(fence.as_deref());
        let fits_fresh = fresh + line_len + close_len(after.is_some(), line) <= limit;
        if !cur.body.is_empty() && (fits_fresh || limit - cur_len < limit / 4) {
            finish(&mut out, &mut cur, fence.as_deref());
            cur_len = cur.reopen.chars().count();
        }
        if fits_fresh && cur.body.is_empty() {
            cur.body.push_str(line);
            cur_len += line_len;
            fence = after;
            continue;
        }
        // One line longer than a whole message: cut it into pieces, preferring spaces. Inside a block,
        // each piece ends without a newline, so its close needs one ("\n```", 4 characters).
        let mut rest = line;
        loop {
            let reserve = if fence.is_some() { 4 } else { 0 };
            let room = limit - cur_len - reserve;
            if rest.chars().count() + close_len(after.is_some(), rest) <= limit - cur_len {
                cur.body.push_str(rest);
                cur_len += rest.chars().count();
                fence = after;
                break;
            }
            let cut = cut_point(rest, room);
            cur.body.push_str(&rest[..cut]);
            rest = &rest[cut..];
            finish(&mut out, &mut cur, fence.as_deref());
            cur_len = cur.reopen.chars().count();
        }
    }
    if !cur.body.is_empty() {
        out.push(cur);
    }
    out
}

/// Length of the close line a part would need, given whether a block is open after `last` (its last text).
fn close_len(open: bool, last: &str) -> usize {
    match (open, last.ends_with('\n')) {
        (false, _) => 0,
        (true, true) => 3,
        (true, false) => 4,
    }
}

/// Characters of the line that reopens block `fence` in a new part.
fn reopen_len(fence: Option<&str>) -> usize {
    fence.map_or(0, |tag| 4 + tag.chars().take(MAX_REOPEN_TAG).count())
}

/// Ends `cur` (closing an open block), pushes it, and starts the next part (reopening the block).
fn finish(out: &mut Vec<Part>, cur: &mut Part, fence: Option<&str>) {
    if fence.is_some() {
        cur.close = if cur.body.ends_with('\n') {
            "```".into()
        } else {
            "\n```".into()
        };
    }
    let reopen = fence.map_or_else(String::new, |tag| {
        let tag: String = tag.chars().take(MAX_REOPEN_TAG).collect();
        format!("```{tag}\n")
    });
    out.push(std::mem::replace(
        cur,
        Part {
            reopen,
            ..Part::default()
        },
    ));
}

/// A byte index in `s` at most `room` characters in, at the last space in its second half if there is one,
/// so words stay whole. The rest never starts with ```` ``` ````: it begins a line of its own message, where
/// it would read as a fence.
fn cut_point(s: &str, room: usize) -> usize {
    let first = s.chars().next().map_or(0, char::len_utf8);
    let hard = s.char_indices().nth(room).map_or(s.len(), |(i, _)| i);
    let window = &s[..hard];
    let mut cut = match window.rfind(' ') {
        Some(i) if i + 1 >= hard / 2 && i + 1 < hard => i + 1,
        _ => hard.max(first),
    };
    while cut > first && s[cut..].trim_start_matches([' ', '\t']).starts_with("```") {
        cut = s[..cut]
            .char_indices()
            .next_back()
            .map_or(first, |(i, _)| i);
    }
    cut.max(first)
}

/// The fence state after `line`, given the state before it: a line starting with ```` ``` ```` opens a block
/// (its info string is the tag) or closes the open one; ```` ```x``` ```` on one line does neither.
fn toggle(open: Option<&str>, line: &str) -> Option<String> {
    let t = line.trim_start_matches([' ', '\t']);
    let Some(rest) = t.strip_prefix("```") else {
        return open.map(str::to_string);
    };
    let rest = rest.trim_end();
    match open {
        Some(_) => None,
        None if rest.contains("```") => None,
        None => Some(rest.to_string()),
    }
}

/// The fence state at the end of `text` (for tests and for callers that stream text in pieces).
pub fn open_fence_after(text: &str) -> Option<String> {
    text.split_inclusive('\n')
        .fold(None, |open, line| toggle(open.as_deref(), line))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bodies(parts: &[Part]) -> String {
        parts.iter().map(|p| p.body.as_str()).collect()
    }

    #[test]
    fn short_text_is_one_message() {
        assert_eq!(split("hello\nworld"), vec!["hello\nworld".to_string()]);
        assert!(split("").is_empty());
    }

    #[test]
    fn cuts_at_line_boundaries() {
        let line = format!("{}\n", "a".repeat(99)); // 100 characters
        let text = line.repeat(30); // 3000 characters
        let parts = split(&text);
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].chars().count(), 2000);
        assert!(parts[0].ends_with('\n') && parts[1].starts_with('a'));
        assert_eq!(parts.concat(), text);
    }

    #[test]
    fn counts_characters_not_bytes() {
        let text = "é".repeat(2000);
        assert_eq!(
            split(&text).len(),
            1,
            "2000 two-byte characters are one message"
        );
        assert_eq!(split(&format!("{text}é")).len(), 2);
    }

    #[test]
    fn closes_and_reopens_code_blocks_with_their_language() {
        let code: String = (0..300).map(|i| format!("let x{i} = {i};\n")).collect();
        let text = format!("Here is the fix:\n```rust\n{code}```\nDone.\n");
        let parts = split(&text);
        assert!(parts.len() >= 2);
        assert!(parts[0].starts_with("Here is the fix:\n```rust\n"));
        assert!(parts[0].ends_with("\n```"), "first part closes the block");
        assert!(parts[1].starts_with("```rust\n"), "next part reopens it");
        assert!(parts.last().unwrap().ends_with("```\nDone.\n"));
        for p in &parts {
            assert!(p.chars().count() <= MESSAGE_LIMIT);
            assert_eq!(open_fence_after(p), None, "every part renders whole: {p}");
        }
    }

    #[test]
    fn one_huge_line_is_cut_at_spaces() {
        let text = "word ".repeat(1000); // 5000 characters, no newline
        let parts = split_parts(&text, MESSAGE_LIMIT);
        assert_eq!(bodies(&parts), text);
        assert!(parts.iter().all(|p| p.char_count() <= MESSAGE_LIMIT));
        assert!(parts[0].body.ends_with(' ') && parts[1].body.starts_with('w'));
    }

    #[test]
    fn a_huge_line_inside_a_block_keeps_the_block() {
        let text = format!("```\n{}\n```\n", "x".repeat(4500));
        let parts = split(&text);
        assert_eq!(parts.len(), 3);
        for p in &parts {
            assert!(p.chars().count() <= MESSAGE_LIMIT);
            assert_eq!(open_fence_after(p), None, "{p}");
        }
    }

    #[test]
    fn inline_triple_backticks_do_not_toggle() {
        assert_eq!(open_fence_after("```one line```\n"), None);
        assert_eq!(open_fence_after("   ```py\nx\n"), Some("py".into()));
        assert_eq!(open_fence_after("```py\nx\n```\n"), None);
    }

    fn text_strategy() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            3 => "[a-z ]{0,80}\n",
            1 => "[a-zé日😀 ]{0,3000}",
            1 => Just("```rust\n".to_string()),
            1 => Just("```\n".to_string()),
            1 => "```[a-z]{0,100}\n",
            1 => Just("\n\n".to_string()),
            1 => "[ \t]{0,3}```[a-z]{0,5}```\n",
        ];
        proptest::collection::vec(piece, 0..40).prop_map(|v| v.concat())
    }

    proptest! {
        #[test]
        fn parts_fit_and_bodies_rebuild_the_input(text in text_strategy()) {
            let parts = split_parts(&text, MESSAGE_LIMIT);
            prop_assert_eq!(bodies(&parts), text.clone());
            for (i, p) in parts.iter().enumerate() {
                prop_assert!(p.char_count() <= MESSAGE_LIMIT, "part {} has {} chars", i, p.char_count());
                prop_assert!(!p.body.is_empty());
                // Every part but the last renders whole; the last ends as the input does.
                let end = open_fence_after(&p.text());
                if i + 1 < parts.len() {
                    prop_assert_eq!(end, None, "part {} leaves a block open", i);
                } else {
                    prop_assert_eq!(end.is_some(), open_fence_after(&text).is_some());
                }
            }
        }
    }
}
