//! `ct-agent project ...` as a user types it: the policy library behind it is tested in projects.rs; this
//! checks the command line, its messages and what it writes.

use std::process::Command;

fn agent(config: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ct-agent"));
    c.arg("--config-dir")
        .arg(config)
        .env_remove("ALLOWED_PROJECT_DIRS")
        .env("LOG_LEVEL", "error");
    c
}

fn run(c: &mut Command) -> (bool, String) {
    let o = c.output().unwrap();
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

#[test]
fn add_list_remove_and_refusals() {
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, app) = (tmp.path().join("cfg"), tmp.path().join("src/app"));
    std::fs::create_dir_all(&app).unwrap();

    let (ok, out) = run(agent(&cfg).args(["project", "list"]));
    assert!(ok && out.contains("No folder is allowed yet"), "{out}");

    let (ok, out) = run(agent(&cfg).args(["project", "add", "app"]).arg(&app));
    assert!(ok && out.contains("Project app is"), "{out}");
    let (ok, out) = run(agent(&cfg).args(["project", "list", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert!(ok);
    assert_eq!(v["projects"][0]["name"], "app");

    let (ok, out) = run(agent(&cfg).args(["project", "add", "Bad Name"]).arg(&app));
    assert!(!ok && out.contains("not a valid project name"), "{out}");
    let (ok, out) = run(agent(&cfg).args(["project", "add", "gone", "/definitely/not/here"]));
    assert!(!ok && out.contains("does not exist"), "{out}");

    let (ok, out) = run(agent(&cfg).args(["project", "remove", "app"]));
    assert!(ok && out.contains("Removed project app"), "{out}");
    let (ok, out) = run(agent(&cfg).args(["project", "remove", "app"]));
    assert!(!ok && !out.is_empty(), "{out}");
}
