//! `ct-agent sandbox-forward`: the only way out of a sandbox without a network.
//!
//! A grantee's sandbox has its own, empty network namespace (`--unshare-net`): it reaches neither the internet
//! nor anything on the owner's loopback. Claude Code inside still needs the API, so the agent binary runs first
//! in the sandbox as this forwarder: it listens on the sandbox's own `127.0.0.1:PORT`, starts Claude Code, and
//! copies each connection to the unix socket bound in from outside, where the agent's metering proxy answers
//! ([`crate::meter::proxy`]). It exits with Claude Code's status.

use std::path::PathBuf;
use std::process::ExitCode;

use tokio::net::{TcpListener, UnixStream};

/// The port the forwarder listens on inside the sandbox. Fixed: the namespace is the sandbox's alone.
pub const PORT: u16 = 8017;
/// Where the proxy's socket is bound inside the sandbox.
pub const SOCKET: &str = "/run/ct-agent/api.sock";

/// Listens on `127.0.0.1:port`, runs `command`, forwards connections to `socket` until `command` exits.
pub async fn run(port: u16, socket: PathBuf, command: Vec<String>) -> anyhow::Result<ExitCode> {
    use anyhow::Context as _;
    let (program, args) = command
        .split_first()
        .context("sandbox-forward needs a command after --")?;
    let listener = TcpListener::bind(("127.0.0.1", port))
        .await
        .with_context(|| format!("cannot listen on 127.0.0.1:{port} inside the sandbox"))?;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {program}"))?;
    let mut connections = tokio::task::JoinSet::new();
    let status = loop {
        tokio::select! {
            status = child.wait() => break status.context("waiting for the command")?,
            accepted = listener.accept() => {
                let Ok((mut tcp, _)) = accepted else { continue };
                let socket = socket.clone();
                connections.spawn(async move {
                    match UnixStream::connect(&socket).await {
                        Ok(mut unix) => {
                            let _ = tokio::io::copy_bidirectional(&mut tcp, &mut unix).await;
                        }
                        Err(e) => eprintln!("sandbox-forward: cannot reach {}: {e}", socket.display()),
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    };
    connections.abort_all();
    use std::os::unix::process::ExitStatusExt as _;
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1);
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}
