//! The environment a sandboxed Claude Code starts with: an allow-list, never the agent's own environment.
//!
//! The agent's environment is where its owner's secrets live (`GITHUB_TOKEN`, cloud keys, `SSH_AUTH_SOCK`,
//! `DBUS_SESSION_BUS_ADDRESS`, `WSL_INTEROP`...). A sandboxed task gets only variables that hold no secret and
//! tell programs how to behave, plus the Claude Code settings it needs; everything else is dropped by name,
//! so a secret under a name nobody thought of stays out too.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::Path;

/// Passed when set: how programs behave, none of them a secret.
const BEHAVIOUR: &[&str] = &[
    "PATH",
    "LANG",
    "LANGUAGE",
    "TERM",
    "TZ",
    "NO_COLOR",
    // Claude Code's switches for a quiet, non-updating run (and `IS_SANDBOX`, which lets root use its own
    // permission modes).
    "DISABLE_AUTOUPDATER",
    "DISABLE_TELEMETRY",
    "DISABLE_ERROR_REPORTING",
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC",
    "IS_SANDBOX",
    "ANTHROPIC_MODEL",
    "ANTHROPIC_SMALL_FAST_MODEL",
];

/// Where Claude Code's API is; not a secret.
const API_URL: &str = "ANTHROPIC_BASE_URL";

/// Credentials Claude Code reads from its environment.
const CREDENTIALS: &[&str] = &[
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_AUTH_TOKEN",
    "CLAUDE_CODE_OAUTH_TOKEN",
];

/// Which credentials a sandboxed task may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credentials {
    /// The owner's own sandboxed task: their credential variables, as the agent has them.
    Owner,
    /// A grantee's task: none of the agent's (the caller adds the key set aside for shared tasks).
    None,
}

/// The variables for a sandboxed Claude Code. `source` is what the agent would have given it (its own
/// environment, or the configured variables); `home` and `config_dir` are the sandbox's `HOME` and
/// `CLAUDE_CONFIG_DIR` (`None`: unset, Claude Code uses `$HOME/.claude`).
pub fn sandbox_env(
    source: impl IntoIterator<Item = (OsString, OsString)>,
    home: &Path,
    config_dir: Option<&Path>,
    credentials: Credentials,
) -> Vec<(OsString, OsString)> {
    let source: BTreeMap<OsString, OsString> = source.into_iter().collect();
    let allowed = |key: &str| {
        BEHAVIOUR.contains(&key)
            || key.starts_with("LC_")
            || key == API_URL
            || match credentials {
                Credentials::Owner => CREDENTIALS.contains(&key),
                Credentials::None => false,
            }
    };
    let mut env: Vec<(OsString, OsString)> = source
        .into_iter()
        .filter(|(k, _)| k.to_str().is_some_and(allowed))
        .collect();
    env.push(("HOME".into(), home.into()));
    if let Some(dir) = config_dir {
        env.push(("CLAUDE_CONFIG_DIR".into(), dir.into()));
    }
    env
}

/// The environment the agent would give an unsandboxed Claude Code: its own (unless `clear`, then only `PATH`
/// and `LANG`, as the session does), with `vars` over it.
pub fn agent_env(clear: bool, vars: &[(OsString, OsString)]) -> Vec<(OsString, OsString)> {
    let mut env: BTreeMap<OsString, OsString> = if clear {
        ["PATH", "LANG"]
            .into_iter()
            .filter_map(|k| Some((k.into(), std::env::var_os(k)?)))
            .collect()
    } else {
        std::env::vars_os().collect()
    };
    env.extend(vars.iter().cloned());
    env.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        list.iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    #[test]
    fn only_allowed_variables_pass_and_home_is_the_sandbox_one() {
        let source = pairs(&[
            ("PATH", "/usr/bin"),
            ("LC_ALL", "C.UTF-8"),
            ("HOME", "/home/owner"),
            ("GITHUB_TOKEN", "ghp_secret"),
            ("DBUS_SESSION_BUS_ADDRESS", "unix:path=/run/user/1000/bus"),
            ("SSH_AUTH_SOCK", "/run/user/1000/ssh"),
            ("WSL_INTEROP", "/run/WSL/1_interop"),
            ("XDG_RUNTIME_DIR", "/run/user/1000"),
            ("ANTHROPIC_BASE_URL", "http://127.0.0.1:9"),
            ("ANTHROPIC_API_KEY", "sk-ant-key"),
            ("CLAUDE_CODE_OAUTH_TOKEN", "oauth"),
            ("CLAUDE_CONFIG_DIR", "/home/owner/.claude"),
        ]);
        let env = sandbox_env(
            source.clone(),
            Path::new("/home/owner"),
            Some(Path::new("/home/owner/.claude")),
            Credentials::None,
        );
        let keys: Vec<String> = env
            .iter()
            .map(|(k, _)| k.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            keys,
            [
                "ANTHROPIC_BASE_URL",
                "LC_ALL",
                "PATH",
                "HOME",
                "CLAUDE_CONFIG_DIR"
            ]
        );
        let owner = sandbox_env(source, Path::new("/h"), None, Credentials::Owner);
        assert!(owner.iter().any(|(k, _)| k == "CLAUDE_CODE_OAUTH_TOKEN"));
        assert!(!owner.iter().any(|(k, _)| k == "GITHUB_TOKEN"));
        assert!(!owner.iter().any(|(k, _)| k == "CLAUDE_CONFIG_DIR"));
    }
}
