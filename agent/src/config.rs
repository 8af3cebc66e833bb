//! The agent's config directory: where it is, its permissions, and the files in it (key, pairing, status).
//!
//! The directory is `0700` and every file in it is written atomically (temporary file in the same
//! directory, fsync, rename, fsync of the directory), so a crash or a full disk leaves either the old file or
//! the new one, never half of one. The key is `0600` and a key file that others can read is refused rather
//! than used: a leaked key lets someone else run tasks as this agent.

use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ct_protocol::Fingerprint;
use ed25519_dalek::SigningKey;
use rand::RngCore;
use serde::{Deserialize, Serialize};

/// Environment variable naming the config directory (also read by the CLI's `--config-dir`).
pub const ENV_CONFIG_DIR: &str = "CT_AGENT_CONFIG_DIR";

/// The agent's private key (ed25519 seed, base64).
pub const KEY_FILE: &str = "agent.key";
/// A freshly generated key during pairing, promoted to [`KEY_FILE`] once the relay has accepted it.
pub const PENDING_KEY_FILE: &str = "agent.key.pending";
/// Which relay and user this agent is bound to.
pub const PAIRING_FILE: &str = "pairing.json";
/// What the running agent is doing, for `ct-agent status`.
pub const STATUS_FILE: &str = "status.json";

/// Files we read are small; refuse anything larger rather than reading a surprise into memory.
const MAX_FILE_LEN: u64 = 64 * 1024;

/// Why the config directory or a file in it cannot be used. Each message names the path.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// None of `$CT_AGENT_CONFIG_DIR`, `$XDG_CONFIG_HOME` or `$HOME` is set.
    #[error(
        "cannot find a config directory: set CT_AGENT_CONFIG_DIR or HOME, or pass --config-dir"
    )]
    NoConfigDir,
    /// A filesystem operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// The key file can be read by other users.
    #[error(
        "{} is readable by other users (mode {mode:o}), so it is not used: the key may have leaked. \
         Run `chmod 600 {}` (and pair again if others had access)",
        path.display(),
        path.display()
    )]
    KeyTooOpen { path: PathBuf, mode: u32 },
    /// A file holds something other than what we wrote.
    #[error("{} is damaged ({reason}): pair again with `ct-agent pair --force <token>`", path.display())]
    Damaged { path: PathBuf, reason: String },
    /// A file is larger than any file we write.
    #[error("{} is larger than {MAX_FILE_LEN} bytes, which this agent never writes: remove it", path.display())]
    TooLarge { path: PathBuf },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ConfigError + 'a {
    move |source| ConfigError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Where the config directory is, from (in order) an explicit choice, `$CT_AGENT_CONFIG_DIR`,
/// `$XDG_CONFIG_HOME/codetogether`, `~/.config/codetogether`.
pub fn resolve_config_dir(explicit: Option<PathBuf>) -> Result<PathBuf, ConfigError> {
    resolve_from(
        explicit,
        std::env::var_os(ENV_CONFIG_DIR),
        std::env::var_os("XDG_CONFIG_HOME"),
        std::env::var_os("HOME"),
    )
    .ok_or(ConfigError::NoConfigDir)
}

/// [`resolve_config_dir`] without the environment, so the rule is testable. Empty values count as unset
/// (XDG says so for `XDG_CONFIG_HOME`, and an empty `HOME` would otherwise mean the current directory).
pub fn resolve_from(
    explicit: Option<PathBuf>,
    ct_env: Option<OsString>,
    xdg_config_home: Option<OsString>,
    home: Option<OsString>,
) -> Option<PathBuf> {
    let set = |v: Option<OsString>| v.filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = explicit.filter(|p| !p.as_os_str().is_empty()) {
        return Some(dir);
    }
    if let Some(dir) = set(ct_env) {
        return Some(dir);
    }
    // XDG requires an absolute path; a relative one is ignored rather than resolved against the cwd.
    if let Some(xdg) = set(xdg_config_home).filter(|p| p.is_absolute()) {
        return Some(xdg.join("codetogether"));
    }
    set(home).map(|h| h.join(".config").join("codetogether"))
}

/// The agent's ed25519 key. `Debug` never prints it.
#[derive(Clone)]
pub struct AgentKey(SigningKey);

impl AgentKey {
    /// A new key from the operating system's random source.
    pub fn generate() -> Self {
        Self(SigningKey::generate(&mut rand::rngs::OsRng))
    }

    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self(SigningKey::from_bytes(&seed))
    }

    pub fn signing_key(&self) -> &SigningKey {
        &self.0
    }

    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.0.verifying_key())
    }

    fn encode(&self) -> String {
        format!("{}\n", STANDARD.encode(self.0.to_bytes()))
    }

    fn decode(text: &str) -> Option<Self> {
        let bytes = STANDARD.decode(text.trim()).ok()?;
        Some(Self::from_seed(bytes.try_into().ok()?))
    }
}

impl fmt::Debug for AgentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AgentKey({}, MASKED)", self.fingerprint().short())
    }
}

/// What pairing established: which relay to reach and whom this agent belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pairing {
    /// `host:port` addresses of the relay, tried in order.
    pub relays: Vec<String>,
    /// The relay key this agent pinned.
    pub relay_fingerprint: Fingerprint,
    /// The owner's Discord user id.
    pub owner: String,
    #[serde(default)]
    pub owner_name: Option<String>,
    pub agent_name: String,
    /// The key that was paired, so a half-finished pairing can be recognised and completed.
    pub agent_fingerprint: Fingerprint,
    /// Unix seconds.
    pub paired_at: u64,
}

/// Most relay addresses a pairing keeps: a cluster's nodes, plus the few it was paired with.
pub const MAX_RELAYS: usize = 16;

impl Pairing {
    /// Adds the addresses in `offered` (a cluster's live nodes, from its Welcome) that the pairing does not
    /// know yet, after the ones it knows, up to [`MAX_RELAYS`]; returns those added. None is ever dropped: an
    /// address a node stopped naming may still be the only one that works from here (the relay's own view of
    /// its addresses can be wrong), and the relay key is verified wherever the agent connects, so a stale
    /// address only costs an attempt. Addresses that are not `host:port` are ignored.
    pub fn learn_relays(&mut self, offered: &[String]) -> Vec<String> {
        let mut added = Vec::new();
        for addr in offered {
            if self.relays.len() >= MAX_RELAYS {
                break;
            }
            if is_relay_addr(addr) && !self.relays.contains(addr) {
                self.relays.push(addr.clone());
                added.push(addr.clone());
            }
        }
        added
    }

    /// The owner as people know them: the display name when the relay told us one, else the Discord id.
    pub fn owner_label(&self) -> String {
        match &self.owner_name {
            Some(name) => format!("{name} (Discord id {})", self.owner),
            None => format!("Discord user {}", self.owner),
        }
    }
}

/// Whether `addr` is a `host:port` the agent can dial: a DNS name or an IP address (IPv6 in brackets) and a
/// port, nothing else (it comes from the relay and goes into a file and into logs).
fn is_relay_addr(addr: &str) -> bool {
    let Some((host, port)) = addr.rsplit_once(':') else {
        return false;
    };
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => {
            !host.is_empty()
                && host.len() <= 253
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
        }
    };
    host_ok && port.parse::<u16>().is_ok_and(|p| p != 0)
}

#[cfg(test)]
mod relay_addr_tests {
    use super::*;

    fn pairing(relays: &[&str]) -> Pairing {
        Pairing {
            relays: relays.iter().map(|r| r.to_string()).collect(),
            relay_fingerprint: Fingerprint([1; 32]),
            owner: "1".into(),
            owner_name: None,
            agent_name: "box".into(),
            agent_fingerprint: Fingerprint([2; 32]),
            paired_at: 0,
        }
    }

    #[test]
    fn a_pairing_learns_new_addresses_after_its_own_and_drops_none() {
        let mut p = pairing(&["a.example:7443", "b.example:7443"]);
        let offered = [
            "c.example:7443",
            "a.example:7443",
            "10.0.0.4:7443",
            "[::1]:7443",
        ]
        .map(String::from);
        assert_eq!(
            p.learn_relays(&offered),
            ["c.example:7443", "10.0.0.4:7443", "[::1]:7443"]
        );
        assert_eq!(p.relays[..2], ["a.example:7443", "b.example:7443"]);
        assert!(
            p.learn_relays(&offered).is_empty(),
            "nothing new the second time"
        );
        assert!(p.learn_relays(&[]).is_empty());
        assert_eq!(p.relays.len(), 5);
    }

    #[test]
    fn what_is_not_host_and_port_is_ignored_and_the_list_is_bounded() {
        let mut p = pairing(&["a.example:7443"]);
        let bad = [
            "",
            "no-port",
            "host:0",
            "host:70000",
            "host :7443",
            "host\n:7443",
            "[not-v6]:7443",
            "::1:7443",
            "a.example:7443/path",
        ]
        .map(String::from);
        assert!(p.learn_relays(&bad).is_empty(), "{:?}", p.relays);
        let long = format!("{}:7443", "a".repeat(254));
        assert!(p.learn_relays(&[long]).is_empty());
        let many: Vec<String> = (0..100).map(|i| format!("n{i}.example:7443")).collect();
        p.learn_relays(&many);
        assert_eq!(p.relays.len(), MAX_RELAYS);
    }
}

/// The config directory, opened: it exists and is `0700`.
#[derive(Debug, Clone)]
pub struct ConfigDir {
    path: PathBuf,
}

impl ConfigDir {
    /// Creates the directory (`0700`) if needed, and tightens an existing one that others can enter.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, ConfigError> {
        let path = path.into();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&path)
            .map_err(io_err("cannot create config directory", &path))?;
        let meta = fs::metadata(&path).map_err(io_err("cannot read config directory", &path))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            fs::set_permissions(&path, fs::Permissions::from_mode(0o700))
                .map_err(io_err("cannot restrict config directory", &path))?;
            tracing::warn!(
                path = %path.display(),
                old_mode = format!("{mode:o}"),
                "config directory was open to other users; changed it to 0700"
            );
        }
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Reads the agent key, refusing a file others can read. `Ok(None)` when there is no key yet.
    pub fn load_key(&self) -> Result<Option<AgentKey>, ConfigError> {
        self.load_key_file(KEY_FILE)
    }

    fn load_key_file(&self, name: &str) -> Result<Option<AgentKey>, ConfigError> {
        let path = self.file(name);
        let Some(file) = open_existing(&path)? else {
            return Ok(None);
        };
        let meta = file
            .metadata()
            .map_err(io_err("cannot read key file", &path))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(ConfigError::KeyTooOpen { path, mode });
        }
        let text = read_bounded(file, &path)?;
        AgentKey::decode(&text)
            .map(Some)
            .ok_or_else(|| ConfigError::Damaged {
                path,
                reason: "not a base64 ed25519 seed".into(),
            })
    }

    /// Writes `key` as the pending key of a pairing in progress.
    pub fn store_pending_key(&self, key: &AgentKey) -> Result<(), ConfigError> {
        write_atomic(&self.path, PENDING_KEY_FILE, key.encode().as_bytes(), 0o600)
    }

    /// Makes the pending key the agent key.
    pub fn promote_pending_key(&self) -> Result<(), ConfigError> {
        let from = self.file(PENDING_KEY_FILE);
        let to = self.file(KEY_FILE);
        fs::rename(&from, &to).map_err(io_err("cannot rename pending key to", &to))?;
        sync_dir(&self.path)
    }

    /// Removes a pending key after a failed pairing (it was never accepted by the relay).
    pub fn discard_pending_key(&self) {
        let _ = fs::remove_file(self.file(PENDING_KEY_FILE));
    }

    /// Writes the agent key directly (atomically, `0600`).
    pub fn store_key(&self, key: &AgentKey) -> Result<(), ConfigError> {
        write_atomic(&self.path, KEY_FILE, key.encode().as_bytes(), 0o600)
    }

    /// Reads `pairing.json`; `Ok(None)` when the agent is not paired.
    pub fn load_pairing(&self) -> Result<Option<Pairing>, ConfigError> {
        self.load_json(PAIRING_FILE)
    }

    pub fn store_pairing(&self, pairing: &Pairing) -> Result<(), ConfigError> {
        self.store_json(PAIRING_FILE, pairing, 0o600)
    }

    /// Adds a cluster's node addresses to the stored pairing ([`Pairing::learn_relays`]); returns the
    /// addresses added (none: nothing written).
    pub fn learn_relays(&self, offered: &[String]) -> Result<Vec<String>, ConfigError> {
        let Some(mut pairing) = self.load_pairing()? else {
            return Ok(Vec::new());
        };
        let added = pairing.learn_relays(offered);
        if !added.is_empty() {
            self.store_pairing(&pairing)?;
        }
        Ok(added)
    }

    /// The key and pairing together, as `run` needs them. Completes a pairing that was interrupted after
    /// `pairing.json` was written but before the pending key was renamed.
    pub fn load_identity(&self) -> Result<Option<(AgentKey, Pairing)>, ConfigError> {
        let Some(pairing) = self.load_pairing()? else {
            return Ok(None);
        };
        let current = self.load_key()?;
        if current.as_ref().map(AgentKey::fingerprint) != Some(pairing.agent_fingerprint) {
            if let Some(pending) = self.load_key_file(PENDING_KEY_FILE)? {
                if pending.fingerprint() == pairing.agent_fingerprint {
                    tracing::info!("completing an interrupted pairing: using the pending key");
                    self.promote_pending_key()?;
                    return Ok(Some((pending, pairing)));
                }
            }
        }
        let key_path = self.file(KEY_FILE);
        match current {
            Some(key) if key.fingerprint() == pairing.agent_fingerprint => Ok(Some((key, pairing))),
            Some(key) => Err(ConfigError::Damaged {
                path: key_path,
                reason: format!(
                    "its key {} is not the paired key {}",
                    key.fingerprint(),
                    pairing.agent_fingerprint
                ),
            }),
            None => Err(ConfigError::Damaged {
                path: key_path,
                reason: "the agent is paired but its key file is missing".into(),
            }),
        }
    }

    pub(crate) fn load_json<T: serde::de::DeserializeOwned>(
        &self,
        name: &str,
    ) -> Result<Option<T>, ConfigError> {
        let path = self.file(name);
        let Some(file) = open_existing(&path)? else {
            return Ok(None);
        };
        let text = read_bounded(file, &path)?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| ConfigError::Damaged {
                path,
                reason: e.to_string(),
            })
    }

    pub(crate) fn store_json<T: Serialize>(
        &self,
        name: &str,
        value: &T,
        mode: u32,
    ) -> Result<(), ConfigError> {
        let mut text = serde_json::to_vec_pretty(value).map_err(|e| ConfigError::Io {
            what: "cannot encode",
            path: self.file(name),
            source: io::Error::other(e),
        })?;
        text.push(b'\n');
        write_atomic(&self.path, name, &text, mode)
    }
}

fn open_existing(path: &Path) -> Result<Option<File>, ConfigError> {
    match File::open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("cannot open", path)(e)),
    }
}

fn read_bounded(file: File, path: &Path) -> Result<String, ConfigError> {
    let mut text = String::new();
    file.take(MAX_FILE_LEN + 1)
        .read_to_string(&mut text)
        .map_err(io_err("cannot read", path))?;
    if text.len() as u64 > MAX_FILE_LEN {
        return Err(ConfigError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    Ok(text)
}

/// Replaces `dir/name` with `bytes` so that readers (and a crash) see the old or the new content, never a
/// mix, and the file never exists with a mode looser than `mode`, not even for an instant.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> Result<(), ConfigError> {
    let target = dir.join(name);
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{:016x}",
        std::process::id(),
        rand::rngs::OsRng.next_u64()
    ));
    let result = (|| {
        // create_new: never follow a symlink or reuse a file someone planted under the temporary name.
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io_err("cannot create", &tmp))?;
        file.write_all(bytes)
            .map_err(io_err("cannot write", &tmp))?;
        file.sync_all().map_err(io_err("cannot sync", &tmp))?;
        drop(file);
        fs::rename(&tmp, &target).map_err(io_err("cannot replace", &target))?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Makes a rename durable: the directory entry itself must reach the disk.
fn sync_dir(dir: &Path) -> Result<(), ConfigError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("cannot sync directory", dir))
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn resolution_order() {
        let some = |s: &str| Some(OsString::from(s));
        assert_eq!(
            resolve_from(
                Some("/x".into()),
                some("/ct"),
                some("/xdg"),
                some("/home/u")
            ),
            Some(PathBuf::from("/x"))
        );
        assert_eq!(
            resolve_from(None, some("/ct"), some("/xdg"), some("/home/u")),
            Some(PathBuf::from("/ct"))
        );
        assert_eq!(
            resolve_from(None, some(""), some("/xdg"), some("/home/u")),
            Some(PathBuf::from("/xdg/codetogether"))
        );
        assert_eq!(
            resolve_from(None, None, some("relative"), some("/home/u")),
            Some(PathBuf::from("/home/u/.config/codetogether"))
        );
        assert_eq!(
            resolve_from(None, None, None, some("/home/u")),
            Some(PathBuf::from("/home/u/.config/codetogether"))
        );
        assert_eq!(resolve_from(None, None, None, None), None);
    }

    #[test]
    fn directory_is_created_0700_and_tightened() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/codetogether");
        ConfigDir::open(&dir).unwrap();
        assert_eq!(mode_of(&dir), 0o700);

        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        ConfigDir::open(&dir).unwrap();
        assert_eq!(mode_of(&dir), 0o700);
    }

    #[test]
    fn key_round_trips_with_mode_0600_and_no_temp_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = ConfigDir::open(tmp.path().join("c")).unwrap();
        assert!(dir.load_key().unwrap().is_none());
        let key = AgentKey::generate();
        dir.store_key(&key).unwrap();
        dir.store_key(&key).unwrap(); // replacing works too
        assert_eq!(mode_of(&dir.file(KEY_FILE)), 0o600);
        let loaded = dir.load_key().unwrap().unwrap();
        assert_eq!(loaded.fingerprint(), key.fingerprint());
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(
            names,
            vec![KEY_FILE.to_string()],
            "leftover files: {names:?}"
        );
    }

    #[test]
    fn a_key_others_can_read_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = ConfigDir::open(tmp.path()).unwrap();
        dir.store_key(&AgentKey::generate()).unwrap();
        fs::set_permissions(dir.file(KEY_FILE), fs::Permissions::from_mode(0o644)).unwrap();
        let err = dir.load_key().unwrap_err();
        assert!(
            matches!(err, ConfigError::KeyTooOpen { mode: 0o644, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    #[test]
    fn debug_masks_the_key() {
        let key = AgentKey::from_seed([9; 32]);
        let text = format!("{key:?}");
        assert!(text.contains("MASKED"));
        assert!(!text.contains(&STANDARD.encode([9u8; 32])));
    }

    #[test]
    fn damaged_and_oversized_files_are_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = ConfigDir::open(tmp.path()).unwrap();
        write_atomic(dir.path(), PAIRING_FILE, b"{not json", 0o600).unwrap();
        assert!(matches!(
            dir.load_pairing(),
            Err(ConfigError::Damaged { .. })
        ));
        write_atomic(dir.path(), KEY_FILE, b"short", 0o600).unwrap();
        assert!(matches!(dir.load_key(), Err(ConfigError::Damaged { .. })));
        let big = vec![b' '; MAX_FILE_LEN as usize + 1];
        write_atomic(dir.path(), PAIRING_FILE, &big, 0o600).unwrap();
        assert!(matches!(
            dir.load_pairing(),
            Err(ConfigError::TooLarge { .. })
        ));
    }

    #[test]
    fn an_interrupted_pairing_is_completed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = ConfigDir::open(tmp.path()).unwrap();
        let old = AgentKey::generate();
        dir.store_key(&old).unwrap();
        let new = AgentKey::generate();
        dir.store_pending_key(&new).unwrap();
        let pairing = Pairing {
            relays: vec!["127.0.0.1:1".into()],
            relay_fingerprint: Fingerprint::of_bytes(&[1; 32]),
            owner: "42".into(),
            owner_name: None,
            agent_name: "box".into(),
            agent_fingerprint: new.fingerprint(),
            paired_at: 0,
        };
        dir.store_pairing(&pairing).unwrap();
        // Crash here: pairing.json names the new key, agent.key is still the old one.
        let (key, loaded) = dir.load_identity().unwrap().unwrap();
        assert_eq!(key.fingerprint(), new.fingerprint());
        assert_eq!(loaded, pairing);
        assert!(!dir.file(PENDING_KEY_FILE).exists());
        assert_eq!(
            dir.load_key().unwrap().unwrap().fingerprint(),
            new.fingerprint()
        );
    }
}
