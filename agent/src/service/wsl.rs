//! WSL: recognised from the kernel release. With systemd enabled in the distribution the agent gets the
//! same systemd unit as on Linux; without it, a Windows logon task (registered with `schtasks.exe` through
//! WSL's Windows interop) starts a launcher script inside the distribution that plays the unit's part.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use super::plan::{self, Plan, Step};
use super::render::{self, RenderError, Rendered};
use super::{Context, Manager, ServiceError, ServiceStatus};

/// Launcher script, its pid file and its log, all in the agent's config directory.
pub const LAUNCHER: &str = "ct-agent-wsl.sh";
pub const PIDFILE: &str = "ct-agent-wsl.pid";
pub const LOG: &str = "service.log";
/// The task definition, written for `schtasks.exe /Create /XML` and removed once registered.
pub const TASK_XML: &str = "ct-agent-task.xml";

/// What to do when talking to Windows fails.
pub const INTEROP_ADVICE: &str = "Registering the Windows logon task needs WSL's Windows interop (running .exe files from \
     WSL; on by default, `[interop] enabled=true` in /etc/wsl.conf). Alternatively run installers/install-wsl.ps1 from \
     PowerShell on Windows, or enable systemd in the distribution (`[boot] systemd=true` in /etc/wsl.conf, then \
     `wsl.exe --shutdown`) and install again to get a systemd unit.";

/// WSL 1 (a translation layer, no real Linux kernel) or WSL 2 (a VM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WslVersion {
    Wsl1,
    Wsl2,
}

/// Whether a kernel release string (`/proc/sys/kernel/osrelease`) is WSL's.
pub fn is_wsl_kernel(release: &str) -> bool {
    wsl_version(release).is_some()
}

/// `5.15.153.1-microsoft-standard-WSL2` → WSL 2; `4.4.0-19041-Microsoft` → WSL 1; anything else → not WSL.
pub fn wsl_version(release: &str) -> Option<WslVersion> {
    let lower = release.to_ascii_lowercase();
    if !lower.contains("microsoft") && !lower.contains("wsl") {
        return None;
    }
    if lower.contains("wsl2") || lower.contains("microsoft-standard") {
        Some(WslVersion::Wsl2)
    } else {
        Some(WslVersion::Wsl1)
    }
}

/// How the plan talks to Windows: for real, or with fixed answers (tests, dry runs on other machines).
#[derive(Debug, Clone)]
pub enum Interop {
    /// `whoami.exe` and `wslpath -w`.
    System,
    /// Given answers: the Windows user, and the UNC prefix for Linux paths (`\\wsl.localhost\Ubuntu`).
    Fixed {
        windows_user: String,
        unc_prefix: String,
    },
}

impl Interop {
    fn windows_user(&self) -> io::Result<String> {
        match self {
            Self::System => Ok(plan::run_checked(&["whoami.exe".into()])?
                .trim()
                .to_string()),
            Self::Fixed { windows_user, .. } => Ok(windows_user.clone()),
        }
    }

    fn windows_path(&self, path: &Path) -> io::Result<String> {
        match self {
            Self::System => {
                Ok(
                    plan::run_checked(&[
                        "wslpath".into(),
                        "-w".into(),
                        path.display().to_string(),
                    ])?
                    .trim()
                    .to_string(),
                )
            }
            Self::Fixed { unc_prefix, .. } => Ok(format!(
                "{unc_prefix}{}",
                path.display().to_string().replace('/', "\\")
            )),
        }
    }
}

fn distro(ctx: &Context) -> Result<&str, ServiceError> {
    let d = ctx.wsl_distro.as_deref().ok_or_else(|| {
        ServiceError::Unsupported(
            "cannot tell which WSL distribution this is (WSL_DISTRO_NAME is not set): run this from a WSL shell, \
             or set WSL_DISTRO_NAME to the name `wsl.exe -l` shows"
                .into(),
        )
    })?;
    if d.is_empty()
        || !d
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(ServiceError::Unsupported(format!(
            "the WSL distribution name {d:?} has characters a task command line cannot carry safely; \
             use installers/install-wsl.ps1 from Windows instead"
        )));
    }
    Ok(d)
}

/// The task's name in Task Scheduler (a `CodeTogether` folder, one task per distribution).
pub fn task_name(distro: &str) -> String {
    format!("CodeTogether\\ct-agent-{distro}")
}

pub fn launcher_path(ctx: &Context) -> PathBuf {
    ctx.config_dir.join(LAUNCHER)
}

pub fn log_file(ctx: &Context) -> PathBuf {
    ctx.config_dir.join(LOG)
}

/// The program and arguments the task runs: `wsl.exe -d <distro> --exec /bin/sh <launcher>`, started by a
/// hidden PowerShell so no console window sits on the desktop waiting to be closed by accident.
pub fn task_action(distro: &str, launcher: &Path) -> (String, String) {
    let launcher = launcher.display().to_string().replace('\'', "''");
    (
        "powershell.exe".into(),
        format!(
            "-NoProfile -NonInteractive -WindowStyle Hidden -Command \"wsl.exe -d {distro} --exec /bin/sh '{launcher}'\""
        ),
    )
}

/// `schtasks.exe /Create` for the task definition at `xml_windows_path`.
pub fn schtasks_create(distro: &str, xml_windows_path: &str) -> Vec<String> {
    [
        "schtasks.exe",
        "/Create",
        "/F",
        "/TN",
        &task_name(distro),
        "/XML",
        xml_windows_path,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The launcher script's text.
pub fn render_launcher(ctx: &Context, distro: &str) -> Result<String, RenderError> {
    let sh = render::sh_word;
    let claude = if ctx.claude_config_env {
        format!(
            "CLAUDE_CONFIG_DIR={}\nexport CLAUDE_CONFIG_DIR",
            sh(
                "Claude's config directory",
                &ctx.claude_config_dir.display().to_string()
            )?
        )
    } else {
        String::new()
    };
    let values: BTreeMap<&str, String> = [
        ("DISTRO", distro.to_string()),
        ("SCRIPT", launcher_path(ctx).display().to_string()),
        (
            "CONFIG_DIR",
            sh(
                "the config directory",
                &ctx.config_dir.display().to_string(),
            )?,
        ),
        (
            "ALLOWED",
            sh(
                "an allowed folder",
                &render::comma_list("an allowed folder", &ctx.allowed_strings())?,
            )?,
        ),
        ("PATH", sh("PATH", &ctx.path_env)?),
        ("CLAUDE_CONFIG_DIR", claude),
        (
            "EXEC",
            sh("the ct-agent path", &ctx.exe.display().to_string())?,
        ),
        (
            "LOG",
            sh("the log file", &log_file(ctx).display().to_string())?,
        ),
        (
            "PIDFILE",
            sh(
                "the pid file",
                &ctx.config_dir.join(PIDFILE).display().to_string(),
            )?,
        ),
    ]
    .into_iter()
    .collect();
    render::fill(render::WSL_LAUNCHER, &values)
}

/// The Task Scheduler definition's text (written as UTF-16, as its declaration says).
pub fn render_task(ctx: &Context, distro: &str, windows_user: &str) -> Result<String, RenderError> {
    let (command, arguments) = task_action(distro, &launcher_path(ctx));
    let x = render::xml_text;
    let values: BTreeMap<&str, String> = [
        ("DISTRO", x("the distribution", distro)?),
        ("TASK_NAME", x("the task name", &task_name(distro))?),
        ("WINDOWS_USER", x("the Windows user", windows_user)?),
        ("COMMAND", x("the command", &command)?),
        ("ARGUMENTS", x("the arguments", &arguments)?),
    ]
    .into_iter()
    .collect();
    render::fill(render::WSL_TASK, &values)
}

/// Launcher script, task definition, `schtasks /Create`, start it now, remove the definition file.
pub fn install_plan(ctx: &Context, interop: &Interop) -> Result<Plan, ServiceError> {
    let distro = distro(ctx)?;
    let io_err = |what: &str| {
        let what = what.to_string();
        move |source| ServiceError::Io {
            what: format!("{what}; {INTEROP_ADVICE}"),
            source,
        }
    };
    let windows_user = interop
        .windows_user()
        .map_err(io_err("cannot ask Windows who you are (whoami.exe)"))?;
    let xml = ctx.config_dir.join(TASK_XML);
    let xml_win = interop
        .windows_path(&xml)
        .map_err(io_err("cannot translate a path for Windows (wslpath -w)"))?;
    let mut plan = Plan::default();
    plan.steps.push(Step::Mkdir {
        path: ctx.config_dir.clone(),
        mode: 0o700,
    });
    plan.steps.push(Step::Write(Rendered::utf8(
        launcher_path(ctx),
        0o700,
        render_launcher(ctx, distro)?,
    )));
    plan.steps.push(Step::Write(Rendered {
        path: xml.clone(),
        mode: 0o644,
        text: render_task(ctx, distro, &windows_user)?,
        utf16: true,
    }));
    let create = schtasks_create(distro, &xml_win);
    let create: Vec<&str> = create.iter().map(String::as_str).collect();
    plan.run(&create, "register the logon task");
    plan.run(
        &["schtasks.exe", "/Run", "/TN", &task_name(distro)],
        "start it now",
    );
    plan.steps.push(Step::Remove { path: xml });
    plan.notes.push(format!(
        "The task \"{}\" starts the agent in {distro} at every Windows logon. Check it with `ct-agent service status` \
         and `ct-agent service logs` (log: {}).",
        task_name(distro),
        log_file(ctx).display()
    ));
    plan.notes.push(
        "WSL stops a distribution some seconds after its last process ends; the running agent keeps it up. \
         Windows does not run logon tasks before you log in: for an always-on machine, enable systemd in WSL \
         and start WSL at boot instead (see the README)."
            .into(),
    );
    Ok(plan)
}

/// End and delete the task, stop the launcher, remove the files install created.
pub fn uninstall_plan(ctx: &Context) -> Result<Plan, ServiceError> {
    let distro = distro(ctx)?;
    let name = task_name(distro);
    let mut plan = Plan::default();
    plan.run_may_fail(
        &["schtasks.exe", "/End", "/TN", &name],
        "stop the task if it runs",
    );
    plan.run_may_fail(
        &["schtasks.exe", "/Delete", "/F", "/TN", &name],
        "remove the logon task",
    );
    if let Some(pid) = launcher_pid(ctx) {
        plan.run_may_fail(
            &["kill", "-TERM", &pid.to_string()],
            "stop the launcher, which stops the agent",
        );
    }
    for file in [LAUNCHER, PIDFILE, TASK_XML, LOG, "service.log.1"] {
        plan.steps.push(Step::Remove {
            path: ctx.config_dir.join(file),
        });
    }
    Ok(plan)
}

/// The running launcher's pid, from its pid file.
fn launcher_pid(ctx: &Context) -> Option<u32> {
    let pid = std::fs::read_to_string(ctx.config_dir.join(PIDFILE))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    crate::sys::process_alive(pid).then_some(pid)
}

/// `schtasks /Query /FO LIST` → the task's `Status:` (Ready, Running, Disabled).
pub fn parse_query(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Status:"))
        .map(|s| s.trim().to_string())
}

pub fn status(ctx: &Context) -> ServiceStatus {
    let name = ctx
        .wsl_distro
        .as_deref()
        .map(task_name)
        .unwrap_or_else(|| task_name("?"));
    let launcher = launcher_pid(ctx);
    let query = plan::run_checked(&[
        "schtasks.exe".into(),
        "/Query".into(),
        "/TN".into(),
        name.clone(),
        "/FO".into(),
        "LIST".into(),
    ]);
    let (installed, mut detail) = match &query {
        Ok(text) => (
            true,
            format!(
                "task status {}",
                parse_query(text).unwrap_or_else(|| "?".into())
            ),
        ),
        Err(e) => (launcher_path(ctx).exists(), format!("schtasks.exe: {e}")),
    };
    let running = launcher.is_some();
    if let Some(pid) = launcher {
        detail.push_str(&format!(", launcher pid {pid}"));
    }
    let advice = if !installed {
        Some("install it with `ct-agent service install`".into())
    } else if !running {
        Some(format!(
            "start it with `schtasks.exe /Run /TN {name}`; see why it stopped with `ct-agent service logs`"
        ))
    } else {
        None
    };
    ServiceStatus {
        manager: Manager::WindowsTask,
        name,
        installed,
        running,
        detail,
        advice,
    }
}
