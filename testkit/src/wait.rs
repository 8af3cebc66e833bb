//! Waiting in tests for state that changes on another task.

use std::time::Duration;

/// Polls `f` until it is true, failing the test after `limit`. For state nothing signals a change of (a
/// store, a fake's records); the Discord simulator's own state has [`crate::DiscordSim::wait_until`].
pub async fn eventually(limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// [`eventually`] for a condition that has to await (one that asks the relay core, whose methods are async).
pub async fn eventually_async(limit: Duration, mut f: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
