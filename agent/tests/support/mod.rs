//! Shared by the agent's end-to-end tests: the real relay from its library on 127.0.0.1, and the agent run
//! from its library with its link state observable.

#![allow(dead_code)] // each test file uses its own part of this

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use ct_agent::connect::ConnectOptions;
use ct_agent::proxy::ProxyConfig;
use ct_agent::{LinkStatus, RunError, RunOptions};
use ct_protocol::Transport;
use ct_relay::core::Core;
use ct_relay::{Relay, RelayConfig};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub struct TestRelay {
    pub addr: SocketAddr,
    pub core: Core,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl TestRelay {
    pub async fn start(config: RelayConfig) -> Self {
        let relay = Relay::bind(config).await.expect("relay binds");
        let addr = relay.https_addr().or(relay.quic_addr()).unwrap();
        let core = relay.core();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(relay.run(shutdown.clone()));
        Self {
            addr,
            core,
            shutdown,
            task,
        }
    }

    pub async fn on(dir: &Path, addr: &str) -> Self {
        Self::start(RelayConfig::new(dir.to_path_buf(), addr.parse().unwrap())).await
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }

    /// Starts a graceful stop (as on SIGTERM) and lets it go on in the background.
    pub fn begin_stop(&self) {
        self.shutdown.cancel();
    }

    pub async fn token(&self, user: &str) -> ct_protocol::pairing::PairingToken {
        self.core.mint_pairing_token(user).await.unwrap().0
    }
}

pub fn direct() -> ConnectOptions {
    ConnectOptions {
        proxy: ProxyConfig::direct(),
        ..Default::default()
    }
}

/// An agent running from its library, with its link state observable.
pub struct TestAgent {
    pub status: watch::Receiver<LinkStatus>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), RunError>>,
}

impl TestAgent {
    pub fn start(config_dir: &Path) -> Self {
        Self::start_with(RunOptions::new(config_dir))
    }

    /// Runs the agent with `opts`, connecting directly (no proxy from the environment).
    pub fn start_with(mut opts: RunOptions) -> Self {
        opts.connect = direct();
        let (tx, status) = watch::channel(LinkStatus::Connecting);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(ct_agent::run(opts, shutdown.clone(), tx));
        Self {
            status,
            shutdown,
            task,
        }
    }

    /// Waits until connected over some transport; returns it.
    pub async fn connected(&mut self, limit: Duration) -> Transport {
        let waited = tokio::time::timeout(
            limit,
            self.status
                .wait_for(|s| matches!(s, LinkStatus::Connected { .. })),
        )
        .await
        .map(|r| r.map(|s| s.clone()));
        match waited {
            Ok(Ok(LinkStatus::Connected { transport, .. })) => transport,
            Ok(_) => panic!("agent run ended: {:?}", *self.status.borrow()),
            Err(_) => panic!(
                "agent not connected within {limit:?}; last status {:?}",
                *self.status.borrow()
            ),
        }
    }

    pub async fn disconnected(&mut self, limit: Duration) {
        tokio::time::timeout(
            limit,
            self.status
                .wait_for(|s| !matches!(s, LinkStatus::Connected { .. })),
        )
        .await
        .expect("agent never noticed the link went away")
        .expect("agent run ended");
    }

    pub async fn stop(self) -> Result<(), RunError> {
        self.shutdown.cancel();
        self.task.await.unwrap()
    }

    /// Waits for the agent's run to end by itself (revoked, replaced).
    pub async fn wait(self) -> Result<(), RunError> {
        self.task.await.unwrap()
    }
}

pub async fn pair(relay: &TestRelay, config_dir: &Path, user: &str) {
    let out = ct_agent::pair_with(
        config_dir,
        &relay.token(user).await,
        Some("e2e".into()),
        false,
        &direct(),
    )
    .await
    .unwrap();
    assert_eq!(out.pairing.owner, user);
}
