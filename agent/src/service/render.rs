//! Filling the templates in `installers/` (systemd unit, launchd plist, WSL launcher and task) and the
//! quoting each format needs.
//!
//! A template holds `{{NAME}}` placeholders. Every placeholder must be given a value and every value must
//! be used, so a template and the code that fills it cannot drift apart silently. A line that consists of
//! one placeholder whose value is empty is dropped, which is how optional settings are left out; a value
//! may span several lines.

use std::collections::BTreeMap;
use std::fmt;

/// The systemd unit template (`installers/systemd/ct-agent.service.in`).
pub const SYSTEMD_UNIT: &str = include_str!("../../../installers/systemd/ct-agent.service.in");
/// The launchd LaunchAgent template (`installers/launchd/dev.codetogether.agent.plist.in`).
pub const LAUNCHD_PLIST: &str =
    include_str!("../../../installers/launchd/dev.codetogether.agent.plist.in");
/// The WSL launcher script template (`installers/wsl/ct-agent-wsl.sh.in`).
pub const WSL_LAUNCHER: &str = include_str!("../../../installers/wsl/ct-agent-wsl.sh.in");
/// The Windows Task Scheduler template (`installers/wsl/ct-agent-task.xml.in`).
pub const WSL_TASK: &str = include_str!("../../../installers/wsl/ct-agent-task.xml.in");

/// A value that cannot be written into a service file safely.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// A template placeholder without a value (a bug: the template and the code disagree).
    #[error("template placeholder {{{{{0}}}}} has no value")]
    Missing(String),
    /// A value given for no placeholder (a bug: the template and the code disagree).
    #[error("value for {0} is not used by the template")]
    Unused(String),
    /// A path or setting holds a character the target format cannot carry.
    #[error("{what} {value:?} contains {problem}, which cannot be written into {format}: choose another path")]
    Unrepresentable {
        what: &'static str,
        value: String,
        problem: &'static str,
        format: &'static str,
    },
}

/// Fills `template` with `values`.
pub fn fill(template: &str, values: &BTreeMap<&str, String>) -> Result<String, RenderError> {
    let mut used = std::collections::BTreeSet::new();
    let mut out = String::with_capacity(template.len() + 256);
    for line in template.split_inclusive('\n') {
        let body = line.trim_end_matches('\n');
        let trimmed = body.trim();
        if let Some(name) = trimmed
            .strip_prefix("{{")
            .and_then(|r| r.strip_suffix("}}"))
            .filter(|n| is_name(n))
        {
            let value = values
                .get(name)
                .ok_or_else(|| RenderError::Missing(name.to_string()))?;
            used.insert(name.to_string());
            if value.is_empty() {
                continue;
            }
        }
        let mut rest = line;
        while let Some(start) = rest.find("{{") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            match after.find("}}").filter(|end| is_name(&after[..*end])) {
                Some(end) => {
                    let name = &after[..end];
                    let value = values
                        .get(name)
                        .ok_or_else(|| RenderError::Missing(name.to_string()))?;
                    used.insert(name.to_string());
                    out.push_str(value);
                    rest = &after[end + 2..];
                }
                None => {
                    out.push_str("{{");
                    rest = after;
                }
            }
        }
        out.push_str(rest);
    }
    if let Some(unused) = values.keys().find(|k| !used.contains(**k)) {
        return Err(RenderError::Unused(unused.to_string()));
    }
    Ok(out)
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}

fn refuse(
    what: &'static str,
    value: &str,
    problem: &'static str,
    format: &'static str,
) -> RenderError {
    RenderError::Unrepresentable {
        what,
        value: value.to_string(),
        problem,
        format,
    }
}

/// One word of a systemd setting (ExecStart=, Environment=, ReadWritePaths=), double-quoted, with `\`
/// and `"` escaped and `%` doubled so systemd does not read it as a specifier.
pub fn systemd_word(what: &'static str, value: &str) -> Result<String, RenderError> {
    if value.chars().any(char::is_control) {
        return Err(refuse(what, value, "a control character", "a systemd unit"));
    }
    let mut out = String::from("\"");
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '%' => out.push_str("%%"),
            c => out.push(c),
        }
    }
    out.push('"');
    Ok(out)
}

/// Text for an XML element or attribute (plist, task definition).
pub fn xml_text(what: &'static str, value: &str) -> Result<String, RenderError> {
    if value
        .chars()
        .any(|c| c.is_control() && !matches!(c, '\t' | '\n'))
    {
        return Err(refuse(what, value, "a control character", "an XML file"));
    }
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// A POSIX shell word in single quotes.
pub fn sh_word(what: &'static str, value: &str) -> Result<String, RenderError> {
    if value.contains('\0') || value.contains('\n') {
        return Err(refuse(what, value, "a NUL or newline", "a shell script"));
    }
    Ok(format!("'{}'", value.replace('\'', "'\\''")))
}

/// A comma-separated list of paths, as `ALLOWED_PROJECT_DIRS` holds them.
pub fn comma_list(what: &'static str, paths: &[String]) -> Result<String, RenderError> {
    if let Some(p) = paths.iter().find(|p| p.contains(',')) {
        return Err(refuse(
            what,
            p,
            "a comma",
            "ALLOWED_PROJECT_DIRS (a comma-separated list)",
        ));
    }
    Ok(paths.join(","))
}

/// A rendered file: where it goes, with which mode, and its bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Rendered {
    pub path: std::path::PathBuf,
    pub mode: u32,
    pub text: String,
    /// Set when the file is written in another encoding than UTF-8 (the Windows task is UTF-16).
    pub utf16: bool,
}

impl Rendered {
    pub fn utf8(path: impl Into<std::path::PathBuf>, mode: u32, text: String) -> Self {
        Self {
            path: path.into(),
            mode,
            text,
            utf16: false,
        }
    }

    /// The bytes to write: UTF-8, or UTF-16LE with a byte-order mark.
    pub fn bytes(&self) -> Vec<u8> {
        if self.utf16 {
            let mut out = vec![0xFF, 0xFE];
            for unit in self.text.encode_utf16() {
                out.extend_from_slice(&unit.to_le_bytes());
            }
            out
        } else {
            self.text.clone().into_bytes()
        }
    }
}

impl fmt::Debug for Rendered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rendered")
            .field("path", &self.path)
            .field("mode", &format_args!("{:o}", self.mode))
            .field("len", &self.text.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(pairs: &[(&'static str, &str)]) -> BTreeMap<&'static str, String> {
        pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
    }

    #[test]
    fn placeholders_are_filled_and_empty_lines_dropped() {
        let t = "a={{A}}\n{{OPT}}\nb={{B}} {{ not a placeholder }}\n";
        let out = fill(t, &values(&[("A", "1"), ("OPT", ""), ("B", "x\ny")])).unwrap();
        assert_eq!(out, "a=1\nb=x\ny {{ not a placeholder }}\n");
    }

    #[test]
    fn missing_and_unused_values_are_errors() {
        assert_eq!(
            fill("{{A}}", &values(&[])),
            Err(RenderError::Missing("A".into()))
        );
        assert_eq!(
            fill("x", &values(&[("A", "1")])),
            Err(RenderError::Unused("A".into()))
        );
    }

    #[test]
    fn the_shipped_templates_have_only_known_placeholders() {
        for t in [SYSTEMD_UNIT, LAUNCHD_PLIST, WSL_LAUNCHER, WSL_TASK] {
            assert!(!t.contains("{{}}"));
        }
    }

    #[test]
    fn quoting() {
        assert_eq!(
            systemd_word("p", r#"/a b/100%/"q"\"#).unwrap(),
            r#""/a b/100%%/\"q\"\\""#
        );
        assert!(systemd_word("p", "a\nb").is_err());
        assert_eq!(
            xml_text("p", "a<&>'\"").unwrap(),
            "a&lt;&amp;&gt;&apos;&quot;"
        );
        assert_eq!(sh_word("p", "it's").unwrap(), r"'it'\''s'");
        assert!(comma_list("d", &["/a,b".into()]).is_err());
        assert_eq!(
            comma_list("d", &["/a".into(), "/b".into()]).unwrap(),
            "/a,/b"
        );
    }

    #[test]
    fn utf16_has_a_bom() {
        let r = Rendered {
            path: "x".into(),
            mode: 0o600,
            text: "<a/>".into(),
            utf16: true,
        };
        assert_eq!(&r.bytes()[..4], &[0xFF, 0xFE, b'<', 0]);
    }
}
