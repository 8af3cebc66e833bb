//! `PgServer`: a real PostgreSQL server starts, answers, hands out databases, survives a kill and a restart, and
//! never outlives the test binary that started it.

use std::io::BufRead as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ct_testkit::postgres::PgServer;
use postgres::{Client, NoTls};

fn connect(url: &str) -> Client {
    Client::connect(url, NoTls).expect("connecting to the test server")
}

#[test]
fn a_server_answers_keeps_its_data_across_a_kill_and_stops_when_dropped() {
    let server = PgServer::start().unwrap();
    let url = server.create_database("kit").unwrap();
    assert_eq!(
        server.create_database("kit").unwrap(),
        url,
        "asked again: the same database"
    );
    assert!(server.create_database("no; DROP").is_err());
    let mut db = connect(&url);
    let fsync: String = db.query_one("SHOW fsync", &[]).unwrap().get(0);
    assert_eq!(fsync, "on", "figures measured against it are honest");
    db.batch_execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
        .unwrap();
    drop(db);

    let port = server.port();
    server.kill();
    assert!(server.pid().is_none());
    assert!(Client::connect(&url, NoTls).is_err(), "killed");
    server.restart().unwrap();
    assert_eq!(server.port(), port);
    let n: i64 = connect(&url)
        .query_one("SELECT count(*) FROM t", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "committed data survives the crash");

    drop(server);
    assert!(Client::connect(&url, NoTls).is_err(), "dropped: stopped");
}

#[test]
fn the_shared_server_is_one_per_test_binary() {
    assert!(std::ptr::eq(PgServer::shared(), PgServer::shared()));
    let url = PgServer::shared().create_database("shared_one").unwrap();
    let one: i32 = connect(&url).query_one("SELECT 1", &[]).unwrap().get(0);
    assert_eq!(one, 1);
}

/// Cluster tests are async; the synchronous client must not try to start its runtime inside theirs.
#[tokio::test]
async fn databases_can_be_made_from_an_async_test() {
    let url = PgServer::shared().create_database("from_async").unwrap();
    assert!(url.ends_with("/from_async"), "{url}");
}

/// Run by `a_killed_test_binary_leaves_no_server_behind` in a child process: starts a server, says its pid,
/// and waits to be killed.
#[test]
#[ignore = "run by a_killed_test_binary_leaves_no_server_behind in a process of its own"]
fn server_for_the_kill_test() {
    let server = PgServer::start().unwrap();
    println!("SERVER PID {}", server.pid().unwrap());
    std::thread::sleep(Duration::from_secs(120));
}

/// A test binary killed (by a timeout, by a developer's ctrl-c) takes its servers with it.
#[test]
fn a_killed_test_binary_leaves_no_server_behind() {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "postgres::server_for_the_kill_test",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let pid = stdout
        .lines()
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("SERVER PID ").map(str::to_string))
        .expect("the child started a server");
    let proc_dir = format!("/proc/{pid}");
    assert!(Path::new(&proc_dir).exists());
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    // A zombie is gone too: its status says so until its new parent reaps it.
    while Path::new(&proc_dir).exists()
        && !std::fs::read_to_string(format!("{proc_dir}/stat")).is_ok_and(|s| s.contains(") Z "))
    {
        assert!(
            Instant::now() < deadline,
            "the server outlived its test binary"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
