//! The Discord bot on two relay nodes that share one store (two cores over one sled store in this process;
//! a cluster shares PostgreSQL the same way): the `discord` lease in the store lets one node lead at a time —
//! one gateway session — and a node that shuts down releases it, so the other takes over at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ct_bot::leader::LeaseTimes;
use ct_relay::core::{Core, CoreConfig};
use ct_relay::discord::{start_with, BotConfig, LEASE};
use ct_relay::metrics::Metrics;
use ct_relay::store::sled::SledStore;
use ct_relay::store::SharedStore;
use ct_testkit::discord::DiscordSim;
use ct_testkit::eventually;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const T: Duration = Duration::from_secs(10);

fn times() -> LeaseTimes {
    LeaseTimes {
        ttl: Duration::from_secs(3),
        renew: Duration::from_millis(200),
        scan: Duration::from_millis(300),
        grace: Duration::from_millis(500),
    }
}

/// One relay node's bot: its core over the shared store, and what stops it.
struct Node {
    bot: ct_relay::discord::Bot,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Node {
    fn start(store: &SharedStore, sim: &DiscordSim, id: &str) -> Self {
        let cfg = CoreConfig {
            node_id: id.into(),
            ..CoreConfig::default()
        };
        let core = Core::start(
            store.clone(),
            ed25519_dalek::SigningKey::from_bytes(&[7; 32]),
            cfg,
            Arc::new(Metrics::for_node(id)),
            None,
        )
        .unwrap();
        let mut config = BotConfig::gateway(sim.token());
        config.api_proxy = Some(sim.api_base());
        config.guild_id = Some(sim.guild_id().parse().unwrap());
        let (stop, tasks) = (CancellationToken::new(), TaskTracker::new());
        let bot = start_with(core, config, stop.clone(), &tasks, times()).expect("a bot");
        Self { bot, stop, tasks }
    }

    /// As at SIGTERM: the bot stops, releasing the lease.
    async fn stop(self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_one_store_hold_the_gateway_one_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let store: SharedStore = Arc::new(SledStore::open(&dir.path().join("db")).unwrap());
    let sim = DiscordSim::start().await.unwrap();

    let a = Node::start(&store, &sim, "a");
    eventually(T, || a.bot.leading()).await;
    sim.wait_identified(T).await.unwrap();
    let b = Node::start(&store, &sim, "b");
    // A refusal is only seen over time: several of b's renewal periods.
    tokio::time::sleep(times().renew * 5).await;
    assert!(!b.bot.leading(), "the lease is a's");
    assert_eq!(sim.gateway_sessions(), 1, "one gateway session");
    // A third party is refused too: the lease is held in the store, not in a node's memory.
    let held = store.clone();
    let taken = tokio::task::spawn_blocking(move || held.lease(LEASE, "c", Duration::from_secs(3)))
        .await
        .unwrap()
        .unwrap();
    assert!(!taken, "the lease is held");

    let left = Instant::now();
    a.stop().await;
    eventually(T, || b.bot.leading()).await;
    assert!(
        left.elapsed() < times().ttl,
        "released at shutdown, so taken over before the TTL: {:?}",
        left.elapsed()
    );
    sim.wait_identified(T).await.unwrap();
    assert_eq!(sim.gateway_sessions(), 1, "b's session only");
    let no_429 = sim.calls().iter().all(|c| c.status != 429);
    assert!(no_429, "{:#?}", sim.calls());

    b.stop().await;
    let free = store.clone();
    let taken = tokio::task::spawn_blocking(move || free.lease(LEASE, "c", Duration::from_secs(3)))
        .await
        .unwrap()
        .unwrap();
    assert!(taken, "the last node released the lease at shutdown");
    sim.shutdown().await;
}
