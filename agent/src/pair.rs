//! `ct-agent pair <token>`: generate a key, prove it to the relay with the token's one-time code, and only then
//! make it this agent's key.
//!
//! Crash safety: the new key is written to `agent.key.pending` before the relay sees it, `pairing.json`
//! (which names the new key's fingerprint) is written after the relay's `Welcome`, and only then is the
//! pending key renamed to `agent.key`. A crash at any point leaves either the old pairing intact, or a
//! `pairing.json` whose key is still pending, which the next load completes (see
//! [`ConfigDir::load_identity`]). A key the relay registered is never lost.

use std::path::Path;

use ct_protocol::handshake::{HandshakeError, PairRequest, Rejection};
use ct_protocol::pairing::PairingToken;
use ct_protocol::Transport;

use crate::config::{unix_now, AgentKey, ConfigDir, ConfigError, Pairing};
use crate::connect::{connect_any, ConnectError, ConnectOptions, Credentials};

/// What pairing achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairOutcome {
    /// What was stored in `pairing.json` (includes the new agent key fingerprint).
    pub pairing: Pairing,
    /// The address and transport that carried the pairing.
    pub relay_addr: String,
    pub transport: Transport,
}

/// Why pairing failed. Each message says what to do next.
#[derive(Debug, thiserror::Error)]
pub enum PairError {
    /// The agent is paired already and `--force` was not given.
    #[error(
        "this agent is already paired with relay {relays} for {owner}: to replace that pairing, run \
         `ct-agent pair --force <token>`"
    )]
    AlreadyPaired { relays: String, owner: String },
    /// The code is unknown or mistyped.
    #[error(
        "the relay does not recognise this pairing code ({message}): get a new token with /register in \
         Discord (or `ct-relay admin pair-code` on the relay) and paste it whole"
    )]
    CodeWrong { message: String },
    /// The code was used already.
    #[error(
        "this pairing code was already used ({message}): each code works once. Get a new token with \
         /register in Discord (or `ct-relay admin pair-code` on the relay)"
    )]
    CodeUsed { message: String },
    /// The code expired.
    #[error(
        "this pairing code has expired ({message}): get a new token with /register in Discord (or \
         `ct-relay admin pair-code` on the relay) and use it within its lifetime"
    )]
    CodeExpired { message: String },
    /// Too many attempts.
    #[error(
        "the relay is refusing pairing attempts from this address for now ({message}): wait a few \
         minutes, then run the same command again"
    )]
    RateLimited { message: String },
    /// The config directory or its files.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The relay could not be reached, or refused for another reason.
    #[error("pairing failed: {0}")]
    Connect(ConnectError),
}

impl From<ConnectError> for PairError {
    fn from(e: ConnectError) -> Self {
        let message = |m: &str| m.to_string();
        match e.handshake() {
            Some(HandshakeError::Rejected { reason, message: m }) => match reason {
                Rejection::CodeWrong => Self::CodeWrong {
                    message: message(m),
                },
                Rejection::CodeUsed => Self::CodeUsed {
                    message: message(m),
                },
                Rejection::CodeExpired => Self::CodeExpired {
                    message: message(m),
                },
                Rejection::RateLimited => Self::RateLimited {
                    message: message(m),
                },
                _ => Self::Connect(e),
            },
            _ => Self::Connect(e),
        }
    }
}

/// Pairs the agent in `config_dir` using `token`, with the default connection options (race, proxy from
/// the environment). `name` defaults to the machine's host name.
pub async fn pair(
    config_dir: &Path,
    token: &PairingToken,
    name: Option<String>,
    force: bool,
) -> Result<PairOutcome, PairError> {
    pair_with(config_dir, token, name, force, &ConnectOptions::default()).await
}

/// [`pair`] with explicit connection options.
pub async fn pair_with(
    config_dir: &Path,
    token: &PairingToken,
    name: Option<String>,
    force: bool,
    opts: &ConnectOptions,
) -> Result<PairOutcome, PairError> {
    let dir = ConfigDir::open(config_dir)?;
    if !force {
        if let Some(existing) = dir.load_pairing()? {
            return Err(PairError::AlreadyPaired {
                relays: existing.relays.join(", "),
                owner: existing.owner_label(),
            });
        }
    }
    let name = name
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .or_else(crate::sys::hostname)
        .unwrap_or_else(|| "ct-agent".to_string());

    let key = AgentKey::generate();
    dir.store_pending_key(&key)?;
    let creds = Credentials {
        key: key.clone(),
        relay: token.relay,
        pair: Some(PairRequest {
            code: token.code.to_string(),
            name,
        }),
    };
    let link = match connect_any(&token.relays, &creds, opts).await {
        Ok(link) => link,
        Err(e) => {
            // The relay did not accept this key, so nothing refers to it.
            dir.discard_pending_key();
            return Err(e.into());
        }
    };

    let welcome = &link.welcome;
    let pairing = Pairing {
        relays: token.relays.clone(),
        relay_fingerprint: token.relay,
        owner: welcome.owner.clone(),
        owner_name: welcome.owner_name.clone(),
        agent_name: welcome.agent_name.clone(),
        agent_fingerprint: key.fingerprint(),
        paired_at: unix_now(),
    };
    dir.store_pairing(&pairing)?;
    dir.promote_pending_key()?;
    tracing::info!(
        relay = %link.relay_addr,
        transport = %link.transport,
        agent = %pairing.agent_fingerprint,
        "paired"
    );
    let outcome = PairOutcome {
        pairing,
        relay_addr: link.relay_addr.clone(),
        transport: link.transport,
    };
    link.close("paired").await;
    Ok(outcome)
}
