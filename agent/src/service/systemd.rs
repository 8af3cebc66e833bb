//! systemd: the hardened unit (user unit by default, system unit with `--system`), its install and
//! uninstall steps, `systemctl show` for status and `journalctl` for logs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::plan::{self, Plan, Step};
use super::render::{self, RenderError, Rendered};
use super::{Context, Host, Manager, ServiceStatus, ENV_ALLOWED_DIRS};

/// The unit's name.
pub const UNIT: &str = "ct-agent.service";

/// The first systemd with `RestartSteps=` / `RestartMaxDelaySec=` (growing restart delays).
pub const RESTART_STEPS_SINCE: u32 = 254;

/// `systemctl --version`'s number, if systemctl is installed.
pub fn installed_version() -> Option<u32> {
    let out = plan::run_checked(&["systemctl".into(), "--version".into()]).ok()?;
    parse_version(&out)
}

/// `systemd 252 (252.38-1~deb12u1)` → 252.
pub fn parse_version(text: &str) -> Option<u32> {
    text.lines()
        .next()?
        .strip_prefix("systemd ")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Where the unit file goes.
pub fn unit_path(ctx: &Context) -> PathBuf {
    match ctx.manager {
        Manager::SystemdSystem => PathBuf::from("/etc/systemd/system").join(UNIT),
        _ => ctx.home.join(".config/systemd/user").join(UNIT),
    }
}

fn scope_flag(ctx: &Context) -> &'static str {
    if ctx.manager == Manager::SystemdSystem {
        "--system"
    } else {
        "--user"
    }
}

/// The paths the service may write, each prefixed with `-` (skipped when missing rather than failing the
/// start, which would otherwise turn a deleted project folder into a restart loop).
pub fn read_write_paths(ctx: &Context) -> Vec<PathBuf> {
    let mut paths = vec![ctx.config_dir.clone(), ctx.claude_config_dir.clone()];
    if ctx.writable_home {
        paths.push(ctx.home.clone());
    }
    // XDG cache: pip, go, yarn, node-gyp and many other tools Claude runs cache there.
    paths.push(ctx.home.join(".cache"));
    paths.extend(ctx.allowed.iter().cloned());
    paths.extend(ctx.rw_paths.iter().cloned());
    let mut unique = Vec::new();
    for p in paths {
        if !unique.contains(&p) {
            unique.push(p);
        }
    }
    unique
}

/// The unit file's text.
pub fn render_unit(ctx: &Context) -> Result<String, RenderError> {
    let system = ctx.manager == Manager::SystemdSystem;
    let env = |key: &str, value: &str| {
        render::systemd_word("an environment value", &format!("{key}={value}"))
    };
    let allowed = render::comma_list("an allowed folder", &ctx.allowed_strings())?;
    let mut rw = Vec::new();
    for p in read_write_paths(ctx) {
        rw.push(format!(
            "ReadWritePaths={}",
            render::systemd_word("a writable path", &format!("-{}", p.display()))?
        ));
    }
    let backoff = if ctx.systemd_version.unwrap_or(0) >= RESTART_STEPS_SINCE {
        "# Each further restart waits longer, up to 5 minutes (systemd 254 or newer).\nRestartSteps=10\nRestartMaxDelaySec=5min".to_string()
    } else {
        String::new()
    };
    let values: BTreeMap<&str, String> = [
        ("SCOPE_FLAG", if system { "" } else { "--user " }.to_string()),
        (
            "NETWORK_ONLINE",
            if system {
                "# Start once the network is up (only the system manager knows network-online.target).\n\
                 Wants=network-online.target\nAfter=network-online.target"
                    .to_string()
            } else {
                String::new()
            },
        ),
        (
            "USER",
            if system {
                format!(
                    "# The agent runs as its owner, never as root.\nUser={}",
                    user_name(&ctx.user)?
                )
            } else {
                String::new()
            },
        ),
        ("EXEC", render::systemd_word("the ct-agent path", &ctx.exe.display().to_string())?),
        ("ENV_CONFIG_DIR", env(crate::config::ENV_CONFIG_DIR, &ctx.config_dir.display().to_string())?),
        ("ENV_ALLOWED", env(ENV_ALLOWED_DIRS, &allowed)?),
        ("ENV_PATH", env("PATH", &ctx.path_env)?),
        (
            "ENV_CLAUDE_CONFIG_DIR",
            if ctx.claude_config_env {
                format!(
                    "# Claude Code's config directory, as set when the service was installed.\nEnvironment={}",
                    env("CLAUDE_CONFIG_DIR", &ctx.claude_config_dir.display().to_string())?
                )
            } else {
                String::new()
            },
        ),
        ("RESTART_BACKOFF", backoff),
        ("READ_WRITE_PATHS", rw.join("\n")),
        ("WANTED_BY", if system { "multi-user.target" } else { "default.target" }.to_string()),
    ]
    .into_iter()
    .collect();
    render::fill(render::SYSTEMD_UNIT, &values)
}

/// A user name as `User=` takes it: unquoted, so only the characters systemd's strict rules allow.
fn user_name(name: &str) -> Result<&str, RenderError> {
    let ok = !name.is_empty()
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(name)
    } else {
        Err(RenderError::Unrepresentable {
            what: "the user name",
            value: name.to_string(),
            problem: "characters outside letters, digits, '.', '_' and '-'",
            format: "User= of a systemd unit",
        })
    }
}

/// Whether `user` lingers (their services run without a login session).
pub fn lingers(user: &str) -> bool {
    Path::new("/var/lib/systemd/linger").join(user).exists()
}

/// Write the unit, reload, enable at boot/login, (re)start now.
pub fn install_plan(ctx: &Context, host: &Host) -> Result<Plan, super::ServiceError> {
    let path = unit_path(ctx);
    let scope = scope_flag(ctx);
    let mut plan = Plan::default();
    if let Some(dir) = path.parent() {
        plan.steps.push(Step::Mkdir {
            path: dir.to_path_buf(),
            mode: 0o755,
        });
    }
    plan.steps
        .push(Step::Write(Rendered::utf8(&path, 0o644, render_unit(ctx)?)));
    plan.run(
        &["systemctl", scope, "daemon-reload"],
        "make systemd read the new unit",
    );
    plan.run(
        &["systemctl", scope, "enable", UNIT],
        "start it at every boot or login",
    );
    plan.run(
        &["systemctl", scope, "restart", UNIT],
        "start it now (restart picks up a changed unit)",
    );
    let user_flag = if scope == "--user" { "--user " } else { "" };
    let sudo = if scope == "--system" { "sudo " } else { "" };
    plan.notes.push(format!(
        "Check it with `ct-agent service status` and `ct-agent service logs` \
         (or `systemctl {user_flag}status ct-agent`); `ct-agent doctor` checks everything else."
    ));
    if ctx.manager == Manager::SystemdUser && !lingers(&ctx.user) {
        plan.notes.push(format!(
            "Lingering is off for {user}: this user unit stops when you log out and starts at your next login. \
             To keep it running across log-outs and start it at boot, run: {sudo}loginctl enable-linger {user}",
            user = ctx.user
        ));
    }
    if ctx.systemd_version.is_some_and(|v| v < RESTART_STEPS_SINCE) {
        plan.notes.push(format!(
            "systemd {} restarts a crashed agent every 2 s (growing delays need systemd {RESTART_STEPS_SINCE}).",
            ctx.systemd_version.unwrap_or(0)
        ));
    }
    if ctx.manager == Manager::SystemdSystem && host.uid != 0 {
        plan.notes
            .push("A system unit is installed as root: run this with sudo.".into());
    }
    Ok(plan)
}

/// Stop and disable, remove the unit, reload.
pub fn uninstall_plan(ctx: &Context) -> Plan {
    let scope = scope_flag(ctx);
    let mut plan = Plan::default();
    plan.run_may_fail(
        &["systemctl", scope, "disable", "--now", UNIT],
        "stop it and remove its enablement links",
    );
    plan.steps.push(Step::Remove {
        path: unit_path(ctx),
    });
    plan.run_may_fail(&["systemctl", scope, "daemon-reload"], "forget the unit");
    plan.run_may_fail(
        &["systemctl", scope, "reset-failed", UNIT],
        "forget its failure state, if any",
    );
    plan
}

/// The properties `status` asks for.
const PROPERTIES: &str = "LoadState,ActiveState,SubState,UnitFileState,ExecMainStatus,NRestarts";

/// Parses `systemctl show` output (`Key=value` lines) into a status.
pub fn parse_show(ctx: &Context, text: &str) -> ServiceStatus {
    let props: BTreeMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
    let get = |k: &str| props.get(k).copied().unwrap_or("");
    let installed = !matches!(get("LoadState"), "" | "not-found");
    let running = get("ActiveState") == "active";
    let user_flag = if ctx.manager == Manager::SystemdUser {
        "--user "
    } else {
        ""
    };
    let mut detail = format!("{} ({})", get("ActiveState"), get("SubState"));
    if !get("UnitFileState").is_empty() {
        detail.push_str(&format!(", {}", get("UnitFileState")));
    }
    let restarts = get("NRestarts");
    if !restarts.is_empty() && restarts != "0" {
        detail.push_str(&format!(", restarted {restarts} times"));
    }
    let advice = if !installed {
        Some("install it with `ct-agent service install`".to_string())
    } else if get("ExecMainStatus") == "78" && !running {
        Some(
            "it stopped with status 78: the relay refused this agent or it is not paired. See `ct-agent service logs`, \
             pair again (`ct-agent pair --force <token>`), then `ct-agent service install`"
                .to_string(),
        )
    } else if !running {
        Some(format!(
            "see why with `ct-agent service logs`; start it with `systemctl {user_flag}restart ct-agent`"
        ))
    } else if get("UnitFileState") != "enabled" {
        Some(format!(
            "it will not start at the next boot or login: `systemctl {user_flag}enable ct-agent`"
        ))
    } else {
        None
    };
    ServiceStatus {
        manager: ctx.manager,
        name: UNIT.into(),
        installed,
        running,
        detail,
        advice,
    }
}

/// Asks `systemctl show`; a unit file on disk that systemd cannot be asked about is reported as such.
pub fn status(ctx: &Context) -> ServiceStatus {
    let argv: Vec<String> = [
        "systemctl",
        scope_flag(ctx),
        "show",
        UNIT,
        "--property",
        PROPERTIES,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    match plan::run_checked(&argv) {
        Ok(text) => parse_show(ctx, &text),
        Err(e) => {
            let path = unit_path(ctx);
            ServiceStatus {
                manager: ctx.manager,
                name: UNIT.into(),
                installed: path.exists(),
                running: false,
                detail: format!("systemctl cannot be asked: {e}"),
                advice: Some(if path.exists() {
                    format!(
                        "{} exists but systemd does not answer: is systemd running (and, for a user unit, are you logged in)?",
                        path.display()
                    )
                } else {
                    "install it with `ct-agent service install`".into()
                }),
            }
        }
    }
}

/// `journalctl` for the unit.
pub fn logs_command(ctx: &Context, lines: u32, follow: bool) -> Vec<String> {
    let mut argv = vec!["journalctl".to_string()];
    if ctx.manager == Manager::SystemdUser {
        argv.push("--user".into());
    }
    argv.extend([
        "-u".into(),
        UNIT.into(),
        "-n".into(),
        lines.to_string(),
        "--no-pager".into(),
    ]);
    if follow {
        argv.push("-f".into());
    }
    argv
}

#[cfg(test)]
mod tests {
    use super::super::tests::host;
    use super::super::{Options, Os};
    use super::*;

    fn ctx(opts: Options) -> Context {
        Context::resolve(&host(Os::Linux), &opts, &|_| {
            Some((1001, "/home/bob".into()))
        })
        .unwrap()
    }

    #[test]
    fn user_unit_has_the_settings_that_matter() {
        let unit = render_unit(&ctx(Options::default())).unwrap();
        for want in [
            "ExecStart=\"/home/alice/.cargo/bin/ct-agent\" run",
            "Environment=\"CT_AGENT_CONFIG_DIR=/home/alice/.config/codetogether\"",
            "Environment=\"ALLOWED_PROJECT_DIRS=/srv/proj-a,/srv/proj b\"",
            "ReadWritePaths=\"-/srv/proj b\"",
            "ReadWritePaths=\"-/home/alice/.claude\"",
            "RestartPreventExitStatus=78",
            "RestartSteps=10",
            "ProtectHome=read-only",
            "WantedBy=default.target",
        ] {
            assert!(unit.contains(want), "missing {want:?} in\n{unit}");
        }
        assert!(!unit.contains("User="), "{unit}");
        assert!(!unit.contains("network-online"), "{unit}");
        assert!(!unit.contains("{{"), "{unit}");
        let settings: Vec<&str> = unit.lines().filter(|l| !l.starts_with('#')).collect();
        assert!(!settings.iter().any(|l| l.contains("agent.key")), "{unit}");
    }

    #[test]
    fn system_unit_runs_as_the_user() {
        let unit = render_unit(&ctx(Options {
            system: true,
            ..Default::default()
        }))
        .unwrap();
        assert!(unit.contains("User=alice\n"), "{unit}");
        assert!(unit.contains("After=network-online.target"), "{unit}");
        assert!(unit.contains("WantedBy=multi-user.target"), "{unit}");
    }

    #[test]
    fn show_output_is_understood() {
        let c = ctx(Options::default());
        let s = parse_show(&c, "LoadState=loaded\nActiveState=active\nSubState=running\nUnitFileState=enabled\nExecMainStatus=0\nNRestarts=2\n");
        assert!(s.installed && s.running && s.advice.is_none(), "{s:?}");
        assert!(s.detail.contains("restarted 2 times"));
        let s = parse_show(&c, "LoadState=loaded\nActiveState=failed\nSubState=failed\nUnitFileState=enabled\nExecMainStatus=78\n");
        assert!(s.installed && !s.running);
        assert!(s.advice.unwrap().contains("pair again"));
        let s = parse_show(
            &c,
            "LoadState=not-found\nActiveState=inactive\nSubState=dead\n",
        );
        assert!(!s.installed);
    }

    #[test]
    fn versions() {
        assert_eq!(
            parse_version("systemd 252 (252.38-1~deb12u1)\n+PAM"),
            Some(252)
        );
        assert_eq!(parse_version("nope"), None);
    }
}
