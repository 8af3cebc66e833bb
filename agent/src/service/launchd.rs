//! launchd: a LaunchAgent in the user's GUI domain, loaded with `launchctl bootstrap`, logging to
//! `~/Library/Logs/codetogether/agent.log`. See the plist template for how exit status 78 is handled.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::plan::{self, Plan, Step};
use super::render::{self, RenderError, Rendered};
use super::{Context, Manager, ServiceStatus};

/// The job's label (and the plist's file name).
pub const LABEL: &str = "dev.codetogether.agent";

pub fn plist_path(ctx: &Context) -> PathBuf {
    ctx.home
        .join("Library/LaunchAgents")
        .join(format!("{LABEL}.plist"))
}

pub fn log_dir(ctx: &Context) -> PathBuf {
    ctx.home.join("Library/Logs/codetogether")
}

pub fn log_file(ctx: &Context) -> PathBuf {
    log_dir(ctx).join("agent.log")
}

fn domain(ctx: &Context) -> String {
    format!("gui/{}", ctx.uid)
}

fn target(ctx: &Context) -> String {
    format!("gui/{}/{LABEL}", ctx.uid)
}

/// The plist's text.
pub fn render_plist(ctx: &Context) -> Result<String, RenderError> {
    let x = |what, s: &str| render::xml_text(what, s);
    let claude = if ctx.claude_config_env {
        format!(
            "\t\t<key>CLAUDE_CONFIG_DIR</key>\n\t\t<string>{}</string>",
            x(
                "Claude's config directory",
                &ctx.claude_config_dir.display().to_string()
            )?
        )
    } else {
        String::new()
    };
    let values: BTreeMap<&str, String> = [
        ("LABEL", LABEL.to_string()),
        (
            "EXEC",
            x("the ct-agent path", &ctx.exe.display().to_string())?,
        ),
        (
            "CONFIG_DIR",
            x(
                "the config directory",
                &ctx.config_dir.display().to_string(),
            )?,
        ),
        (
            "ALLOWED",
            x(
                "an allowed folder",
                &render::comma_list("an allowed folder", &ctx.allowed_strings())?,
            )?,
        ),
        ("PATH", x("PATH", &ctx.path_env)?),
        ("CLAUDE_CONFIG_DIR", claude),
        (
            "HOME",
            x("the home directory", &ctx.home.display().to_string())?,
        ),
        (
            "LOG",
            x("the log file", &log_file(ctx).display().to_string())?,
        ),
    ]
    .into_iter()
    .collect();
    render::fill(render::LAUNCHD_PLIST, &values)
}

/// Write the plist, unload any previous version, enable, bootstrap (RunAtLoad starts it).
pub fn install_plan(ctx: &Context) -> Result<Plan, super::ServiceError> {
    let path = plist_path(ctx);
    let path_s = path.display().to_string();
    let mut plan = Plan::default();
    if let Some(dir) = path.parent() {
        plan.steps.push(Step::Mkdir {
            path: dir.to_path_buf(),
            mode: 0o755,
        });
    }
    plan.steps.push(Step::Mkdir {
        path: log_dir(ctx),
        mode: 0o700,
    });
    plan.steps.push(Step::Write(Rendered::utf8(
        &path,
        0o644,
        render_plist(ctx)?,
    )));
    plan.run_may_fail(
        &["launchctl", "bootout", &target(ctx)],
        "unload a previous version (fails harmlessly when none is loaded)",
    );
    plan.run(
        &["launchctl", "enable", &target(ctx)],
        "undo an earlier `launchctl disable`",
    );
    plan.run(
        &["launchctl", "bootstrap", &domain(ctx), &path_s],
        "load it; RunAtLoad starts it now and at every login",
    );
    plan.notes.push(format!(
        "Check it with `ct-agent service status` and `ct-agent service logs` (log: {}); `ct-agent doctor` checks \
         everything else.",
        log_file(ctx).display()
    ));
    Ok(plan)
}

/// Unload, remove the plist and the log directory install created.
pub fn uninstall_plan(ctx: &Context) -> Plan {
    let mut plan = Plan::default();
    plan.run_may_fail(
        &["launchctl", "bootout", &target(ctx)],
        "stop and unload it",
    );
    plan.steps.push(Step::Remove {
        path: plist_path(ctx),
    });
    plan.steps.push(Step::RemoveTree { path: log_dir(ctx) });
    plan
}

/// Parses `launchctl print gui/<uid>/<label>`.
pub fn parse_print(text: &str) -> ServiceStatus {
    let field = |name: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|r| r.trim_start().strip_prefix('='))
            })
            .map(|v| v.trim().to_string())
    };
    let state = field("state").unwrap_or_default();
    let running = state == "running";
    let mut detail = format!("state = {state}");
    if let Some(pid) = field("pid") {
        detail.push_str(&format!(", pid {pid}"));
    }
    let last_exit = field("last exit code");
    if let Some(code) = &last_exit {
        detail.push_str(&format!(", last exit {code}"));
    }
    let advice = (!running).then(|| {
        "see why with `ct-agent service logs`; after fixing it (e.g. pairing again) run `ct-agent service install`"
            .to_string()
    });
    ServiceStatus {
        manager: Manager::Launchd,
        name: LABEL.into(),
        installed: true,
        running,
        detail,
        advice,
    }
}

pub fn status(ctx: &Context) -> ServiceStatus {
    match plan::run_checked(&["launchctl".into(), "print".into(), target(ctx)]) {
        Ok(text) => parse_print(&text),
        Err(e) => {
            let installed = plist_path(ctx).exists();
            ServiceStatus {
                manager: Manager::Launchd,
                name: LABEL.into(),
                installed,
                running: false,
                detail: if installed {
                    format!("not loaded: {e}")
                } else {
                    String::new()
                },
                advice: Some(if installed {
                    "load it again with `ct-agent service install`".into()
                } else {
                    "install it with `ct-agent service install`".into()
                }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn print_output_is_understood() {
        let s = parse_print("gui/501/dev.codetogether.agent = {\n\tactive count = 1\n\tstate = running\n\tpid = 4242\n\tlast exit code = 0\n}\n");
        assert!(s.running && s.detail.contains("pid 4242"), "{s:?}");
        let s = parse_print("\tstate = not running\n\tlast exit code = 1\n");
        assert!(!s.running && s.advice.is_some());
    }
}
