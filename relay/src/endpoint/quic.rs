//! The QUIC side of the agent endpoint: each agent opens one bidirectional stream for its session.

use std::time::Duration;

use ct_protocol::handshake::{CHANNEL_BINDING_LABEL, CHANNEL_BINDING_LEN};
use ct_protocol::Transport;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use super::limits::Admission;
use super::session::{self, Link};
use crate::core::Core;

/// Time allowed for the QUIC handshake plus the agent opening its stream.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts connections on a bound endpoint until `shutdown`. The caller closes the endpoint once the
/// sessions have drained, so each agent receives its Closing message first.
pub async fn serve(
    endpoint: quinn::Endpoint,
    core: Core,
    admission: Admission,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => match incoming {
                Some(i) => i,
                None => break,
            },
            () = shutdown.cancelled() => break,
        };
        let Ok(permit) = admission.connections.clone().try_acquire_owned() else {
            debug!(peer = %incoming.remote_address(), "connection limit reached; refusing");
            core.metrics().refused("limit");
            incoming.refuse();
            continue;
        };
        let peer = incoming.remote_address();
        let Some(slot) = admission.per_address.try_acquire(peer.ip()) else {
            // A UDP source address can be forged. Before refusing in its name, make the peer prove it owns
            // the address (a Retry round trip, stateless for us): a forger never completes it, so it cannot
            // use up someone else's share beyond what its unvalidated attempts hold for the handshake time.
            if !incoming.remote_address_validated() && incoming.may_retry() {
                let _ = incoming.retry();
            } else {
                debug!(%peer, "this address holds its share of connections; refusing");
                core.metrics().refused("per_address");
                incoming.refuse();
            }
            continue;
        };
        let (core, shutdown) = (core.clone(), shutdown.clone());
        tasks.spawn(async move {
            let _held = (permit, slot);
            if let Err(e) = accept(incoming, core, shutdown).await {
                debug!(error = %e, "QUIC connection failed before its session started");
            }
        });
    }
}

async fn accept(
    incoming: quinn::Incoming,
    core: Core,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let peer = incoming.remote_address();
    let (conn, (send, recv)) = tokio::time::timeout(ACCEPT_TIMEOUT, async {
        let conn = incoming.await?;
        let stream = conn.accept_bi().await?;
        anyhow::Ok((conn, stream))
    })
    .await
    .map_err(|_| anyhow::anyhow!("{peer} did not open a stream within {ACCEPT_TIMEOUT:?}"))??;
    let mut channel_binding = [0u8; CHANNEL_BINDING_LEN];
    conn.export_keying_material(&mut channel_binding, CHANNEL_BINDING_LABEL, b"")
        .map_err(|_| anyhow::anyhow!("TLS exporter unavailable"))?;
    let link = Link {
        transport: Transport::Quic,
        peer,
        channel_binding,
    };
    session::run(core, recv, send, link, shutdown).await;
    // Closing the connection at once could discard the last frames (a Closing or Rejected message) before
    // they are acknowledged; the agent closes as soon as it reads them, so wait for that, briefly.
    let _ = tokio::time::timeout(Duration::from_secs(1), conn.closed()).await;
    conn.close(0u32.into(), b"session ended");
    Ok(())
}
