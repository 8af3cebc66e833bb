//! What of an agent's words reaches someone other than its owner: a task's end message without the folders
//! on the owner's machine.
//!
//! The agent words its refusals for its owner ("/home/ana/src/x is not inside an allowed folder (allowed:
//! /home/ana/src, /home/ana/work)..."), but a grantee's task ends in a thread the grantee reads. The relay
//! cannot know every path the agent might name, so it takes out anything that looks like one, and says so;
//! the owner sees the whole message in the agent's log.

/// Stands in for a path taken out of a message.
const HIDDEN: &str = "[a folder on the owner's machine]";

/// `message` with every absolute path (`/...`, `~/...`, `C:\...`) replaced, and a note when any was.
pub(crate) fn for_grantee(message: &str) -> String {
    let mut hid = false;
    let words: Vec<String> = message
        .split(' ')
        .map(|word| {
            let start = word
                .find(|c: char| !matches!(c, '(' | '[' | '`' | '"' | '\''))
                .unwrap_or(word.len());
            let (lead, rest) = word.split_at(start);
            if !looks_like_path(rest) {
                return word.to_string();
            }
            hid = true;
            let end = rest
                .trim_end_matches([',', ')', ']', '`', '"', '\'', '.', ':', ';'])
                .len();
            format!("{lead}{HIDDEN}{}", &rest[end..])
        })
        .collect();
    let mut out = words.join(" ");
    if hid {
        out.push_str(" (folders on the owner's machine are not shown to you; its owner sees them in the agent's log)");
    }
    out
}

fn looks_like_path(word: &str) -> bool {
    let b = word.as_bytes();
    word.starts_with('/') && word.len() > 1
        || word.starts_with("~/")
        || (b.len() > 2
            && b[0].is_ascii_alphabetic()
            && b[1] == b':'
            && matches!(b[2], b'\\' | b'/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agents_refusal_loses_every_folder_and_keeps_its_sense() {
        let said = for_grantee(
            "/home/ana/secret-client is not inside an allowed folder (allowed: /home/ana/src, \
             /home/ana/work): run `ct-agent project add <name> /home/ana/secret-client` on this machine, or \
             add it to ALLOWED_PROJECT_DIRS",
        );
        assert!(!said.contains("/home/ana"), "{said}");
        assert!(
            said.contains("is not inside an allowed folder (allowed: [a folder"),
            "{said}"
        );
        assert!(said.contains("not shown to you"), "{said}");
    }

    #[test]
    fn windows_and_home_paths_go_too_and_plain_text_is_untouched() {
        let said = for_grantee("no such folder ~/x or C:\\Users\\ana, nor `/srv/app`.");
        assert!(
            !said.contains("~/x") && !said.contains("Users") && !said.contains("srv"),
            "{said}"
        );
        let plain = "this agent does not run tasks for people its owner shared it with / sorry";
        assert_eq!(for_grantee(plain), plain);
    }
}
