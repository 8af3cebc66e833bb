//! The Discord bot on two relay nodes that share one store (two cores over one sled store in this process;
//! a cluster shares PostgreSQL the same way): the `discord` lease in the store lets one node lead at a time —
//! one gateway session — and a node that shuts down releases it, so the other takes over at once. And on two
//! nodes of a real cluster (PostgreSQL, nats-server): a node that leaves a thread to the leader wakes it over
//! the cluster bus.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ct_bot::backend::{Opening, ThreadMark};
use ct_bot::leader::LeaseTimes;
use ct_bot::Backend;
use ct_relay::cluster::{Bus, Seal};
use ct_relay::core::{Core, CoreConfig};
use ct_relay::discord::{start_with, BotConfig, CoreBackend, LEASE};
use ct_relay::metrics::Metrics;
use ct_relay::store::postgres::PgStore;
use ct_relay::store::sled::SledStore;
use ct_relay::store::SharedStore;
use ct_testkit::discord::DiscordSim;
use ct_testkit::nats::NatsServer;
use ct_testkit::postgres::PgServer;
use ct_testkit::{eventually, eventually_async};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const T: Duration = Duration::from_secs(10);
/// The relay key every node of these clusters shares (it also seals the cluster bus).
const KEY: [u8; 32] = [7; 32];

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
        Self::start_with(store, sim, id, None, times()).0
    }

    /// A node whose core is on `bus` (a cluster node) when given one; also its core.
    fn start_with(
        store: &SharedStore,
        sim: &DiscordSim,
        id: &str,
        bus: Option<Bus>,
        times: LeaseTimes,
    ) -> (Self, Core) {
        let cfg = CoreConfig {
            node_id: id.into(),
            ..CoreConfig::default()
        };
        let core = Core::start(
            store.clone(),
            ed25519_dalek::SigningKey::from_bytes(&KEY),
            cfg,
            Arc::new(Metrics::for_node(id)),
            bus,
        )
        .unwrap();
        let mut config = BotConfig::gateway(sim.token());
        config.api_proxy = Some(sim.api_base());
        config.guild_id = Some(sim.guild_id().parse().unwrap());
        let (stop, tasks) = (CancellationToken::new(), TaskTracker::new());
        let bot = start_with(core.clone(), config, stop.clone(), &tasks, times).expect("a bot");
        (Self { bot, stop, tasks }, core)
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

/// A node that does not lead leaves a task's thread to the leader (a mark asking for it) and wakes the leader
/// over the cluster bus (`ct.bot.scan`, sealed with the cluster's key): the leader opens the thread at once.
/// Its scans are a minute apart, far beyond the wait here, so only the wake-up can have opened it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_wakes_the_leader_over_the_cluster_bus_to_open_a_thread() {
    let url = PgServer::shared()
        .create_database(&format!("wake_{}", rand::random::<u64>()))
        .expect("a database for the test");
    // The synchronous client runs a runtime of its own: not on this one's threads.
    let store: SharedStore =
        tokio::task::spawn_blocking(move || Arc::new(PgStore::open(&url).unwrap()))
            .await
            .unwrap();
    let sim = DiscordSim::start().await.unwrap();
    let (bus_stop, bus_tasks) = (CancellationToken::new(), TaskTracker::new());
    let nats = NatsServer::shared().url();
    let bus = async |node: &str| {
        let seal = Seal::from_relay_secret(&KEY);
        Bus::connect(&nats, node, seal, bus_stop.clone(), &bus_tasks)
            .await
            .unwrap()
    };
    let slow = LeaseTimes {
        scan: Duration::from_secs(60),
        ..times()
    };
    let (a, _) = Node::start_with(&store, &sim, "a", Some(bus("a").await), slow);
    eventually(T, || a.bot.leading()).await;
    // Connected after it adopted what marks there were at the start of its term.
    sim.wait_identified(T).await.unwrap();
    let (b, b_core) = Node::start_with(&store, &sim, "b", Some(bus("b").await), slow);

    let rec = crate::store::task("t_wake", "u1", 1, 1);
    let (held, queued) = (store.clone(), rec.clone());
    tokio::task::spawn_blocking(move || held.put_task(&queued).unwrap())
        .await
        .unwrap();
    let asking = CoreBackend::new(b_core);
    let mark = ThreadMark {
        task: rec.spec.task.clone(),
        thread: 0,
        progress: None,
        posted: 0,
        upload_limit: 0,
        approvals: Default::default(),
        turn: None,
        opening: Some(Opening {
            channel: sim.channel_id().parse().unwrap(),
            prompt: "build it".into(),
            private: false,
            failed: None,
        }),
    };
    asking.mark_thread(&mark).await.unwrap();
    asking.wake_leader().await;
    let opened = async || {
        let mark = asking.thread_mark(&rec.spec.task).await.unwrap();
        mark.map_or(0, |m| m.thread)
    };
    eventually_async(T, async || opened().await != 0).await;
    let thread = opened().await.to_string();
    assert!(
        sim.threads().iter().any(|t| t.id == thread),
        "{:#?}",
        sim.threads()
    );
    assert!(!b.bot.leading());
    b.stop().await;
    a.stop().await;
    bus_stop.cancel();
    bus_tasks.close();
    bus_tasks.wait().await;
    sim.shutdown().await;
}
