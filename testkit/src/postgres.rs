//! `PgServer`: a real, throwaway PostgreSQL server on loopback for the tests of the relay's PostgreSQL store
//! and of the cluster.
//!
//! The server is Debian's (`postgresql` package, binaries under `/usr/lib/postgresql/<version>/bin`; `scripts/test`
//! installs it): `initdb` in a temporary directory, `postgres` on 127.0.0.1 at a free port with its Unix socket in
//! that directory, fsync on, so the figures measured against it are the ones a real deployment would see.
//!
//! PostgreSQL refuses to run as root. When the tests run as root (containers, CI), the server runs as Debian's
//! `postgres` user: the temporary directory is given to that user and the child drops privileges before it
//! execs. Either way the server dies with the test binary: it is a direct child that asks the kernel for SIGKILL
//! when its parent goes (`PR_SET_PDEATHSIG`), so a test binary killed by a timeout leaves no server behind. The
//! directories of servers whose test binary was killed are removed by the next server started.

use std::io::{self, Read as _, Seek as _, SeekFrom};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

/// What temporary directories of servers are called, so that leftovers can be found and removed.
const DIR_PREFIX: &str = "ct-testkit-pg-";
/// The file in a server's directory naming the process (the test binary) that started it.
const OWNER_FILE: &str = "owner.pid";
/// How long starting a server may take (initdb excluded): a loaded 2-core machine runs several test binaries.
const START_LIMIT: Duration = Duration::from_secs(60);
/// The superuser every server is initialised with, whatever user runs it.
const SUPERUSER: &str = "postgres";

/// A running PostgreSQL server that belongs to the test (or, for [`PgServer::shared`], to the test binary).
/// Dropping it kills the server and removes its data.
#[derive(Debug)]
pub struct PgServer {
    bin: PathBuf,
    /// Holds `data/` (the cluster), the Unix socket and `server.log`; removed on drop.
    dir: tempfile::TempDir,
    port: u16,
    settings: Vec<(String, String)>,
    /// The user the server runs as, when the tests run as root.
    run_as: Option<(u32, u32)>,
    child: Mutex<Option<Child>>,
}

impl PgServer {
    /// The server shared by every test of this test binary, started on first use. Tests give themselves a
    /// database of their own on it ([`create_database`](Self::create_database)).
    pub fn shared() -> &'static PgServer {
        SHARED.get_or_init(|| {
            let server = PgServer::start()
                .unwrap_or_else(|e| panic!("starting the test PostgreSQL server: {e:#}"));
            remove_shared_at_exit();
            server
        })
    }

    /// A server of the caller's own, for tests that kill and restart it.
    pub fn start() -> anyhow::Result<PgServer> {
        Self::start_with(&[])
    }

    /// [`start`](Self::start) with extra server settings (`-c name=value`), e.g. to make the WAL writer lazy.
    pub fn start_with(settings: &[(&str, &str)]) -> anyhow::Result<PgServer> {
        Self::start_inner(settings, None)
    }

    /// A server that also accepts TLS (`ssl=on`) with this certificate and key (PEM); clients may still
    /// connect without TLS, as with a default Debian server.
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> anyhow::Result<PgServer> {
        Self::start_inner(&[], Some((cert_pem, key_pem)))
    }

    fn start_inner(
        settings: &[(&str, &str)],
        tls: Option<(&str, &str)>,
    ) -> anyhow::Result<PgServer> {
        let bin = bin_dir()?;
        sweep_leftovers();
        let dir = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir()
            .context("creating the server's temporary directory")?;
        std::fs::write(dir.path().join(OWNER_FILE), std::process::id().to_string())?;
        let mut settings: Vec<(String, String)> = settings
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if let Some((cert, key)) = tls {
            use std::os::unix::fs::PermissionsExt as _;
            let (cert_path, key_path) =
                (dir.path().join("server.crt"), dir.path().join("server.key"));
            std::fs::write(&cert_path, cert)?;
            std::fs::write(&key_path, key)?;
            // PostgreSQL refuses a key others can read.
            std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600))?;
            settings.push(("ssl".into(), "on".into()));
            settings.push(("ssl_cert_file".into(), cert_path.display().to_string()));
            settings.push(("ssl_key_file".into(), key_path.display().to_string()));
        }
        let run_as = if is_root() {
            let ids = postgres_user()?;
            chown_tree(dir.path(), ids)?;
            Some(ids)
        } else {
            None
        };
        let data = dir.path().join("data");
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--locale=C"])
            // Only initdb's own final sync of the new files: the server itself runs with fsync on.
            .arg("--no-sync")
            .stdin(Stdio::null());
        if let Some((uid, gid)) = run_as {
            initdb.uid(uid).gid(gid);
        }
        let out = initdb.output().context("running initdb")?;
        if !out.status.success() {
            bail!(
                "initdb failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut server = PgServer {
            bin,
            dir,
            port: 0,
            settings,
            run_as,
            child: Mutex::new(None),
        };
        // A free port is only free until someone else binds it: try another if the server could not.
        let mut attempts = 0;
        loop {
            server.port = free_port()?;
            match server.run() {
                Ok(()) => return Ok(server),
                Err(e) if attempts < 5 && format!("{e:#}").contains("could not bind") => {
                    attempts += 1;
                    tracing::debug!(error = %e, "port taken meanwhile, trying another");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The superuser's URL of the `postgres` database.
    pub fn url(&self) -> String {
        self.url_of("postgres")
    }

    /// The superuser's URL of database `name`.
    pub fn url_of(&self, name: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{name}", self.port)
    }

    /// The server's process id (its postmaster), while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(Child::id)
    }

    /// The port the server listens on (the same after [`restart`](Self::restart)).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Creates database `name` unless it exists, and returns its URL. `name` is a plain identifier (letters,
    /// digits, `_`).
    pub fn create_database(&self, name: &str) -> anyhow::Result<String> {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            bail!("{name:?} is not a plain database name");
        }
        off_runtime(|| {
            let mut client = postgres::Client::connect(&self.url(), postgres::NoTls)
                .with_context(|| format!("connecting to the test server on port {}", self.port))?;
            match client.batch_execute(&format!("CREATE DATABASE \"{name}\"")) {
                Ok(()) => Ok(self.url_of(name)),
                Err(e) if e.code() == Some(&postgres::error::SqlState::DUPLICATE_DATABASE) => {
                    Ok(self.url_of(name))
                }
                Err(e) => Err(e).with_context(|| format!("creating database {name}")),
            }
        })
    }

    /// Kills the server with SIGKILL (as a crash or the OOM killer would) and waits until it is gone: its
    /// postmaster, and the backends that served connections, which exit on their own a moment later when they
    /// notice. Until then a connection opened before could still be answered.
    pub fn kill(&self) {
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(mut c) = child.take() {
            let _ = c.kill();
            let _ = c.wait();
            let data = self.dir.path().join("data");
            let data = data.canonicalize().unwrap_or(data);
            let deadline = Instant::now() + Duration::from_secs(10);
            // Polled: nothing signals the end of processes that are not our children.
            while processes_in(&data) > 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Starts the killed server again on the same port and data directory (it recovers from its WAL).
    pub fn restart(&self) -> anyhow::Result<()> {
        self.kill();
        self.run()
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Spawns `postgres` and waits until it accepts connections.
    fn run(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_LIMIT;
        loop {
            let log_start = std::fs::metadata(self.dir.path().join("server.log"))
                .map(|m| m.len())
                .unwrap_or(0);
            let mut child = self.spawn()?;
            match self.wait_ready(&mut child, deadline) {
                Ok(()) => {
                    *self.child.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);
                    return Ok(());
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let log = self.log_since(log_start);
                    // After a SIGKILL, the old server's backends notice their postmaster is gone and exit a
                    // moment later; until then the data directory's shared memory is still in use.
                    if log.contains("still in use") && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                    return Err(e.context(format!("server log:\n{log}")));
                }
            }
        }
    }

    fn spawn(&self) -> anyhow::Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))?;
        if let Some(ids) = self.run_as {
            chown_tree(&self.dir.path().join("server.log"), ids)?;
        }
        let mut cmd = Command::new(self.bin.join("postgres"));
        cmd.arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-p", &self.port.to_string()])
            .arg("-k")
            .arg(self.dir.path())
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=on"])
            // The contract tests open a few dozen stores at once, each with a small pool.
            .args(["-c", "max_connections=200"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for (k, v) in &self.settings {
            cmd.arg("-c").arg(format!("{k}={v}"));
        }
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        die_with_parent(&mut cmd);
        spawn_from_keeper(cmd).context("spawning postgres")
    }

    fn wait_ready(&self, child: &mut Child, deadline: Instant) -> anyhow::Result<()> {
        loop {
            if let Some(status) = child.try_wait()? {
                bail!("postgres exited before it accepted connections ({status})");
            }
            let mut config: postgres::Config = self.url().parse()?;
            config.connect_timeout(Duration::from_secs(2));
            // The client is dropped on that thread too: closing it blocks on its runtime as well.
            match off_runtime(|| config.connect(postgres::NoTls).map(drop)) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    bail!("postgres did not accept connections within {START_LIMIT:?}: {e}")
                }
                // Polled: nothing tells us when the server is ready but trying.
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    fn log_since(&self, offset: u64) -> String {
        let mut out = String::new();
        if let Ok(mut f) = std::fs::File::open(self.dir.path().join("server.log")) {
            let _ = f.seek(SeekFrom::Start(offset));
            let _ = f.read_to_string(&mut out);
        }
        out
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.kill();
    }
}

static SHARED: OnceLock<PgServer> = OnceLock::new();

/// A static is never dropped: the shared server is stopped and its directory removed when the test binary
/// exits, so that a test run leaves nothing behind. (A binary that is killed cannot: the server dies with it,
/// and the next server started removes the directory.)
#[allow(unsafe_code)]
fn remove_shared_at_exit() {
    extern "C" fn remove() {
        if let Some(server) = SHARED.get() {
            server.kill();
            let _ = std::fs::remove_dir_all(server.dir.path());
        }
    }
    // SAFETY: `remove` is a plain function that stays valid for the life of the process. If registering it
    // fails, the directory is left for the next server's sweep.
    unsafe {
        libc::atexit(remove);
    }
}

/// Runs `f` on a thread of its own: the synchronous client runs a tokio runtime of its own, which cannot start
/// on a thread that is running one already (an async test's).
fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(f)
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// The newest PostgreSQL's binaries, or an error that says how to get them.
fn bin_dir() -> anyhow::Result<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").is_file().then_some((version, bin))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some((_, bin)) => Ok(bin),
        None => bail!(
            "no PostgreSQL server found under /usr/lib/postgresql/*/bin: the PostgreSQL tests run a real one. \
             scripts/test installs it (Debian package `postgresql`: apt-get install postgresql)"
        ),
    }
}

/// How many live processes run in `dir`: a PostgreSQL server's processes all work in its data directory.
fn processes_in(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        // A zombie has no working directory any more.
        .filter(|e| std::fs::read_link(e.path().join("cwd")).is_ok_and(|cwd| cwd == dir))
        .count()
}

/// Binds 127.0.0.1:0 to learn a port nobody uses right now.
fn free_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[allow(unsafe_code)]
fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Uid and gid of Debian's `postgres` user (created by the `postgresql` package).
fn postgres_user() -> anyhow::Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").context("reading /etc/passwd")?;
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&"postgres") && f.len() > 3)
                .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
                .flatten()
        })
        .context(
            "the tests run as root, and PostgreSQL refuses to: it needs a `postgres` user to run as \
             (Debian's `postgresql` package creates it; scripts/test installs that)",
        )
}

fn chown_tree(path: &Path, (uid, gid): (u32, u32)) -> io::Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
    if path.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), (uid, gid))?;
        }
    }
    Ok(())
}

/// Asks the kernel to SIGKILL the child when the thread that spawned it exits, which for the keeper thread
/// ([`spawn_from_keeper`]) is when the test binary exits, however it exits.
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe calls
    // (prctl, getppid) without allocating. It runs after the child dropped privileges: a change of
    // credentials clears the death signal, so setting it earlier would be undone.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before the line above: then no signal would ever come.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `cmd` from a thread that lives as long as the test binary. The death signal is tied to the thread
/// that forked the child, not to the process: a server spawned from a test's own thread would be killed when
/// that test ends, although [`PgServer::shared`] outlives it.
fn spawn_from_keeper(cmd: Command) -> io::Result<Child> {
    static KEEPER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("pg-keeper".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawning the thread that starts PostgreSQL servers");
        Mutex::new(tx)
    });
    let (reply, answer) = mpsc::channel();
    keeper
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send((cmd, reply))
        .map_err(|_| io::Error::other("the server keeper thread is gone"))?;
    answer
        .recv()
        .map_err(|_| io::Error::other("the server keeper thread is gone"))?
}

/// Removes the directories of servers whose test binary is gone (killed before it could clean up, or the
/// shared server's, which lives in a static that is never dropped). Their servers died with it.
fn sweep_leftovers() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with(DIR_PREFIX) {
            continue;
        }
        let Ok(owner) = std::fs::read_to_string(entry.path().join(OWNER_FILE)) else {
            continue;
        };
        let alive = owner
            .trim()
            .parse::<u32>()
            .is_ok_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if !alive {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
