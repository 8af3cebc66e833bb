//! The real nats-server the cluster tests run: it speaks NATS to a raw client, drops a client that stops
//! answering pings within seconds, comes back on the same port after a kill, and dies with the test binary.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ct_testkit::NatsServer;
use serde_json::Value;

/// A NATS client by hand over TCP (the test kit must not depend on async-nats).
struct Raw {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Raw {
    /// Connects and returns the client with the server's `INFO` object.
    fn connect(addr: SocketAddr) -> (Raw, Value) {
        let writer = TcpStream::connect(addr).expect("connecting to nats-server");
        writer
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut raw = Raw {
            reader: BufReader::new(writer.try_clone().unwrap()),
            writer,
        };
        let line = raw.line();
        let info = line
            .strip_prefix("INFO ")
            .unwrap_or_else(|| panic!("expected INFO first, got {line:?}"));
        (raw, serde_json::from_str(info).expect("INFO carries JSON"))
    }

    fn send(&mut self, text: &str) {
        self.writer.write_all(text.as_bytes()).unwrap();
    }

    /// The next protocol line, without its CRLF.
    fn line(&mut self) -> String {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .expect("reading from nats-server");
        assert!(n > 0, "nats-server closed the connection");
        line.trim_end_matches("\r\n").to_owned()
    }

    /// `CONNECT` then `PING`; the server answers `PONG` once it has taken the connection.
    fn handshake(&mut self) {
        self.send("CONNECT {\"verbose\":false,\"pedantic\":true}\r\nPING\r\n");
        assert_eq!(self.line(), "PONG");
    }
}

fn refuses(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err()
}

#[test]
fn a_raw_client_connects_pings_and_gets_its_own_message() {
    let server = NatsServer::start().unwrap();
    assert!(
        server.url().starts_with("nats://127.0.0.1:"),
        "{}",
        server.url()
    );
    let (mut client, info) = Raw::connect(server.addr());
    assert_eq!(info["port"], u64::from(server.addr().port()), "{info}");
    assert_eq!(info["host"], "127.0.0.1", "{info}");
    client.handshake();

    // A real broker, not just a greeting: a message published to a subject comes back to its subscriber.
    client.send("SUB agent.a1 1\r\nPUB agent.a1 5\r\nhello\r\nPING\r\n");
    assert_eq!(client.line(), "MSG agent.a1 1 5");
    assert_eq!(client.line(), "hello");
    assert_eq!(client.line(), "PONG");

    assert!(
        std::fs::read_to_string(server.log_path())
            .unwrap()
            .contains("Server is ready"),
        "the server logs to its file"
    );
}

#[test]
fn a_client_that_stops_answering_pings_is_dropped_within_seconds() {
    let server = NatsServer::start().unwrap();
    let (mut client, _) = Raw::connect(server.addr());
    client.handshake();
    client.send("SUB agent.a1 1\r\n");
    let started = Instant::now();
    // Read the server's PINGs without answering, as a frozen or SIGKILLed-but-not-yet-reset node would. The
    // default interval (two minutes) would outlast the read timeout; the test kit's one second must not.
    let mut pings = 0;
    let mut rest = String::new();
    loop {
        let mut line = String::new();
        match client.reader.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) if line == "PING\r\n" => pings += 1,
            Ok(_) => rest.push_str(&line),
            Err(e) => panic!(
                "the server kept a silent client for {:?}: {e}",
                started.elapsed()
            ),
        }
    }
    assert!(pings >= 1, "the server closed without pinging first");
    assert!(
        rest.contains("Stale Connection"),
        "expected a stale-connection error, got {rest:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn killed_and_restarted_on_the_same_port() {
    let mut server = NatsServer::start().unwrap();
    let url = server.url();
    let (mut client, _) = Raw::connect(server.addr());
    client.handshake();

    server.kill();
    assert!(!server.is_running());
    let mut rest = Vec::new();
    let _ = client.reader.read_to_end(&mut rest);
    assert!(refuses(server.addr()), "a killed server still accepts");

    server.restart().unwrap();
    assert!(server.is_running());
    assert_eq!(server.url(), url, "restart keeps the port");
    let (mut client, _) = Raw::connect(server.addr());
    client.handshake();

    // Restarting a running server kills it first, and it comes back all the same.
    server.restart().unwrap();
    let (mut client, _) = Raw::connect(server.addr());
    client.handshake();
}

#[test]
fn dropping_the_server_kills_it() {
    let server = NatsServer::start().unwrap();
    let addr = server.addr();
    drop(server);
    assert!(refuses(addr), "a dropped server still accepts");
}

#[test]
fn a_server_outlives_the_thread_that_started_it() {
    // The parent-death signal follows the thread that spawned the server: a server started by a test thread
    // that has since ended (as the shared one is) must still be up.
    let mut server = std::thread::spawn(|| NatsServer::start().unwrap())
        .join()
        .unwrap();
    assert!(server.is_running());
    let (mut client, _) = Raw::connect(server.addr());
    client.handshake();

    let shared = std::thread::spawn(|| NatsServer::shared().addr())
        .join()
        .unwrap();
    assert_eq!(
        NatsServer::shared().addr(),
        shared,
        "one shared server per binary"
    );
    let (mut client, _) = Raw::connect(shared);
    client.handshake();
}

/// The environment variable that turns [`holds_a_server_until_killed`] from a no-op into the helper.
const HELPER_ENV: &str = "CT_TESTKIT_NATS_HELPER";

#[test]
fn a_killed_test_binary_leaves_no_server_behind() {
    let mut helper = Command::new(std::env::current_exe().unwrap())
        .args([
            "nats::holds_a_server_until_killed",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(HELPER_ENV, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(helper.stdout.take().unwrap());
    let addr: SocketAddr = loop {
        let mut line = String::new();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "the helper ended without starting a server"
        );
        if let Some(addr) = line.trim().strip_prefix("NATS_ADDR=") {
            break addr.parse().unwrap();
        }
    };
    let (mut client, _) = Raw::connect(addr);
    client.handshake();

    helper.kill().unwrap();
    helper.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !refuses(addr) {
        assert!(
            Instant::now() < deadline,
            "nats-server on {addr} outlived the test binary that started it"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Run by [`a_killed_test_binary_leaves_no_server_behind`] in a child process: starts a server, prints its
/// address and waits to be SIGKILLed.
#[test]
#[ignore = "a helper: a_killed_test_binary_leaves_no_server_behind runs it in a child process"]
fn holds_a_server_until_killed() {
    if std::env::var_os(HELPER_ENV).is_none() {
        return;
    }
    // Leaked: the server must not be dropped (and killed) by this process, only by its death.
    let server = Box::leak(Box::new(NatsServer::start().unwrap()));
    println!("NATS_ADDR={}", server.addr());
    std::io::stdout().flush().unwrap();
    loop {
        std::thread::park();
    }
}
