//! Many simulated agents at once: pairing them through real one-time codes, running them as owned tasks, and
//! reading what they report.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ct_protocol::handshake::PairRequest;
use ct_protocol::pairing::PairingToken;
use ct_protocol::Transport;
use futures_util::stream::{self, StreamExt, TryStreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agent::{self, Behaviour, Note};
use crate::dial::{dial, Dial, Identity, Target};

/// Pairings in flight at once: enough to keep both cores busy, few enough that none times out.
const PAIRING_CONCURRENCY: usize = 32;

/// Generates `n` fresh keys (agents `first..first + n`) and pairs each with the relay through a code from
/// `mint` (the admin socket, or `Core` in process), over `how`.
pub async fn pair<F, Fut>(
    target: &Target,
    first: usize,
    n: usize,
    how: Dial,
    mint: F,
) -> Result<Vec<Arc<Identity>>>
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Result<PairingToken>>,
{
    pair_on(&[target], first, n, how, |_, user| mint(user)).await
}

/// [`pair`] on a relay of several nodes: agent `i` pairs on node `i % nodes.len()`, with a code `mint` gets
/// from that node, so the pairing load is spread over the cluster as a fleet's would be.
pub async fn pair_on<F, Fut>(
    nodes: &[&Target],
    first: usize,
    n: usize,
    how: Dial,
    mint: F,
) -> Result<Vec<Arc<Identity>>>
where
    F: Fn(usize, String) -> Fut,
    Fut: Future<Output = Result<PairingToken>>,
{
    let mint = &mint;
    stream::iter(first..first + n)
        .map(|i| async move {
            let node = i % nodes.len();
            let who = Identity::generate(i);
            let token = mint(node, who.user.clone()).await?;
            let pair = PairRequest {
                code: token.code.to_string(),
                name: who.name.clone(),
            };
            let link = dial(nodes[node], &who, how, Some(pair))
                .await
                .map_err(|e| e.error)
                .with_context(|| format!("pairing agent {i}"))?;
            anyhow::ensure!(link.welcome.paired, "agent {i} was not paired");
            link.close("paired").await;
            Ok(Arc::new(who))
        })
        .buffered(PAIRING_CONCURRENCY)
        .try_collect()
        .await
}

/// Running agents. Dropping the fleet stops them; [`Fleet::stop`] also waits until they have left.
#[derive(Debug)]
pub struct Fleet {
    tasks: TaskTracker,
    shutdown: CancellationToken,
    tx: mpsc::UnboundedSender<Note>,
    pub notes: mpsc::UnboundedReceiver<Note>,
}

impl Default for Fleet {
    fn default() -> Self {
        let (tx, notes) = mpsc::unbounded_channel();
        Self {
            tasks: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            tx,
            notes,
        }
    }
}

impl Fleet {
    /// Starts agent `index` with identity `who`.
    pub fn spawn(&self, index: usize, who: Arc<Identity>, target: Arc<Target>, how: Behaviour) {
        self.spawn_on(index, who, vec![target], how);
    }

    /// Starts agent `index` on a relay of several nodes, tried in the order of `targets`.
    pub fn spawn_on(
        &self,
        index: usize,
        who: Arc<Identity>,
        targets: Vec<Arc<Target>>,
        how: Behaviour,
    ) {
        self.tasks.spawn(agent::run(
            index,
            who,
            targets,
            how,
            self.tx.clone(),
            self.shutdown.clone(),
        ));
    }

    /// The next note, or `None` once `deadline` passes.
    pub async fn next_note(&mut self, deadline: Instant) -> Option<Note> {
        tokio::time::timeout_at(deadline, self.notes.recv())
            .await
            .ok()
            .flatten()
    }

    /// Waits until `n` agents are online at once; returns the transport each is on. A refused agent is an
    /// error.
    pub async fn wait_online(
        &mut self,
        n: usize,
        limit: Duration,
    ) -> Result<HashMap<usize, Transport>> {
        let deadline = Instant::now() + limit;
        let mut online = HashMap::new();
        while online.len() < n {
            match self.next_note(deadline).await {
                Some(Note::Online {
                    agent, transport, ..
                }) => {
                    online.insert(agent, transport);
                }
                Some(Note::Offline { agent, .. }) => {
                    online.remove(&agent);
                }
                Some(Note::Refused { agent, error }) => bail!("agent {agent} was refused: {error}"),
                Some(_) => {}
                None => bail!("only {} of {n} agents online after {limit:?}", online.len()),
            }
        }
        Ok(online)
    }

    /// Tells every agent to leave (Goodbye and close, as `ct-agent` does on shutdown) and waits for them.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.tasks.close();
        if tokio::time::timeout(Duration::from_secs(30), self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("some agents did not stop within 30 s");
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
