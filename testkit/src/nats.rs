//! A real `nats-server` (Debian's package) on loopback for the cluster tests: started on a port the server
//! picks itself, killed and restarted on that same port, and never outliving the test binary.
//!
//! The calls block briefly (start and restart wait for the server to greet a client, usually some 10 ms);
//! they are meant for test setup, where that is fine even on a runtime worker.

use std::io::{BufRead as _, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use tempfile::TempDir;

/// How long a start or restart may take before it counts as failed.
const START_LIMIT: Duration = Duration::from_secs(10);

/// The server pings each client this often and drops it after [`PING_MAX`] unanswered pings, so a SIGKILLed
/// relay node's subscriptions are gone within about three seconds rather than the default six minutes.
const PING_INTERVAL: &str = "1s";
const PING_MAX: u32 = 2;

/// A running `nats-server` on 127.0.0.1. Killed (SIGKILL) when dropped; if the test binary itself dies, the
/// kernel kills the server too (`setpriv --pdeathsig KILL`), so no server is left behind.
#[derive(Debug)]
pub struct NatsServer {
    dir: TempDir,
    port: u16,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a server on a free port of 127.0.0.1 and waits until it greets a client.
    ///
    /// The server binds port 0 itself (`-p -1`) and reports the port in a ports file, so two tests starting
    /// servers at once cannot race for one port.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with("")
    }

    /// [`start`](Self::start), with a server that admits only clients that authenticate as `user` with
    /// `password`.
    pub fn start_with_user(user: &str, password: &str) -> anyhow::Result<Self> {
        let quoted = |s: &str| serde_json::to_string(s).expect("a string serializes");
        Self::start_with(&format!(
            "authorization {{ user: {}, password: {} }}\n",
            quoted(user),
            quoted(password)
        ))
    }

    fn start_with(conf: &str) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("ct-nats-")
            .tempdir()
            .context("temp dir for nats-server")?;
        std::fs::write(
            dir.path().join("nats.conf"),
            format!("ping_interval: \"{PING_INTERVAL}\"\nping_max: {PING_MAX}\n{conf}"),
        )
        .context("writing nats.conf")?;
        let mut server = NatsServer {
            dir,
            port: 0,
            child: None,
        };
        let child = server.spawn("-1")?;
        let pid = child.id();
        server.child = Some(child);
        server.port = server.wait_for_ports_file(pid)?;
        server.wait_ready()?;
        Ok(server)
    }

    /// One server for the whole test binary, for tests that only need somewhere to connect. Never killed or
    /// restarted by a test (those take `&mut self`); it dies with the test binary.
    ///
    /// # Panics
    /// If the server cannot start (for instance, `nats-server` is not installed).
    pub fn shared() -> &'static NatsServer {
        static SHARED: OnceLock<NatsServer> = OnceLock::new();
        SHARED.get_or_init(|| NatsServer::start().expect("starting the shared nats-server"))
    }

    /// `nats://127.0.0.1:PORT`, for `--nats-url` / `CT_NATS_URL`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The server's log file (it logs there, not to the test's output). Read it when a test fails.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats.log")
    }

    /// Whether the server process is still running (it may have exited on its own).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Kills the server with SIGKILL, as a crashed host would, and waits until it is gone. Clients see their
    /// connections drop. Does nothing if it is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (killing it first if it still runs) and waits until it greets
    /// a client, so that clients holding [`NatsServer::url`] can reconnect.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.child = Some(self.spawn(&self.port.to_string())?);
        self.wait_ready()
    }

    fn spawn(&self, port: &str) -> anyhow::Result<Child> {
        let nats = find_binary("nats-server", &["/usr/sbin", "/usr/local/sbin", "/usr/bin"])
            .context(
                "nats-server is not installed: the cluster tests run a real one. Run scripts/test, which \
                 installs it (Debian package nats-server), or `apt-get install nats-server`",
            )?;
        let setpriv = find_binary("setpriv", &["/usr/bin", "/bin"]).context(
            "setpriv (util-linux) is missing: it makes nats-server die with the test binary. Install util-linux",
        )?;
        let dir = self.dir.path();
        let mut cmd = Command::new(setpriv);
        cmd.args(["--pdeathsig", "KILL", "--"])
            .arg(nats)
            .arg("-c")
            .arg(dir.join("nats.conf"))
            .args(["-a", "127.0.0.1", "-p", port])
            .arg("--ports_file_dir")
            .arg(dir)
            .arg("-l")
            .arg(self.log_path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        spawn_from_lasting_thread(cmd).context("spawning nats-server")
    }

    /// Waits for the ports file the server writes once it listens (`nats-server_<pid>.ports`) and reads the
    /// port from it.
    fn wait_for_ports_file(&mut self, pid: u32) -> anyhow::Result<u16> {
        let file = self.dir.path().join(format!("nats-server_{pid}.ports"));
        let deadline = Instant::now() + START_LIMIT;
        loop {
            // The server writes the file in one go, but a read may still catch it empty or half written.
            if let Ok(text) = std::fs::read_to_string(&file) {
                if let Ok(ports) = serde_json::from_str::<PortsFile>(&text) {
                    let url = ports
                        .nats
                        .first()
                        .context("the ports file names no client URL")?;
                    let port = url
                        .rsplit(':')
                        .next()
                        .and_then(|p| p.parse().ok())
                        .with_context(|| format!("no port in {url:?}"))?;
                    return Ok(port);
                }
            }
            self.check_alive_before(deadline, "to report its port")?;
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until a client connecting to the port receives the server's `INFO` greeting.
    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_LIMIT;
        loop {
            if greets(self.addr()) {
                return Ok(());
            }
            self.check_alive_before(deadline, "to accept connections")?;
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn check_alive_before(&mut self, deadline: Instant, what: &str) -> anyhow::Result<()> {
        if !self.is_running() {
            bail!(
                "nats-server exited while starting ({}); its log:\n{}",
                self.describe_exit(),
                read_log(&self.log_path())
            );
        }
        if Instant::now() >= deadline {
            self.kill();
            bail!(
                "nats-server took longer than {START_LIMIT:?} {what}; its log:\n{}",
                read_log(&self.log_path())
            );
        }
        Ok(())
    }

    fn describe_exit(&mut self) -> String {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(Some(status))) => status.to_string(),
            _ => "not running".into(),
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

#[derive(serde::Deserialize)]
struct PortsFile {
    nats: Vec<String>,
}

/// Whether a server on `addr` sends its `INFO` line to a new client.
fn greets(addr: SocketAddr) -> bool {
    let Ok(stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).is_ok() && line.starts_with("INFO ")
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| format!("(no log at {}: {e})", path.display()))
}

/// `name` on PATH, else in one of `dirs` (Debian installs nats-server in /usr/sbin, which a user's PATH may
/// lack). The browser harness finds chromedriver with it too.
pub(crate) fn find_binary(name: &str, dirs: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(dirs.iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Spawns `cmd` from one thread that lives as long as the test binary.
///
/// The parent-death signal fires when the *thread* that forked the child exits, not the process: a server
/// spawned from a test's own thread would be killed when that test ends, which would take the shared server
/// down under the next test. Spawning from a thread that never exits ties the server to the process instead.
fn spawn_from_lasting_thread(cmd: Command) -> std::io::Result<Child> {
    type Job = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    let jobs = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("ct-testkit-spawner".into())
            .spawn(move || {
                // The sender lives in a static, so this loop runs until the process exits.
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("starting the spawner thread");
        Mutex::new(tx)
    });
    let (reply, result) = mpsc::channel();
    jobs.lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, reply))
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?;
    result
        .recv()
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?
}
