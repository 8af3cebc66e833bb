//! Gateway mode end to end against the Discord simulator: serenity connects through `DISCORD_API_PROXY`
//! (READY), the commands are registered in the guild, a slash command is answered within Discord's 3
//! seconds, a message in a thread arrives, a component click and a modal are answered, and a 429 is waited
//! out by its `retry_after` instead of bursting.

use std::time::Duration;

use async_trait::async_trait;
use ct_bot::config::BotConfig;
use ct_bot::render::approval::{approval_components, approval_content, ApprovalView};
use ct_bot::{commands, gateway, Rest};
use ct_testkit::discord::{DiscordSim, Opt, SlashCommand};
use serde_json::json;
use serenity::all::{
    ChannelId, Context, CreateInteractionResponse, CreateInteractionResponseMessage, CreateMessage,
    EventHandler, Interaction, Message, UserId,
};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(10);

/// A stand-in for the real handler: answers every interaction at once, and for `/task` also posts to the
/// channel (the call the test rate-limits).
struct Echo {
    rest: Rest,
    seen: mpsc::UnboundedSender<String>,
}

#[async_trait]
impl EventHandler for Echo {
    async fn interaction_create(&self, _ctx: Context, interaction: Interaction) {
        let (id, token, what) = match &interaction {
            Interaction::Command(c) => {
                let opts: Vec<String> = c
                    .data
                    .options()
                    .iter()
                    .map(|o| o.name.to_string())
                    .collect();
                (
                    c.id,
                    c.token.clone(),
                    format!("/{} {}", c.data.name, opts.join(" ")),
                )
            }
            Interaction::Component(c) => {
                (c.id, c.token.clone(), format!("click {}", c.data.custom_id))
            }
            Interaction::Modal(m) => (m.id, m.token.clone(), format!("modal {}", m.data.custom_id)),
            other => {
                let _ = self.seen.send(format!("other {:?}", other.kind()));
                return;
            }
        };
        let reply = CreateInteractionResponse::Message(
            CreateInteractionResponseMessage::new().content(format!("ok: {what}")),
        );
        if let Err(err) = self.rest.respond(id, &token, &reply, &[]).await {
            let _ = self.seen.send(format!("respond failed: {err}"));
            return;
        }
        if let Interaction::Command(c) = &interaction {
            if c.data.name == "task" {
                let posted = self
                    .rest
                    .send_message(
                        c.channel_id,
                        &CreateMessage::new().content("task started"),
                        &[],
                    )
                    .await;
                let _ = self.seen.send(format!("posted: {}", posted.is_ok()));
            }
        }
        let _ = self.seen.send(what);
    }

    async fn message(&self, _ctx: Context, msg: Message) {
        let _ = self
            .seen
            .send(format!("message {}: {}", msg.channel_id, msg.content));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_registers_answers_and_honours_429() {
    let sim = DiscordSim::start().await.unwrap();
    let mut config = BotConfig::gateway(sim.token());
    config.api_proxy = Some(sim.api_base());
    config.guild_id = Some(sim.guild_id().parse().unwrap());
    let rest = Rest::new(&config);
    let (tx, mut seen) = mpsc::unbounded_channel();
    let handle = gateway::connect(
        &config,
        rest.clone(),
        Echo {
            rest: rest.clone(),
            seen: tx,
        },
    )
    .await
    .unwrap();

    // READY, then the commands in the guild.
    sim.wait_identified(WAIT).await.unwrap();
    let identify = sim
        .gateway_events()
        .into_iter()
        .find(|e| e.op == 2)
        .unwrap();
    assert_eq!(
        identify.data["intents"].as_u64().unwrap() & (1 << 15),
        1 << 15,
        "asks for message content"
    );
    let put = sim
        .wait_for(
            |c| {
                c.is(
                    "PUT",
                    &format!("/applications/*/guilds/{}/commands", sim.guild_id()),
                )
            },
            WAIT,
        )
        .await
        .unwrap();
    assert_eq!(put.status, 200, "{}", put.response);
    let names: Vec<String> = sim
        .commands(Some(sim.guild_id()))
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names.len(), commands::all().len());
    assert!(names.contains(&"task".to_string()) && names.contains(&"cc".to_string()));
    assert!(sim.commands(None).is_empty(), "nothing registered globally");

    // A slash command with options: answered within 3 s (the simulator refuses later callbacks).
    let alice = sim.user("alice");
    let origin = sim.origin(&alice);
    sim.rate_limit(
        "POST",
        "/channels/*/messages",
        1,
        Duration::from_millis(1200),
    );
    let ix = sim
        .send_slash(
            &origin,
            &SlashCommand::new("task")
                .opt(Opt::str("prompt", "fix the build"))
                .opt(Opt::str("project", "web")),
        )
        .unwrap();
    let callback = sim
        .wait_callback(&ix, Duration::from_secs(3))
        .await
        .unwrap();
    assert_eq!(callback.status, 204, "{}", callback.response);
    assert_eq!(callback.body["type"], 4);
    assert_eq!(callback.body["data"]["content"], "ok: /task prompt project");
    assert_eq!(sim.interaction(&ix.id).unwrap().response_type, Some(4));

    // The channel post met a 429 and was sent once more after retry_after: two calls, no burst.
    let mut lines = Vec::new();
    while !lines.iter().any(|l: &String| l.starts_with("posted")) {
        lines.push(
            tokio::time::timeout(WAIT, seen.recv())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    assert!(lines.contains(&"posted: true".to_string()), "{lines:?}");
    let posts = sim.calls_to("POST", "/channels/*/messages");
    assert_eq!(
        posts.iter().map(|c| c.status).collect::<Vec<_>>(),
        [429, 200]
    );
    assert!(posts[1].at - posts[0].at >= Duration::from_millis(1200));

    // A message in a thread reaches the handler (MESSAGE_CREATE).
    let channel: ChannelId = sim.channel_id().parse().unwrap();
    let starter = rest
        .send_message(channel, &CreateMessage::new().content("t_abc"), &[])
        .await
        .unwrap();
    let thread = rest
        .start_thread(channel, starter.id, "t_abc: fix the build")
        .await
        .unwrap();
    sim.send_message(
        &sim.origin_in(&alice, &thread.id.to_string()),
        "also run clippy",
    )
    .unwrap();
    let expected = format!("message {}: also run clippy", thread.id);
    loop {
        let line = tokio::time::timeout(WAIT, seen.recv())
            .await
            .unwrap()
            .unwrap();
        if line == expected {
            break;
        }
    }

    // An approval posted by the bot, its button clicked, and a modal submitted: each answered.
    let view = ApprovalView {
        task: "t_abc".into(),
        approval: "a1".into(),
        tool: "Write".into(),
        summary: "src/lib.rs".into(),
        input: json!({"file_path": "src/lib.rs"}),
        question: false,
        description: None,
        session: None,
        input_cut: false,
        decider: UserId::new(alice.id.parse().unwrap()),
    };
    let approval = rest
        .send_message(
            thread.id,
            &CreateMessage::new()
                .content(approval_content(&view))
                .components(approval_components(&view, false).unwrap()),
            &[],
        )
        .await
        .unwrap();
    let thread_origin = sim.origin_in(&alice, &thread.id.to_string());
    let click = sim
        .send_button(&thread_origin, &approval.id.to_string(), "ao:t_abc:a1")
        .unwrap();
    let cb = sim
        .wait_callback(&click, Duration::from_secs(3))
        .await
        .unwrap();
    assert_eq!(cb.body["data"]["content"], "ok: click ao:t_abc:a1");
    let modal = sim
        .send_modal_submit(&thread_origin, "dr:t_abc:a1", &[("reason", "not on main")])
        .unwrap();
    let cb = sim
        .wait_callback(&modal, Duration::from_secs(3))
        .await
        .unwrap();
    assert_eq!(cb.body["data"]["content"], "ok: modal dr:t_abc:a1");

    // Nothing the bot did was refused by the simulator, apart from the one scripted 429.
    let refused: Vec<_> = sim
        .calls()
        .into_iter()
        .filter(|c| c.status >= 400)
        .collect();
    assert_eq!(refused.len(), 1, "{refused:#?}");

    handle.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn a_refused_token_is_reported_before_connecting() {
    let sim = DiscordSim::start().await.unwrap();
    let mut config = BotConfig::gateway("not-the-token");
    config.api_proxy = Some(sim.api_base());
    struct Nothing;
    impl EventHandler for Nothing {}
    let err = gateway::connect(&config, Rest::new(&config), Nothing)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("refused DISCORD_TOKEN"), "{err:#}");
    assert!(sim.gateway_events().is_empty());
}

#[tokio::test]
async fn without_message_content_the_intent_is_not_requested() {
    let sim = DiscordSim::start().await.unwrap();
    sim.allow_message_content(false);
    let mut config = BotConfig::gateway(sim.token());
    config.api_proxy = Some(sim.api_base());
    config.message_content = false;
    struct Nothing;
    impl EventHandler for Nothing {}
    let handle = gateway::connect(&config, Rest::new(&config), Nothing)
        .await
        .unwrap();
    sim.wait_identified(WAIT).await.unwrap();
    // No guild configured: commands go global.
    sim.wait_for(|c| c.is("PUT", "/applications/*/commands"), WAIT)
        .await
        .unwrap();
    assert_eq!(sim.commands(None).len(), commands::all().len());
    handle.shutdown().await;
}
