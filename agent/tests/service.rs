//! The service files as the CLI renders them: every systemd unit passes `systemd-analyze verify`, every
//! plist parses (Python's plistlib) with the expected keys, the WSL launcher passes shellcheck and the task
//! definition is well-formed XML, WSL is recognised from kernel strings, and `--dry-run` prints the plan
//! and changes nothing. `installers/install.sh` passes shellcheck.
//!
//! The tools (systemd-analyze, shellcheck, python3) are required, never skipped: scripts/test installs them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ct_agent::service::{self, launchd, systemd, wsl, Context, Host, Manager, Options, Os, Step};

const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

fn tool(program: &str, args: &[&str]) -> Output {
    Command::new(program).args(args).output().unwrap_or_else(|e| {
        panic!("{program} is needed by this test and could not be run ({e}): run scripts/test, which installs it")
    })
}

fn whoami() -> String {
    String::from_utf8(tool("id", &["-un"]).stdout)
        .unwrap()
        .trim()
        .to_string()
}

/// A Linux host whose user is the one running the tests (system units name a user that must exist for
/// `systemd-analyze verify`) and whose agent binary is the real one (verify checks ExecStart exists).
fn host(os: Os, home: &Path, version: u32) -> Host {
    let env: BTreeMap<String, String> = [
        ("PATH", "/usr/local/bin:/usr/bin:/bin"),
        ("ALLOWED_PROJECT_DIRS", "/srv/project one,/srv/100%"),
        ("WSL_DISTRO_NAME", "Ubuntu-24.04"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    Host {
        os,
        kernel_release: "6.8.0-generic".into(),
        systemd_running: true,
        systemd_version: Some(version),
        user: whoami(),
        uid: 1000,
        home: home.to_path_buf(),
        exe: PathBuf::from(env!("CARGO_BIN_EXE_ct-agent")),
        cwd: home.to_path_buf(),
        env,
    }
}

fn ctx(host: &Host, opts: &Options) -> Context {
    Context::resolve(host, opts, &|_| None).unwrap()
}

/// Runs `systemd-analyze verify` on `unit`; returns its stderr lines.
fn verify(unit: &str, user: bool) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(systemd::UNIT);
    std::fs::write(&path, unit).unwrap();
    let runtime = dir.path().join("runtime");
    std::fs::create_dir(&runtime).unwrap();
    let mut cmd = Command::new("systemd-analyze");
    if user {
        // A user manager needs a runtime directory; none exists for root in CI.
        cmd.arg("--user").env("XDG_RUNTIME_DIR", &runtime);
    }
    let out = cmd.arg("verify").arg(&path).output().unwrap_or_else(|e| {
        panic!("systemd-analyze is needed (apt-get install systemd; scripts/test does it): {e}")
    });
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{stderr}\n--- unit ---\n{unit}"
    );
    stderr
        .lines()
        .map(str::to_string)
        .filter(|l| !l.trim().is_empty())
        .collect()
}

#[test]
fn every_rendered_systemd_unit_passes_systemd_analyze_verify() {
    let home = tempfile::tempdir().unwrap();
    let local =
        systemd::installed_version().expect("systemctl --version (install the systemd package)");
    let variants = [
        ("user", Options::default()),
        (
            "system",
            Options {
                system: true,
                ..Default::default()
            },
        ),
        (
            "user with extras",
            Options {
                allow_dirs: vec!["/opt/with \"quote\"".into()],
                rw_paths: vec![home.path().join(".cargo")],
                writable_home: true,
                ..Default::default()
            },
        ),
    ];
    for version in [252, 256] {
        let mut h = host(Os::Linux, home.path(), version);
        h.env
            .insert("CLAUDE_CONFIG_DIR".into(), "/srv/claude config".into());
        for (name, opts) in &variants {
            let c = ctx(&h, opts);
            let unit = systemd::render_unit(&c).unwrap();
            let warnings = verify(&unit, c.manager == Manager::SystemdUser);
            // A unit rendered for a newer systemd than this one may use keys this one does not know.
            let tolerated = |l: &str| {
                version > local
                    && (l.contains("Unknown key 'RestartSteps'")
                        || l.contains("Unknown key 'RestartMaxDelaySec'"))
            };
            let bad: Vec<_> = warnings.iter().filter(|l| !tolerated(l)).collect();
            assert!(
                bad.is_empty(),
                "{name} unit for systemd {version}: {bad:#?}\n{unit}"
            );
            assert!(unit.contains("RestartPreventExitStatus=78"), "{name}");
            assert_eq!(
                unit.contains("RestartSteps="),
                version >= systemd::RESTART_STEPS_SINCE,
                "{name}"
            );
            assert!(
                !unit.contains("agent.key\""),
                "the key path is never passed: {name}"
            );
        }
    }
}

#[test]
fn the_unit_carries_config_dir_allowed_folders_and_writable_paths() {
    let home = tempfile::tempdir().unwrap();
    let h = host(Os::Linux, home.path(), 256);
    let c = ctx(
        &h,
        &Options {
            allow_dirs: vec!["/data/x".into()],
            ..Default::default()
        },
    );
    let unit = systemd::render_unit(&c).unwrap();
    let config = home.path().join(".config/codetogether");
    for want in [
        format!("Environment=\"CT_AGENT_CONFIG_DIR={}\"", config.display()),
        "Environment=\"ALLOWED_PROJECT_DIRS=/srv/project one,/srv/100%%,/data/x\"".to_string(),
        format!("ReadWritePaths=\"-{}\"", config.display()),
        format!(
            "ReadWritePaths=\"-{}\"",
            home.path().join(".claude").display()
        ),
        "ReadWritePaths=\"-/srv/project one\"".into(),
        "ReadWritePaths=\"-/data/x\"".into(),
        "ProtectSystem=strict".into(),
        "ProtectHome=read-only".into(),
        "NoNewPrivileges=yes".into(),
        "PrivateTmp=yes".into(),
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK".into(),
    ] {
        assert!(unit.contains(&want), "missing {want:?} in\n{unit}");
    }
    // Every hardening line is explained by a comment somewhere above it.
    assert!(unit.lines().filter(|l| l.starts_with('#')).count() > 20);
}

/// Parses a plist with Python's plistlib into JSON.
fn parse_plist(text: &str) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.plist");
    std::fs::write(&path, text).unwrap();
    let out = tool(
        "python3",
        &[
            "-c",
            "import json,plistlib,sys; print(json.dumps(plistlib.load(open(sys.argv[1],'rb'))))",
            path.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "plistlib refused it: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn every_rendered_plist_parses_and_holds_the_expected_keys() {
    let home = tempfile::tempdir().unwrap();
    for claude_env in [false, true] {
        let mut h = host(Os::Macos, home.path(), 0);
        h.env
            .insert("PATH".into(), "/opt/homebrew/bin:/usr/bin:/bin".into());
        h.env
            .insert("ALLOWED_PROJECT_DIRS".into(), "/Users/a/R&D <x>".into());
        if claude_env {
            h.env
                .insert("CLAUDE_CONFIG_DIR".into(), "/Users/a/.claude-work".into());
        }
        let c = ctx(&h, &Options::default());
        assert_eq!(c.manager, Manager::Launchd);
        let v = parse_plist(&launchd::render_plist(&c).unwrap());
        assert_eq!(v["Label"], launchd::LABEL);
        assert_eq!(
            v["ProgramArguments"],
            serde_json::json!([env!("CARGO_BIN_EXE_ct-agent"), "run"])
        );
        assert_eq!(v["RunAtLoad"], true);
        assert_eq!(v["KeepAlive"]["SuccessfulExit"], false);
        assert_eq!(v["ThrottleInterval"], 10);
        let env = &v["EnvironmentVariables"];
        assert_eq!(
            env["CT_AGENT_CONFIG_DIR"],
            home.path()
                .join(".config/codetogether")
                .display()
                .to_string()
        );
        assert_eq!(env["ALLOWED_PROJECT_DIRS"], "/Users/a/R&D <x>");
        assert_eq!(env["PATH"], "/opt/homebrew/bin:/usr/bin:/bin");
        assert_eq!(env["CT_AGENT_SUPERVISOR"], "launchd");
        assert_eq!(env.get("CLAUDE_CONFIG_DIR").is_some(), claude_env);
        let log = launchd::log_file(&c).display().to_string();
        assert_eq!(v["StandardOutPath"], log);
        assert_eq!(v["StandardErrorPath"], log);
    }
}

#[test]
fn wsl_is_recognised_from_kernel_strings() {
    for (release, want) in [
        (
            "5.15.153.1-microsoft-standard-WSL2",
            Some(wsl::WslVersion::Wsl2),
        ),
        (
            "6.6.36.6-microsoft-standard-WSL2+",
            Some(wsl::WslVersion::Wsl2),
        ),
        ("4.19.128-microsoft-standard", Some(wsl::WslVersion::Wsl2)),
        ("4.4.0-19041-Microsoft", Some(wsl::WslVersion::Wsl1)),
        ("6.8.0-45-generic", None),
        ("6.18.44-fc-v445", None),
        ("5.15.0-1064-azure", None),
    ] {
        assert_eq!(wsl::wsl_version(release), want, "{release}");
        assert_eq!(wsl::is_wsl_kernel(release), want.is_some(), "{release}");
    }
}

#[test]
fn the_windows_task_and_its_schtasks_command_line() {
    let home = tempfile::tempdir().unwrap();
    let mut h = host(Os::Wsl, home.path(), 252);
    h.kernel_release = "5.15.153.1-microsoft-standard-WSL2".into();
    h.systemd_running = false;
    let c = ctx(&h, &Options::default());
    assert_eq!(c.manager, Manager::WindowsTask);
    let interop = wsl::Interop::Fixed {
        windows_user: r"LAPTOP\alice".into(),
        unc_prefix: r"\\wsl.localhost\Ubuntu-24.04".into(),
    };
    let plan = wsl::install_plan(&c, &interop).unwrap();
    let xml_linux = c.config_dir.join(wsl::TASK_XML);
    let xml_win = format!(
        r"\\wsl.localhost\Ubuntu-24.04{}",
        xml_linux.display().to_string().replace('/', "\\")
    );
    let runs: Vec<&Vec<String>> = plan
        .steps
        .iter()
        .filter_map(|s| match s {
            Step::Run { argv, .. } => Some(argv),
            _ => None,
        })
        .collect();
    assert_eq!(
        runs[0],
        &vec![
            "schtasks.exe".to_string(),
            "/Create".into(),
            "/F".into(),
            "/TN".into(),
            r"CodeTogether\ct-agent-Ubuntu-24.04".into(),
            "/XML".into(),
            xml_win
        ]
    );
    assert_eq!(
        runs[1],
        &vec![
            "schtasks.exe".to_string(),
            "/Run".into(),
            "/TN".into(),
            r"CodeTogether\ct-agent-Ubuntu-24.04".into()
        ]
    );

    let launcher = wsl::launcher_path(&c);
    let (command, args) = wsl::task_action("Ubuntu-24.04", &launcher);
    assert_eq!(command, "powershell.exe");
    assert!(
        args.ends_with(&format!(
            "\"wsl.exe -d Ubuntu-24.04 --exec /bin/sh '{}'\"",
            launcher.display()
        )),
        "{args}"
    );

    // The task definition: UTF-16 with a BOM, well-formed, no execution time limit, this user's logon only.
    let task = plan
        .steps
        .iter()
        .find_map(|s| match s {
            Step::Write(f) if f.utf16 => Some(f.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(&task.bytes()[..2], &[0xFF, 0xFE]);
    let dir = tempfile::tempdir().unwrap();
    let xml_file = dir.path().join("task.xml");
    std::fs::write(&xml_file, task.bytes()).unwrap();
    let out = tool(
        "python3",
        &[
            "-c",
            "import sys,xml.etree.ElementTree as E; ns={'t':'http://schemas.microsoft.com/windows/2004/02/mit/task'}; \
             r=E.parse(sys.argv[1]).getroot(); \
             print(r.find('t:Settings/t:ExecutionTimeLimit',ns).text, r.find('t:Triggers/t:LogonTrigger/t:UserId',ns).text, \
                   r.find('t:Actions/t:Exec/t:Command',ns).text, r.find('t:Settings/t:StopIfGoingOnBatteries',ns).text)",
            xml_file.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        r"PT0S LAPTOP\alice powershell.exe false"
    );

    // The launcher: valid sh, shellcheck-clean, honours 78.
    let script = wsl::render_launcher(&c, "Ubuntu-24.04").unwrap();
    assert!(script.contains("78)"), "{script}");
    let file = dir.path().join("launcher.sh");
    std::fs::write(&file, &script).unwrap();
    let out = tool("shellcheck", &["-s", "sh", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "shellcheck:\n{}\n{script}",
        String::from_utf8_lossy(&out.stdout)
    );

    let undo = wsl::uninstall_plan(&c).unwrap();
    let text = undo.describe();
    assert!(
        text.contains(r"schtasks.exe /Delete /F /TN 'CodeTogether\ct-agent-Ubuntu-24.04'")
            || text.contains(r"schtasks.exe /Delete /F /TN CodeTogether\ct-agent-Ubuntu-24.04"),
        "{text}"
    );
    assert!(
        text.contains(&format!("remove {}", launcher.display())),
        "{text}"
    );
}

#[test]
fn install_sh_passes_shellcheck() {
    let out = tool("shellcheck", &[&format!("{REPO}/installers/install.sh")]);
    assert!(
        out.status.success(),
        "shellcheck installers/install.sh:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Runs the real binary with a throwaway HOME.
fn ct_agent(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ct-agent"))
        .args(args)
        .env_clear()
        .env("HOME", home)
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("ALLOWED_PROJECT_DIRS", "/srv/a")
        .env("WSL_DISTRO_NAME", "Debian")
        .output()
        .unwrap()
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        }
        out.push(p);
    }
    out
}

#[test]
fn dry_run_prints_every_file_and_command_and_changes_nothing() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path().display().to_string();
    let cases: [(&[&str], &[&str]); 6] = [
        (
            &["service", "install", "--dry-run", "--allow-dir", "/srv/b"],
            &[
                "Dry run: install the agent as a systemd user unit",
                &format!("write {h}/.config/systemd/user/ct-agent.service (mode 644):"),
                "   | Environment=\"ALLOWED_PROJECT_DIRS=/srv/a,/srv/b\"",
                "   | ReadWritePaths=\"-/srv/b\"",
                "run: systemctl --user daemon-reload",
                "run: systemctl --user enable ct-agent.service",
                "run: systemctl --user restart ct-agent.service",
                "loginctl enable-linger",
            ],
        ),
        (
            &["service", "install", "--dry-run", "--system", "--target", "linux"],
            &["write /etc/systemd/system/ct-agent.service", "   | User=", "run: systemctl --system enable ct-agent.service"],
        ),
        (
            &["service", "uninstall", "--dry-run", "--target", "linux"],
            &[
                "run: systemctl --user disable --now ct-agent.service",
                &format!("remove {h}/.config/systemd/user/ct-agent.service"),
            ],
        ),
        (
            &["service", "install", "--dry-run", "--target", "macos"],
            &[
                &format!("write {h}/Library/LaunchAgents/dev.codetogether.agent.plist (mode 644):"),
                "   | \t\t<string>launchd</string>",
                "run: launchctl enable gui/",
                "run: launchctl bootstrap gui/",
            ],
        ),
        (
            &["service", "uninstall", "--dry-run", "--target", "macos"],
            &["run: launchctl bootout gui/", &format!("remove directory {h}/Library/Logs/codetogether")],
        ),
        (
            &["service", "install", "--dry-run", "--target", "wsl", "--windows-task"],
            &[
                &format!("write {h}/.config/codetogether/ct-agent-wsl.sh (mode 700):"),
                &format!("write {h}/.config/codetogether/ct-agent-task.xml (mode 644, UTF-16LE):"),
                "run: schtasks.exe /Create /F /TN 'CodeTogether\\ct-agent-Debian' /XML",
                "<Arguments>-NoProfile -NonInteractive -WindowStyle Hidden -Command &quot;wsl.exe -d Debian --exec /bin/sh",
            ],
        ),
    ];
    for (args, wants) in cases {
        let out = ct_agent(home.path(), args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{args:?}: {}\n{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        for want in wants {
            assert!(
                stdout.contains(want),
                "{args:?}: missing {want:?} in\n{stdout}"
            );
        }
        assert!(
            files_under(home.path()).is_empty(),
            "{args:?} changed {:?}",
            files_under(home.path())
        );
    }
}

#[test]
fn errors_say_what_to_do() {
    let home = tempfile::tempdir().unwrap();
    let out = ct_agent(
        home.path(),
        &[
            "service",
            "install",
            "--dry-run",
            "--target",
            "macos",
            "--system",
        ],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("LaunchAgent of your user"),
        "{out:?}"
    );
    let out = ct_agent(
        home.path(),
        &[
            "service",
            "install",
            "--dry-run",
            "--target",
            "linux",
            "--run-as",
            "x",
        ],
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("only applies to a system unit"),
        "{out:?}"
    );
}

#[test]
fn service_status_parses_what_managers_print() {
    let home = tempfile::tempdir().unwrap();
    let c = ctx(&host(Os::Linux, home.path(), 252), &Options::default());
    let s = systemd::parse_show(&c, "LoadState=loaded\nActiveState=activating\nSubState=auto-restart\nUnitFileState=enabled\nExecMainStatus=1\nNRestarts=5\n");
    assert!(s.installed && !s.running);
    assert!(s.render().contains("restarted 5 times"), "{}", s.render());
    let s = launchd::parse_print("\tstate = running\n\tpid = 7\n");
    assert!(s.running);
    assert_eq!(wsl::parse_query("Folder: \\CodeTogether\r\nTaskName: \\CodeTogether\\ct-agent-Debian\r\nStatus:   Running\r\n"), Some("Running".into()));
    assert_eq!(
        service::logs_command(&c, 50, true),
        vec![
            "journalctl",
            "--user",
            "-u",
            "ct-agent.service",
            "-n",
            "50",
            "--no-pager",
            "-f"
        ]
    );
}
