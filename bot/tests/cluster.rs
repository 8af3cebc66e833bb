//! Nodes of a cluster running the bot against one Discord application and one backend (the scripted
//! [`Fake`], whose lease and records behave as the relay's shared store's): only the lease holder calls
//! Discord with the bot token (it holds the gateway, posts in threads, and opens the threads of tasks started
//! on the other nodes, which ask for them through the task's mark); a thread's commands hold whichever node
//! answers them; when the leader leaves, or is cut off from the store, another node takes over and carries
//! each thread on from its mark with nothing posted twice; and the simulator sees no 429.
//!
//! The timings are shortened ([`times`]); the defaults are in `ct_bot::leader::LeaseTimes`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use ct_bot::config::{BotConfig, Delivery};
use ct_bot::leader::LeaseTimes;
use ct_bot::Bot;
use ct_protocol::task::{Decision, FinalState, TaskEvent};
use ct_testkit::discord::{DiscordSim, Opt, Prepared, SimMessage, SimUser, SlashCommand};
use ct_testkit::eventually;
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::dispatch::{finished, two_questions, Fake};

const T: Duration = Duration::from_secs(10);

fn times() -> LeaseTimes {
    LeaseTimes {
        ttl: Duration::from_secs(3),
        renew: Duration::from_millis(200),
        scan: Duration::from_millis(300),
        grace: Duration::from_millis(500),
    }
}

/// One node's bot, leading while it holds the lease, with its HTTP-interactions endpoint on 127.0.0.1:0.
struct Node {
    bot: Bot,
    url: String,
    stop: CancellationToken,
    run: JoinHandle<()>,
    http: JoinHandle<()>,
}

impl Node {
    async fn start(sim: &DiscordSim, fake: &Arc<Fake>, name: &str, http: bool) -> Self {
        Self::start_with(sim, fake, name, http, times()).await
    }

    async fn start_with(
        sim: &DiscordSim,
        fake: &Arc<Fake>,
        name: &str,
        http: bool,
        times: LeaseTimes,
    ) -> Self {
        let mut config = BotConfig::gateway(sim.token());
        config.api_proxy = Some(sim.api_base());
        config.guild_id = Some(sim.guild_id().parse().unwrap());
        config.node = name.to_string();
        if http {
            config.delivery = Delivery::Http {
                public_key: sim.signer().public_key_hex(),
            };
            config.application_id = Some(sim.application_id().parse().unwrap());
        }
        let bot = Bot::new(config, fake.clone()).unwrap();
        Fake::lock(&fake.woken).push(bot.clone());
        let endpoint = bot.clone();
        let app = axum::Router::new().route(
            "/discord/interactions",
            axum::routing::post(move |h: HeaderMap, b: Bytes| {
                let bot = endpoint.clone();
                async move {
                    let (status, body) = bot.handle_http(&h, &b).await;
                    (StatusCode::from_u16(status).unwrap(), axum::Json(body))
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/discord/interactions",
            listener.local_addr().unwrap()
        );
        let http = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        let stop = CancellationToken::new();
        let run = tokio::spawn({
            let (bot, stop) = (bot.clone(), stop.clone());
            async move {
                bot.lead_with(stop, times).await;
                bot.shutdown().await;
            }
        });
        Self {
            bot,
            url,
            stop,
            run,
            http,
        }
    }

    /// Shuts the node down as SIGTERM does: it steps down and releases the lease.
    async fn stop(self) {
        self.stop.cancel();
        self.run.await.unwrap();
        self.http.abort();
    }
}

/// Node "a" in HTTP-interactions mode, started first and leading: where most of these tests begin.
async fn leader(sim: &DiscordSim, fake: &Arc<Fake>) -> Node {
    let a = Node::start(sim, fake, "a", true).await;
    eventually(T, || a.bot.leading()).await;
    a
}

/// Waits until `node` has asked for the lease `n` times (so a refusal has been seen, not assumed).
async fn asked(fake: &Fake, node: &str, n: usize) {
    eventually(T, || {
        Fake::lock(&fake.lease_asks)
            .get(node)
            .is_some_and(|k| *k >= n)
    })
    .await;
}

/// `/task PROMPT` by `user`, POSTed to `node`'s endpoint as Discord would; returns (task, thread).
async fn task_on(sim: &DiscordSim, node: &Node, user: &SimUser, prompt: &str) -> (String, String) {
    task_at(sim, &node.url, user, prompt).await
}

/// [`task_on`] by the node's endpoint.
async fn task_at(sim: &DiscordSim, url: &str, user: &SimUser, prompt: &str) -> (String, String) {
    let p = sim
        .prepare_slash(
            &sim.origin(user),
            &SlashCommand::new("task").opt(Opt::str("prompt", prompt)),
        )
        .unwrap();
    let said = said_at(sim, url, &p).await;
    assert!(said.starts_with("🧵 Started `t_"), "{said}");
    let task = said.split('`').nth(1).unwrap().to_string();
    let start = said.find("<#").unwrap() + 2;
    (task, said[start..said.len() - 1].to_string())
}

/// What `node` answers to the interaction `p`, POSTed to its endpoint as Discord would.
async fn said_on(sim: &DiscordSim, node: &Node, p: &Prepared) -> String {
    said_at(sim, &node.url, p).await
}

async fn said_at(sim: &DiscordSim, url: &str, p: &Prepared) -> String {
    let reply = sim.post_interaction(url, p).await.unwrap();
    assert_eq!(reply.status, 200);
    let body: Value = reply.json().unwrap();
    match body["data"]["content"].as_str() {
        Some(s) => s.to_string(),
        // Deferred: the answer is the edited original.
        None => sim
            .wait_until(T, |s| {
                let i = s.interaction(&p.interaction.id)?;
                let m = s.message(i.original_message.as_deref()?)?;
                (!m.content.is_empty()).then_some(m.content)
            })
            .await
            .unwrap(),
    }
}

/// A command by `user` in `thread`, answered by `node`.
async fn in_thread_on(
    sim: &DiscordSim,
    node: &Node,
    user: &SimUser,
    thread: &str,
    cmd: SlashCommand,
) -> String {
    let p = sim
        .prepare_slash(&sim.origin_in(user, thread), &cmd)
        .unwrap();
    said_on(sim, node, &p).await
}

async fn find(sim: &DiscordSim, channel: &str, what: &str, pred: impl Fn(&SimMessage) -> bool) {
    sim.wait_until(T, |s| s.messages(channel).into_iter().find(|m| pred(m)))
        .await
        .unwrap_or_else(|e| panic!("no {what}: {e:#}\n{:#?}", sim.messages(channel)));
}

fn text(s: &str) -> TaskEvent {
    TaskEvent::Text { text: s.into() }
}

/// Once the summary is in: each text exactly once, one progress message (edited to the end), one summary,
/// and at most one note that the follower changed hands.
async fn posted_once(sim: &DiscordSim, task: &str, thread: &str, texts: &[&str]) {
    find(sim, thread, "the summary", |m| m.embeds != json!([])).await;
    let messages = sim.messages(thread);
    for t in texts {
        assert_eq!(
            messages.iter().filter(|m| m.content == *t).count(),
            1,
            "{t:?} posted once: {messages:#?}"
        );
    }
    let progress: Vec<_> = messages
        .iter()
        .filter(|m| m.custom_ids() == [format!("st:{task}")])
        .collect();
    assert_eq!(progress.len(), 1, "one progress message: {messages:#?}");
    assert!(
        progress[0]
            .components
            .to_string()
            .contains("\"disabled\":true"),
        "the progress message was edited to the end: {messages:#?}"
    );
    assert_eq!(
        messages.iter().filter(|m| m.embeds != json!([])).count(),
        1,
        "one summary: {messages:#?}"
    );
    assert!(
        messages
            .iter()
            .filter(|m| m.content.contains("relay restarted"))
            .count()
            <= 1,
        "{messages:#?}"
    );
}

/// Discord's rate limits held for the cluster as a whole: no call was refused with a 429.
fn no_429(sim: &DiscordSim) {
    let limited: Vec<_> = sim
        .calls()
        .into_iter()
        .filter(|c| c.status == 429)
        .collect();
    assert!(limited.is_empty(), "rate-limited calls: {limited:#?}");
}

/// HTTP interactions reach either node. A task started on the node that does not lead gets its thread and
/// its posts from the leader alone; when the leader shuts down, the other node takes over at its next
/// renewal (not after the lease's TTL) and carries the thread on from the mark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_alone_posts_and_a_survivor_carries_the_thread_on() {
    let sim = DiscordSim::start().await.unwrap();
    let alice = sim.user("alice");
    let fake = Fake::new(&alice.id);
    let a = leader(&sim, &fake).await;
    let b = Node::start(&sim, &fake, "b", true).await;
    asked(&fake, "b", 2).await;
    assert!(!b.bot.leading(), "the lease is a's: b must not lead");
    // The leader registers the commands (HTTP mode has no READY to do it on).
    sim.wait_for(|c| c.is("PUT", "/applications/*/guilds/*/commands"), T)
        .await
        .unwrap();

    // Started on b, which leaves opening the thread to the leader.
    let (task, thread) = task_on(&sim, &b, &alice, "build it").await;
    find(&sim, &thread, "the progress message", |m| {
        m.custom_ids() == [format!("st:{task}")]
    })
    .await;
    fake.emit(&task, text("first part"));
    find(&sim, &thread, "the first part", |m| {
        m.content == "first part"
    })
    .await;
    assert_eq!(
        (a.bot.followed(), b.bot.followed()),
        (1, 0),
        "a follows, b does not"
    );
    // A task started on the leader is followed there too.
    let (other, other_thread) = task_on(&sim, &a, &alice, "and this").await;
    fake.emit(&other, text("other output"));
    find(&sim, &other_thread, "the other output", |m| {
        m.content == "other output"
    })
    .await;
    assert_eq!(b.bot.followed(), 0);

    // The leader leaves in the middle of a burst of output; its followers stop cleanly (each after the event
    // in hand, with its mark saved) and the lease is released.
    let burst: Vec<String> = (0..20).map(|i| format!("burst {i}")).collect();
    for line in &burst {
        fake.emit(&task, text(line));
    }
    find(&sim, &thread, "the burst's start", |m| {
        m.content == "burst 0"
    })
    .await;
    let left = Instant::now();
    a.stop().await;
    eventually(T, || b.bot.leading()).await;
    assert!(
        left.elapsed() < times().ttl,
        "taken over at the next renewal, not after the TTL: {:?}",
        left.elapsed()
    );
    fake.emit(&task, text("second part"));
    fake.emit(&task, finished(FinalState::Done, None));
    fake.emit(&other, finished(FinalState::Done, None));
    let mut texts = vec!["first part", "second part"];
    texts.extend(burst.iter().map(String::as_str));
    posted_once(&sim, &task, &thread, &texts).await;
    posted_once(&sim, &other, &other_thread, &["other output"]).await;
    eventually(T, || Fake::lock(&fake.marks).is_empty()).await;
    no_429(&sim);
    b.stop().await;
    sim.shutdown().await;
}

/// Gateway mode: one node holds the gateway session at a time. The leader shuts down mid-task; the other
/// node connects within seconds, answers commands, and carries the thread on — at no moment are two
/// sessions connected, and nothing is posted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gateway_session_and_another_node_takes_it_over() {
    let sim = Arc::new(DiscordSim::start().await.unwrap());
    let alice = sim.user("alice");
    let fake = Fake::new(&alice.id);
    // The most sessions ever connected at once, sampled throughout.
    let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let watching = CancellationToken::new();
    let watch = tokio::spawn({
        let (sim, most, watching) = (sim.clone(), most.clone(), watching.clone());
        async move {
            while !watching.is_cancelled() {
                most.fetch_max(sim.gateway_sessions(), std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    let a = Node::start(&sim, &fake, "a", false).await;
    sim.wait_identified(T).await.unwrap();
    let b = Node::start(&sim, &fake, "b", false).await;
    asked(&fake, "b", 3).await;
    assert_eq!(
        sim.gateway_sessions(),
        1,
        "b must not connect while a leads"
    );

    let ix = sim
        .send_slash(
            &sim.origin(&alice),
            &SlashCommand::new("task").opt(Opt::str("prompt", "long job")),
        )
        .unwrap();
    let said = sim
        .wait_until(T, |s| {
            let i = s.interaction(&ix.id)?;
            let m = s.message(i.original_message.as_deref()?)?;
            (!m.content.is_empty()).then_some(m.content)
        })
        .await
        .unwrap();
    let task = said.split('`').nth(1).unwrap().to_string();
    let start = said.find("<#").unwrap() + 2;
    let thread = said[start..said.len() - 1].to_string();
    fake.emit(&task, text("before"));
    find(&sim, &thread, "the first output", |m| m.content == "before").await;

    a.stop().await;
    // b connects; a's session is gone by then.
    eventually(T, || b.bot.leading()).await;
    sim.wait_identified(T).await.unwrap();
    fake.emit(&task, text("after"));
    fake.emit(&task, finished(FinalState::Done, None));
    posted_once(&sim, &task, &thread, &["before", "after"]).await;
    // b's gateway answers commands now.
    let status = sim
        .send_slash(
            &sim.origin(&alice),
            &SlashCommand::new("status").opt(Opt::str("task_id", &task)),
        )
        .unwrap();
    sim.wait_callback(&status, T).await.unwrap();

    watching.cancel();
    watch.await.unwrap();
    assert_eq!(
        most.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "never two gateway sessions at once"
    );
    no_429(&sim);
    b.stop().await;
    Arc::try_unwrap(sim).unwrap().shutdown().await;
}

/// The leader loses the store (its renewals fail) while the agent keeps producing output: it stops
/// posting before its lease can have expired, and only after that does the other node take the lease and
/// carry the thread on from the mark — never two posters at once, nothing posted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_the_store_stops_before_its_lease_lapses() {
    let sim = DiscordSim::start().await.unwrap();
    let alice = sim.user("alice");
    let fake = Fake::new(&alice.id);
    let a = leader(&sim, &fake).await;
    let b = Node::start(&sim, &fake, "b", true).await;
    let (task, thread) = task_on(&sim, &b, &alice, "build it").await;
    fake.emit(&task, text("one"));
    find(&sim, &thread, "the first output", |m| m.content == "one").await;
    assert_eq!((a.bot.followed(), b.bot.followed()), (1, 0));

    Fake::lock(&fake.cut_off).insert("a".into());
    eventually(T, || !a.bot.leading() && a.bot.followed() == 0).await;
    // Read after a stopped: a renewal granted just before the cut can only have moved it later.
    let until = Fake::lock(&fake.lease).as_ref().unwrap().1;
    assert!(
        Instant::now() < until,
        "a stopped posting before its lease could lapse"
    );
    assert!(!b.bot.leading(), "b waits for the lease to lapse");
    // Output while nobody posts is posted by the next leader, once.
    fake.emit(&task, text("two"));
    eventually(T, || b.bot.leading()).await;
    assert!(
        Instant::now() >= until,
        "b took over only once a's lease had lapsed"
    );
    fake.emit(&task, text("three"));
    fake.emit(&task, finished(FinalState::Done, None));
    posted_once(&sim, &task, &thread, &["one", "two", "three"]).await;
    assert!(!a.bot.leading(), "a, still cut off, does not lead again");
    no_429(&sim);
    a.stop().await;
    b.stop().await;
    sim.shutdown().await;
}

/// Buttons reach any node in HTTP-interactions mode, also those that do not follow the thread: a node
/// that did not post an approval finds its request in the task's stored events, so "allow commands
/// starting with …" takes the word from what the agent asked — and a click on an approval that is closed
/// there allows nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_button_clicked_on_a_node_that_does_not_follow_the_thread_is_understood() {
    use ct_protocol::scope::SessionScope;

    let sim = DiscordSim::start().await.unwrap();
    let alice = sim.user("alice");
    let fake = Fake::new(&alice.id);
    let a = leader(&sim, &fake).await;
    let b = Node::start(&sim, &fake, "b", true).await;
    let (task, thread) = task_on(&sim, &a, &alice, "test it").await;
    let ask = |id: &str| TaskEvent::ApprovalRequested {
        approval: id.into(),
        tool: "Bash".into(),
        summary: "npm test --watch".into(),
        input: json!({"command": "npm test --watch"}),
        question: false,
        description: None,
        session: Some(SessionScope::Command {
            command: "npm test --watch".into(),
        }),
        input_cut: false,
    };
    fake.emit(&task, ask("a1"));
    let word = format!("aw:{task}:a1");
    find(&sim, &thread, "the approval", |m| {
        m.custom_ids().contains(&word)
    })
    .await;
    let message = sim
        .messages(&thread)
        .into_iter()
        .find(|m| m.custom_ids().contains(&word))
        .unwrap();
    let click = |custom_id: &str| {
        sim.prepare_component(
            &sim.origin_in(&alice, &thread),
            &message.id,
            custom_id,
            None,
        )
        .unwrap()
    };
    let reply = sim.post_interaction(&b.url, &click(&word)).await.unwrap();
    assert_eq!(reply.status, 200);
    eventually(T, || !Fake::lock(&fake.decisions).is_empty()).await;
    assert!(
        matches!(
            &Fake::lock(&fake.decisions)[0],
            (_, t, Decision::AllowSessionPrefix { prefix }) if *t == task && prefix == "npm"
        ),
        "{:?}",
        Fake::lock(&fake.decisions)
    );

    // Closed in the log: b allows nothing for it, however the click is made. The click is one a person made
    // on the message as their client still showed it: prepared before the leader disables the buttons (the
    // simulator refuses to prepare a click on a disabled button, and the leader's edit may come at once).
    let late = click(&word);
    fake.emit(
        &task,
        TaskEvent::ApprovalClosed {
            approval: "a1".into(),
            outcome: "allowed".into(),
        },
    );
    let reply = sim.post_interaction(&b.url, &late).await.unwrap();
    let said = reply.json().unwrap().to_string();
    assert!(said.contains("no longer open"), "{said}");
    assert_eq!(Fake::lock(&fake.decisions).len(), 1, "nothing more decided");
    no_429(&sim);
    a.stop().await;
    b.stop().await;
    sim.shutdown().await;
}

/// A leader whose store misses a renewal or two keeps leading while its lease surely holds: its followers
/// are not stopped and restarted (which would tell every thread the relay restarted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passing_store_hiccup_does_not_interrupt_the_leader() {
    let sim = DiscordSim::start().await.unwrap();
    let alice = sim.user("alice");
    let fake = Fake::new(&alice.id);
    let a = leader(&sim, &fake).await;
    let (task, thread) = task_on(&sim, &a, &alice, "build it").await;
    fake.emit(&task, text("one"));
    find(&sim, &thread, "the first output", |m| m.content == "one").await;

    let before = Fake::lock(&fake.lease_asks)["a"];
    Fake::lock(&fake.cut_off).insert("a".into());
    asked(&fake, "a", before + 2).await;
    assert!(a.bot.leading(), "two failed renewals are within the lease");
    Fake::lock(&fake.cut_off).remove("a");
    asked(&fake, "a", before + 4).await;
    assert!(a.bot.leading());
    assert_eq!(a.bot.followed(), 1, "the follower ran on");

    fake.emit(&task, text("two"));
    fake.emit(&task, finished(FinalState::Done, None));
    posted_once(&sim, &task, &thread, &["one", "two"]).await;
    assert!(
        sim.messages(&thread)
            .iter()
            .all(|m| !m.content.contains("relay restarted")),
        "{:#?}",
        sim.messages(&thread)
    );
    a.stop().await;
    sim.shutdown().await;
}

/// The leader dies between posting and recording it: its last posts never reached the mark. The next leader
/// posts those events again from the mark — with the same nonces, so Discord (`enforce_nonce`) hands back the
/// messages already there and the thread shows each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_a_dead_leader_did_not_record_are_not_doubled() {
    use std::sync::atomic::Ordering;

    let sim = DiscordSim::start().await.unwrap();
    let alice = sim.user("alice");
    let fake = Fake::new(&alice.id);
    let a = leader(&sim, &fake).await;
    let (task, thread) = task_on(&sim, &a, &alice, "build it").await;
    fake.emit(&task, text("one"));
    find(&sim, &thread, "the first output", |m| m.content == "one").await;
    eventually(T, || {
        Fake::lock(&fake.marks)
            .get(&task)
            .is_some_and(|m| m.posted >= 1 && m.progress.is_some())
    })
    .await;

    // From here on a's marks are lost: what it posts now is in the thread but not in the mark.
    fake.marks_lost.store(true, Ordering::SeqCst);
    let posted = Fake::lock(&fake.marks)[&task].posted;
    fake.emit(&task, text("two"));
    fake.emit(
        &task,
        TaskEvent::ApprovalRequested {
            approval: "a1".into(),
            tool: "Bash".into(),
            summary: "make".into(),
            input: json!({"command": "make"}),
            question: false,
            description: None,
            session: None,
            input_cut: false,
        },
    );
    let deny = format!("dn:{task}:a1");
    find(&sim, &thread, "the approval", |m| {
        m.custom_ids().contains(&deny)
    })
    .await;
    a.stop().await;
    assert_eq!(
        Fake::lock(&fake.marks)[&task].posted,
        posted,
        "the mark is where it was before a died"
    );
    fake.marks_lost.store(false, Ordering::SeqCst);

    let b = Node::start(&sim, &fake, "b", true).await;
    eventually(T, || b.bot.leading()).await;
    fake.emit(&task, text("three"));
    fake.emit(&task, finished(FinalState::Done, None));
    posted_once(&sim, &task, &thread, &["one", "two", "three"]).await;
    let approvals = sim
        .messages(&thread)
        .iter()
        .filter(|m| m.custom_ids().contains(&deny))
        .count();
    assert_eq!(approvals, 1, "{:#?}", sim.messages(&thread));
    no_429(&sim);
    b.stop().await;
    sim.shutdown().await;
}

/// A thread's commands reach any node in HTTP-interactions mode, so what they set is kept for the cluster,
/// not in the memory of the node that answered: `/cc model` answered by one node holds for a follow-up sent
/// through the other; a node that missed a follow-up stops the newest task, not the one it remembers; and the
/// questions of one AskUserQuestion answered through two nodes reach Claude together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_threads_commands_hold_across_nodes() {
    let sim = DiscordSim::start().await.unwrap();
    let alice = sim.user("alice");
    let fake = Fake::new(&alice.id);
    let a = leader(&sim, &fake).await;
    let b = Node::start(&sim, &fake, "b", true).await;
    let (t1, thread) = task_on(&sim, &a, &alice, "first").await;
    fake.emit(&t1, finished(FinalState::Done, None));
    find(&sim, &thread, "t1's summary", |m| m.embeds != json!([])).await;

    // /cc model through b, the follow-up through a: it runs on the model b was told.
    let cc = |sub: &str, opts| SlashCommand::new("cc").sub(sub, opts);
    let said = in_thread_on(
        &sim,
        &b,
        &alice,
        &thread,
        cc("model", vec![Opt::str("name", "opus")]),
    )
    .await;
    assert!(said.contains("**opus**"), "{said}");
    let reply = |p: &str| SlashCommand::new("reply").opt(Opt::str("prompt", p));
    let said = in_thread_on(&sim, &a, &alice, &thread, reply("go on")).await;
    let req = Fake::lock(&fake.submits).last().cloned().unwrap();
    assert_eq!(req.options.model.as_deref(), Some("opus"), "{said}");
    assert_eq!(
        req.resume.as_deref(),
        Some("session-1"),
        "the conversation continues"
    );
    let t2 = Fake::lock(&fake.tasks)
        .values()
        .map(|t| t.info.id.clone())
        .find(|id| *id != t1)
        .unwrap();
    assert!(said.contains(&t2), "{said}");

    // b last saw the thread at t1; a moved it on to t2. /cc stop through b stops t2.
    let said = in_thread_on(&sim, &b, &alice, &thread, cc("stop", vec![])).await;
    assert!(said.contains(&t2), "{said}");
    assert_eq!(*Fake::lock(&fake.cancels), std::slice::from_ref(&t2));

    // AskUserQuestion with two questions, one answered through each node: both reach Claude at once.
    fake.emit(&t2, two_questions("q1"));
    let first = format!("qa:0:{t2}:q1");
    find(&sim, &thread, "the questions", |m| {
        m.custom_ids().contains(&first)
    })
    .await;
    let q = sim
        .messages(&thread)
        .into_iter()
        .find(|m| m.custom_ids().contains(&first))
        .unwrap();
    let select = |id: &str, value: &str| {
        sim.prepare_component(&sim.origin_in(&alice, &thread), &q.id, id, Some(&[value]))
            .unwrap()
    };
    let said = said_on(&sim, &a, &select(&first, "1")).await;
    assert!(said.contains("other questions"), "{said}");
    let said = said_on(&sim, &b, &select(&format!("qa:1:{t2}:q1"), "0")).await;
    assert!(said.contains("sent to Claude"), "{said}");
    assert_eq!(
        Fake::lock(&fake.decisions).clone(),
        [(
            alice.id.clone(),
            t2.clone(),
            Decision::Answers {
                answers: json!({"Which DB?": "SQLite", "Tests?": "yes"})
            }
        )]
    );

    // /cc clear through b, the next follow-up through a: a fresh session.
    fake.emit(&t2, finished(FinalState::Done, None));
    find(&sim, &thread, "t2's summary", |m| {
        m.embeds.to_string().contains(&t2)
    })
    .await;
    let said = in_thread_on(&sim, &b, &alice, &thread, cc("clear", vec![])).await;
    assert!(said.contains("fresh"), "{said}");
    in_thread_on(&sim, &a, &alice, &thread, reply("start over")).await;
    let req = Fake::lock(&fake.submits).last().cloned().unwrap();
    assert_eq!((req.prompt.as_str(), req.resume), ("start over", None));
    no_429(&sim);
    a.stop().await;
    b.stop().await;
    sim.shutdown().await;
}

/// Three nodes, a burst of tasks through all of them at once, and Discord's buckets set tight. Only the
/// leader calls Discord with the bot token (the others leave opening their tasks' threads to it), and its
/// client makes one call at a time per route, paced by the headers: the simulator refuses nothing (no 429,
/// no 4xx), and every thread gets all of its output exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_under_a_burst_of_tasks_keep_discords_limits() {
    let sim = Arc::new(DiscordSim::start().await.unwrap());
    let alice = sim.user("alice");
    let fake = Fake::new(&alice.id);
    let a = leader(&sim, &fake).await;
    let b = Node::start(&sim, &fake, "b", true).await;
    let c = Node::start(&sim, &fake, "c", true).await;
    sim.wait_for(|c| c.is("PUT", "/applications/*/guilds/*/commands"), T)
        .await
        .unwrap();
    // Four calls per route per half second: a burst of fifteen tasks needs several windows in the channel.
    sim.set_bucket_limit(4, Duration::from_millis(500));
    let urls = [a.url.clone(), b.url.clone(), c.url.clone()];
    let started: Vec<_> = (0..15)
        .map(|i| {
            let (sim, alice, url) = (sim.clone(), alice.clone(), urls[i % 3].clone());
            tokio::spawn(async move { task_at(&sim, &url, &alice, &format!("job {i}")).await })
        })
        .collect();
    let mut tasks = Vec::new();
    for s in started {
        tasks.push(s.await.unwrap());
    }
    let lines = |i: usize| {
        (0..3)
            .map(|n| format!("job {i} line {n}"))
            .collect::<Vec<_>>()
    };
    for (i, (task, _)) in tasks.iter().enumerate() {
        for line in lines(i) {
            fake.emit(task, text(&line));
        }
        fake.emit(task, finished(FinalState::Done, None));
    }
    for (i, (task, thread)) in tasks.iter().enumerate() {
        let lines = lines(i);
        let texts: Vec<&str> = lines.iter().map(String::as_str).collect();
        posted_once(&sim, task, thread, &texts).await;
    }
    let threads: std::collections::HashSet<_> = tasks.iter().map(|(_, t)| t).collect();
    assert_eq!(threads.len(), 15, "one thread per task");
    let refused: Vec<_> = sim
        .calls()
        .into_iter()
        .filter(|c| c.status >= 400)
        .collect();
    assert!(refused.is_empty(), "refused calls: {refused:#?}");
    for node in [a, b, c] {
        node.stop().await;
    }
    Arc::try_unwrap(sim).unwrap().shutdown().await;
}

/// A thread the leader cannot open for another node (here, a channel Discord does not know): the task is
/// stopped, since nobody could see or answer it, and the node that was asked says why, through the mark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thread_the_leader_cannot_open_stops_the_task_and_the_asking_node_says_why() {
    let sim = DiscordSim::start().await.unwrap();
    let alice = sim.user("alice");
    let fake = Fake::new(&alice.id);
    let a = leader(&sim, &fake).await;
    let b = Node::start(&sim, &fake, "b", true).await;
    // The command comes from a channel deleted just after (as a moderator might): nothing can be posted there.
    let channel = sim.add_channel("doomed");
    let p = sim
        .prepare_slash(
            &sim.origin_in(&alice, &channel),
            &SlashCommand::new("task").opt(Opt::str("prompt", "build it")),
        )
        .unwrap();
    let rest = ct_bot::Rest::with_base(
        &sim.api_base(),
        Some(ct_bot::config::Secret::new(sim.token())),
        T,
    );
    rest.call::<Value>(
        reqwest::Method::DELETE,
        &format!("/channels/{channel}"),
        None,
        &[],
    )
    .await
    .unwrap();
    let said = said_on(&sim, &b, &p).await;
    assert!(said.contains("could not open a thread"), "{said}");
    let task = Fake::lock(&fake.tasks)
        .values()
        .map(|t| t.info.id.clone())
        .next()
        .unwrap();
    assert!(said.contains(&task), "{said}");
    assert_eq!(*Fake::lock(&fake.cancels), std::slice::from_ref(&task));
    assert!(
        Fake::lock(&fake.marks).is_empty(),
        "the failed opening is forgotten"
    );
    a.stop().await;
    b.stop().await;
    sim.shutdown().await;
}

/// A `/task` answered by a node that does not lead: the node wakes the leader (through the backend; a relay
/// passes it on over the cluster bus), which opens the thread at once rather than at its next scan. The
/// scans here are a minute apart, longer than the asking node waits for the thread (10 s): without the
/// wake-up its answer would be that the thread opens in a moment, with no thread to link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_on_a_node_that_does_not_lead_wakes_the_leader_to_open_its_thread() {
    let sim = DiscordSim::start().await.unwrap();
    let alice = sim.user("alice");
    let fake = Fake::new(&alice.id);
    let slow = LeaseTimes {
        scan: Duration::from_secs(60),
        ..times()
    };
    let a = Node::start_with(&sim, &fake, "a", true, slow).await;
    eventually(T, || a.bot.leading()).await;
    // Registered after it adopted what marks there were at the start of its term.
    sim.wait_for(|c| c.is("PUT", "/applications/*/guilds/*/commands"), T)
        .await
        .unwrap();
    let b = Node::start_with(&sim, &fake, "b", true, slow).await;
    asked(&fake, "b", 2).await;
    assert!(!b.bot.leading());
    let (task, thread) = task_on(&sim, &b, &alice, "build it").await;
    assert!(
        sim.threads().iter().any(|t| t.id == thread),
        "b answered with the thread itself, not that it opens in a moment: <#{thread}>"
    );
    fake.emit(&task, text("built"));
    fake.emit(&task, finished(FinalState::Done, None));
    posted_once(&sim, &task, &thread, &["built"]).await;
    no_429(&sim);
    a.stop().await;
    b.stop().await;
    sim.shutdown().await;
}
