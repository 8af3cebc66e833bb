//! The Discord simulator against its real client: serenity 0.12.5's REST client pointed at it through the
//! proxy setting, serenity's model types deserializing what it sends, and a raw WebSocket client speaking
//! the gateway protocol. If these pass, a bot built on serenity sees from the simulator what it would see
//! from Discord.

use std::time::{Duration, Instant};

use ct_testkit::discord::{DiscordSim, Opt, SlashCommand};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use serenity::all::{
    ChannelId, CommandOptionType, CreateAttachment, CreateCommand, CreateCommandOption, GuildId,
    Interaction, MessageId, ResolvedValue,
};
use serenity::http::{Http, HttpBuilder};
use tokio_tungstenite::tungstenite::Message as WsMessage;

const WAIT: Duration = Duration::from_secs(5);

fn http(sim: &DiscordSim) -> Http {
    HttpBuilder::new(sim.token())
        .proxy(sim.api_base())
        .ratelimiter_disabled(true)
        .application_id(sim.application_id().parse().unwrap())
        .build()
}

fn discord_error(err: serenity::Error) -> (u16, Value) {
    match err {
        serenity::Error::Http(serenity::http::HttpError::UnsuccessfulRequest(r)) => (
            r.status_code.as_u16(),
            json!({"code": r.error.code, "message": r.error.message}),
        ),
        other => panic!("expected a Discord error response, got {other:?}"),
    }
}

#[tokio::test]
async fn serenity_rest_client_reads_every_basic_object() {
    let sim = DiscordSim::start().await.unwrap();
    let http = http(&sim);
    assert_eq!(http.get_gateway().await.unwrap().url, sim.gateway_url());
    let bot = http.get_bot_gateway().await.unwrap();
    assert_eq!(bot.shards, 1);
    let me = http.get_current_user().await.unwrap();
    assert_eq!(me.id.to_string(), sim.bot_user().id);
    assert!(me.bot);
    let app = http.get_current_application_info().await.unwrap();
    assert_eq!(app.id.to_string(), sim.application_id());
    assert_eq!(app.verify_key, sim.signer().public_key_hex());
    let channel = http
        .get_channel(sim.channel_id().parse::<ChannelId>().unwrap())
        .await
        .unwrap();
    assert_eq!(channel.guild().unwrap().name, "general");

    // Every call was recorded, each with rate-limit headers' worth of state, and nothing was refused.
    let calls = sim.calls();
    assert_eq!(calls.len(), 5);
    assert!(calls.iter().all(|c| c.status == 200), "{calls:#?}");
    sim.shutdown().await;
}

#[tokio::test]
async fn wrong_token_is_unauthorized() {
    let sim = DiscordSim::start().await.unwrap();
    let http = HttpBuilder::new("not-the-token")
        .proxy(sim.api_base())
        .ratelimiter_disabled(true)
        .build();
    let (status, _) = discord_error(http.get_current_user().await.unwrap_err());
    assert_eq!(status, 401);
}

#[tokio::test]
async fn commands_are_stored_and_validated() {
    let sim = DiscordSim::start().await.unwrap();
    let http = http(&sim);
    let guild: GuildId = sim.guild_id().parse().unwrap();
    let cmds = vec![
        CreateCommand::new("task")
            .description("Start a task")
            .add_option(
                CreateCommandOption::new(CommandOptionType::String, "prompt", "What to do")
                    .required(true),
            ),
        CreateCommand::new("project")
            .description("Projects")
            .add_option(CreateCommandOption::new(
                CommandOptionType::SubCommand,
                "list",
                "List them",
            )),
    ];
    let registered = http.create_guild_commands(guild, &cmds).await.unwrap();
    assert_eq!(registered.len(), 2);
    assert_eq!(registered[0].name, "task");
    let stored = sim.commands(Some(sim.guild_id()));
    assert_eq!(stored.len(), 2);
    assert_eq!(stored[0]["id"], registered[0].id.to_string());
    // A second bulk overwrite keeps the ids of commands that kept their name.
    let again = http
        .create_guild_commands(guild, &cmds[..1].to_vec())
        .await
        .unwrap();
    assert_eq!(again[0].id, registered[0].id);
    assert_eq!(sim.commands(Some(sim.guild_id())).len(), 1);

    let bad = vec![CreateCommand::new("Task").description("uppercase is not allowed")];
    let (status, body) = discord_error(http.create_guild_commands(guild, &bad).await.unwrap_err());
    assert_eq!((status, body["code"].as_i64()), (400, Some(50035)));
    assert!(sim.commands(None).is_empty());
}

#[tokio::test]
async fn messages_edits_files_threads_and_limits() {
    let sim = DiscordSim::start().await.unwrap();
    let http = http(&sim);
    let channel: ChannelId = sim.channel_id().parse().unwrap();

    let msg = http
        .send_message(channel, vec![], &json!({"content": "working…"}))
        .await
        .unwrap();
    assert_eq!(msg.content, "working…");
    assert_eq!(msg.author.id.to_string(), sim.bot_user().id);
    let edited = http
        .edit_message(
            channel,
            msg.id,
            &json!({"content": "done", "embeds": [{"title": "Summary"}]}),
            vec![],
        )
        .await
        .unwrap();
    assert!(edited.edited_timestamp.is_some());
    let stored = sim.message(&msg.id.to_string()).unwrap();
    assert_eq!((stored.content.as_str(), stored.edits), ("done", 1));
    assert_eq!(stored.embeds[0]["title"], "Summary");

    // Multipart with a file: the name and size are recorded and the message carries the attachment.
    let file = CreateAttachment::bytes(vec![b'x'; 12_345], "diff.patch");
    let with_file = http
        .send_message(channel, vec![file], &json!({"content": "the diff"}))
        .await
        .unwrap();
    assert_eq!(with_file.attachments.len(), 1);
    assert_eq!(with_file.attachments[0].filename, "diff.patch");
    assert_eq!(with_file.attachments[0].size, 12_345);
    let call = sim.calls_to("POST", "/channels/*/messages").pop().unwrap();
    assert_eq!(call.files.len(), 1);
    assert_eq!(
        (call.files[0].filename.as_str(), call.files[0].size),
        ("diff.patch", 12_345)
    );
    assert_eq!(call.body["content"], "the diff");

    // Over 2,000 characters: Discord's 400 with the field named, and nothing stored.
    let before = sim.messages(sim.channel_id()).len();
    let err = http
        .send_message(channel, vec![], &json!({"content": "y".repeat(2001)}))
        .await
        .unwrap_err();
    let (status, body) = discord_error(err);
    assert_eq!((status, body["code"].as_i64()), (400, Some(50035)));
    assert_eq!(sim.messages(sim.channel_id()).len(), before);
    let refused = sim.calls().pop().unwrap();
    assert_eq!(refused.status, 400);
    assert!(refused.response["errors"]["content"]["_errors"].is_array());

    // A thread from a message gets the message's id; a second one is refused.
    let thread = http
        .create_thread_from_message(
            channel,
            msg.id,
            &json!({"name": "t_abc: fix the build"}),
            None,
        )
        .await
        .unwrap();
    assert_eq!(thread.id.get(), msg.id.get());
    assert_eq!(thread.parent_id, Some(channel));
    let err = http
        .create_thread_from_message(channel, msg.id, &json!({"name": "again"}), None)
        .await
        .unwrap_err();
    assert_eq!(discord_error(err).0, 400);
    let posted = http
        .send_message(thread.id, vec![], &json!({"content": "in the thread"}))
        .await
        .unwrap();
    assert_eq!(posted.channel_id, thread.id);
    assert_eq!(
        sim.messages(&thread.id.to_string())[0].content,
        "in the thread"
    );
    let standalone = http
        .create_thread(channel, &json!({"name": "standalone", "type": 11}), None)
        .await
        .unwrap();
    assert_eq!(sim.threads().len(), 2);
    assert_eq!(sim.threads()[1].id, standalone.id.to_string());

    // Unknown message and channel: Discord's 404 codes.
    let err = http
        .edit_message(
            channel,
            MessageId::new(42),
            &json!({"content": "x"}),
            vec![],
        )
        .await
        .unwrap_err();
    assert_eq!(discord_error(err).1["code"], 10008);
    let err = http
        .send_message(ChannelId::new(42), vec![], &json!({"content": "x"}))
        .await
        .unwrap_err();
    assert_eq!(discord_error(err).1["code"], 10003);
    http.delete_message(channel, with_file.id, None)
        .await
        .unwrap();
    assert!(sim.message(&with_file.id.to_string()).is_none());
}

#[tokio::test]
async fn scripted_429s_and_bucket_headers() {
    let sim = DiscordSim::start().await.unwrap();
    let http = http(&sim);
    let channel: ChannelId = sim.channel_id().parse().unwrap();
    sim.rate_limit(
        "POST",
        "/channels/*/messages",
        2,
        Duration::from_millis(1500),
    );

    for _ in 0..2 {
        let req = serenity::http::Request::new(
            serenity::http::Route::ChannelMessages {
                channel_id: channel,
            },
            serenity::http::LightMethod::Post,
        )
        .body(Some(br#"{"content":"hi"}"#.to_vec()));
        let (status, body) = discord_error(http.request(req).await.unwrap_err());
        assert_eq!(status, 429);
        // serenity cannot decode Discord's 429 body (it has no `code`), which is why the bot reads
        // 429s itself; the call log has the real body.
        let _ = body;
    }
    let limited = sim.calls_to("POST", "/channels/*/messages");
    assert_eq!(limited.len(), 2);
    assert!(limited.iter().all(|c| c.status == 429));
    assert_eq!(limited[0].response["retry_after"], 1.5);
    assert_eq!(limited[0].response["global"], false);
    // The rule is used up: the third call goes through, with the headers a client paces itself by.
    let req = serenity::http::Request::new(
        serenity::http::Route::ChannelMessages {
            channel_id: channel,
        },
        serenity::http::LightMethod::Post,
    )
    .body(Some(br#"{"content":"hi"}"#.to_vec()));
    let resp = http.request(req).await.unwrap();
    for h in [
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
        "x-ratelimit-reset-after",
        "x-ratelimit-bucket",
    ] {
        assert!(resp.headers().contains_key(h), "missing {h}");
    }
    assert_eq!(resp.headers()["x-ratelimit-remaining"], "49");

    // Going past the bucket is answered 429 by the simulator itself.
    sim.set_bucket_limit(2, Duration::from_secs(10));
    http.get_current_user().await.unwrap();
    http.get_current_user().await.unwrap();
    let (status, _) = discord_error(http.get_current_user().await.unwrap_err());
    assert_eq!(status, 429);
}

/// Reads gateway frames until one with `op` (skipping others).
async fn next_op<S>(ws: &mut S, op: u64) -> Value
where
    S: StreamExt<Item = Result<WsMessage, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let WsMessage::Text(t) = msg {
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["op"] == op {
                return v;
            }
        }
    }
}

#[tokio::test]
async fn gateway_speaks_hello_identify_ready_heartbeat_and_dispatch() {
    let sim = DiscordSim::start().await.unwrap();
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("{}/?v=10&encoding=json", sim.gateway_url()))
            .await
            .unwrap();
    let hello = next_op(&mut ws, 10).await;
    assert!(hello["d"]["heartbeat_interval"].as_u64().unwrap() > 0);
    ws.send(WsMessage::text(json!({"op": 1, "d": null}).to_string()))
        .await
        .unwrap();
    next_op(&mut ws, 11).await;
    ws.send(WsMessage::text(
        json!({"op": 2, "d": {"token": format!("Bot {}", sim.token()), "intents": 33281, "properties": {}}}).to_string(),
    ))
    .await
    .unwrap();
    let ready = next_op(&mut ws, 0).await;
    assert_eq!(ready["t"], "READY");
    assert_eq!(ready["s"], 1);
    let parsed: serenity::model::gateway::Ready =
        serde_json::from_value(ready["d"].clone()).unwrap();
    assert_eq!(parsed.user.id.to_string(), sim.bot_user().id);
    assert_eq!(parsed.application.id.to_string(), sim.application_id());
    sim.wait_identified(WAIT).await.unwrap();
    assert_eq!(sim.gateway_events().iter().filter(|e| e.op == 2).count(), 1);

    let alice = sim.user("alice");
    let ix = sim
        .send_slash(&sim.origin(&alice), &SlashCommand::new("agents"))
        .unwrap();
    let dispatch = next_op(&mut ws, 0).await;
    assert_eq!(
        (dispatch["t"].as_str(), dispatch["s"].as_u64()),
        (Some("INTERACTION_CREATE"), Some(2))
    );
    assert_eq!(dispatch["d"]["id"], ix.id);
    assert_eq!(dispatch["d"]["token"], ix.token);
}

#[tokio::test]
async fn gateway_refuses_bad_tokens_and_disallowed_intents() {
    let sim = DiscordSim::start().await.unwrap();
    for (token, intents, code) in [("wrong", 1, 4004u16), (sim.token(), 1 << 15, 4014)] {
        if code == 4014 {
            sim.allow_message_content(false);
        }
        let (mut ws, _) = tokio_tungstenite::connect_async(sim.gateway_url())
            .await
            .unwrap();
        next_op(&mut ws, 10).await;
        ws.send(WsMessage::text(
            json!({"op": 2, "d": {"token": token, "intents": intents}}).to_string(),
        ))
        .await
        .unwrap();
        let closed = loop {
            match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
                Some(Ok(WsMessage::Close(Some(frame)))) => break u16::from(frame.code),
                Some(Ok(_)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        };
        assert_eq!(closed, code);
    }
}

#[tokio::test]
async fn interactions_deserialize_as_serenity_types() {
    let sim = DiscordSim::start().await.unwrap();
    let http = http(&sim);
    let alice = sim.user("alice");
    let bob = sim.user("bob");
    let origin = sim.origin(&alice);

    // Slash command with a subcommand, a string and a user option.
    let cmd = SlashCommand::new("share").sub(
        "add",
        [Opt::user("user", &bob), Opt::str("projects", "web,api")],
    );
    let p = sim.prepare_slash(&origin, &cmd).unwrap();
    let Interaction::Command(c) = serde_json::from_value(p.json.clone()).unwrap() else {
        panic!("not a command interaction");
    };
    assert_eq!(c.data.name, "share");
    assert_eq!(c.user.id.to_string(), alice.id);
    assert_eq!(c.attachment_size_limit, 10 * 1024 * 1024);
    let opts = c.data.options();
    let ResolvedValue::SubCommand(sub) = &opts[0].value else {
        panic!("no subcommand: {opts:?}")
    };
    assert_eq!(opts[0].name, "add");
    let ResolvedValue::User(user, _) = &sub[0].value else {
        panic!("no user: {sub:?}")
    };
    assert_eq!(user.name, "bob");
    assert!(matches!(sub[1].value, ResolvedValue::String("web,api")));

    // Autocomplete with a focused option.
    let p = sim
        .prepare_autocomplete(
            &origin,
            &SlashCommand::new("task")
                .opt(Opt::str("prompt", "x"))
                .opt(Opt::focused("project", "we")),
        )
        .unwrap();
    let Interaction::Autocomplete(a) = serde_json::from_value(p.json).unwrap() else {
        panic!("not autocomplete")
    };
    assert_eq!(a.data.autocomplete().unwrap().value, "we");

    // A button on a message the bot posted, and a select menu.
    let channel: ChannelId = sim.channel_id().parse().unwrap();
    let msg = http
        .send_message(channel, vec![], &json!({"content": "approve?", "components": [
            {"type": 1, "components": [{"type": 2, "style": 3, "label": "Allow", "custom_id": "ap:t_1:a1:once"}]},
            {"type": 1, "components": [{"type": 3, "custom_id": "q:t_1:a2", "options": [{"label": "A", "value": "a"}]}]},
        ]}))
        .await
        .unwrap();
    let mid = msg.id.to_string();
    // Build without dispatching: there is no gateway session in this test.
    assert!(
        sim.send_button(&origin, &mid, "ap:t_1:a1:once").is_err(),
        "no gateway session"
    );
    let button = sim
        .prepare_component(&origin, &mid, "ap:t_1:a1:once", None)
        .unwrap();
    let Interaction::Component(b) = serde_json::from_value(button.json).unwrap() else {
        panic!("not a component")
    };
    assert_eq!(b.data.custom_id, "ap:t_1:a1:once");
    assert_eq!(b.message.id, msg.id);
    let select = sim
        .prepare_component(&origin, &mid, "q:t_1:a2", Some(&["a"]))
        .unwrap();
    let Interaction::Component(s) = serde_json::from_value(select.json).unwrap() else {
        panic!("not a component")
    };
    assert!(
        matches!(&s.data.kind, serenity::all::ComponentInteractionDataKind::StringSelect { values } if values == &["a"])
    );
    assert!(sim.prepare_component(&origin, &mid, "nope", None).is_err());

    // A modal submit.
    let p = sim
        .prepare_modal_submit(&origin, "deny:t_1:a1", &[("reason", "not on main")])
        .unwrap();
    let Interaction::Modal(m) = serde_json::from_value(p.json).unwrap() else {
        panic!("not a modal")
    };
    assert_eq!(m.data.custom_id, "deny:t_1:a1");
    let serenity::all::ActionRowComponent::InputText(input) = &m.data.components[0].components[0]
    else {
        panic!("not a text input")
    };
    assert_eq!(input.value.as_deref(), Some("not on main"));
}

#[tokio::test]
async fn interaction_callbacks_follow_discords_rules() {
    let sim = DiscordSim::start().await.unwrap();
    let http = http(&sim);
    let alice = sim.user("alice");
    let origin = sim.origin(&alice);

    // Deferred, then the original edited, then a follow-up with a file.
    let p = sim
        .prepare_slash(
            &origin,
            &SlashCommand::new("status").opt(Opt::str("task_id", "t_1")),
        )
        .unwrap();
    let ix = &p.interaction;
    let id = ix.id.parse().unwrap();
    http.create_interaction_response(
        id,
        &ix.token,
        &json!({"type": 5, "data": {"flags": 64}}),
        vec![],
    )
    .await
    .unwrap();
    let state = sim.interaction(&ix.id).unwrap();
    assert_eq!(state.response_type, Some(5));
    let original = sim
        .message(state.original_message.as_deref().unwrap())
        .unwrap();
    assert!(original.is_ephemeral());
    assert_eq!(
        original.flags & 128,
        128,
        "a deferred response shows as loading"
    );
    http.edit_original_interaction_response(&ix.token, &json!({"content": "running"}), vec![])
        .await
        .unwrap();
    let original = sim.message(&original.id).unwrap();
    assert_eq!(
        (original.content.as_str(), original.flags & 128),
        ("running", 0)
    );
    let f = http
        .create_followup_message(
            &ix.token,
            &json!({"content": "log"}),
            vec![CreateAttachment::bytes(vec![0; 10], "log.txt")],
        )
        .await
        .unwrap();
    assert_eq!(f.attachments[0].filename, "log.txt");
    assert_eq!(
        sim.interaction(&ix.id).unwrap().followups,
        vec![f.id.to_string()]
    );
    http.edit_followup_message(&ix.token, f.id, &json!({"content": "log (edited)"}), vec![])
        .await
        .unwrap();
    assert_eq!(
        sim.message(&f.id.to_string()).unwrap().content,
        "log (edited)"
    );

    // A second initial response is refused.
    let err = http
        .create_interaction_response(
            id,
            &ix.token,
            &json!({"type": 4, "data": {"content": "again"}}),
            vec![],
        )
        .await
        .unwrap_err();
    assert_eq!(discord_error(err).1["code"], 40060);

    // Too late: past the deadline the interaction is unknown.
    sim.set_interaction_deadline(Duration::from_millis(50));
    let late = sim
        .prepare_slash(&origin, &SlashCommand::new("agents"))
        .unwrap()
        .interaction;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let err = http
        .create_interaction_response(
            late.id.parse().unwrap(),
            &late.token,
            &json!({"type": 4, "data": {"content": "hi"}}),
            vec![],
        )
        .await
        .unwrap_err();
    assert_eq!(discord_error(err).1["code"], 10062);
    sim.set_interaction_deadline(Duration::from_secs(3));

    // Expired webhook token.
    sim.set_token_ttl(Duration::from_millis(50));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let err = http
        .create_followup_message(&ix.token, &json!({"content": "late"}), vec![])
        .await
        .unwrap_err();
    assert_eq!(discord_error(err).1["code"], 50027);
    sim.set_token_ttl(Duration::from_secs(900));

    // An autocomplete result over 25 choices is refused; a modal is recorded.
    let ac = sim
        .prepare_autocomplete(
            &origin,
            &SlashCommand::new("task").opt(Opt::focused("project", "")),
        )
        .unwrap()
        .interaction;
    let choices: Vec<_> = (0..26)
        .map(|i| json!({"name": format!("p{i}"), "value": format!("p{i}")}))
        .collect();
    let err = http
        .create_interaction_response(
            ac.id.parse().unwrap(),
            &ac.token,
            &json!({"type": 8, "data": {"choices": choices}}),
            vec![],
        )
        .await
        .unwrap_err();
    assert_eq!(discord_error(err).0, 400);
    http.create_interaction_response(
        ac.id.parse().unwrap(),
        &ac.token,
        &json!({"type": 8, "data": {"choices": choices[..25]}}),
        vec![],
    )
    .await
    .unwrap();
    let call = sim.wait_callback(&ac, WAIT).await.unwrap();
    assert_eq!(
        call.status, 400,
        "wait_callback finds the first callback call"
    );
    assert_eq!(sim.interaction(&ac.id).unwrap().response_type, Some(8));

    // Button → update the message (type 7) in place.
    let channel: ChannelId = sim.channel_id().parse().unwrap();
    let msg = http
        .send_message(
            channel,
            vec![],
            &json!({"content": "Allow?", "components": [{"type": 1, "components": [
            {"type": 2, "style": 3, "label": "Allow", "custom_id": "allow"}]}]}),
        )
        .await
        .unwrap();
    let click = sim
        .prepare_component(&origin, &msg.id.to_string(), "allow", None)
        .unwrap()
        .interaction;
    http.create_interaction_response(
        click.id.parse().unwrap(),
        &click.token,
        &json!({"type": 7, "data": {"content": "Allowed", "components": [{"type": 1, "components": [
            {"type": 2, "style": 3, "label": "Allow", "custom_id": "allow", "disabled": true}]}]}}),
        vec![],
    )
    .await
    .unwrap();
    let updated = sim.message(&msg.id.to_string()).unwrap();
    assert_eq!(updated.content, "Allowed");
    assert!(
        sim.prepare_component(&origin, &msg.id.to_string(), "allow", None)
            .is_err(),
        "disabled now"
    );
}

#[tokio::test]
async fn http_interactions_are_signed_like_discord() {
    use axum::http::HeaderMap;
    use ed25519_dalek::{Signature, Verifier as _, VerifyingKey};

    let sim = DiscordSim::start().await.unwrap();
    let key = VerifyingKey::from_bytes(
        &hex::decode(sim.signer().public_key_hex())
            .unwrap()
            .try_into()
            .unwrap(),
    )
    .unwrap();
    // A minimal app endpoint: verify, then answer PING with PONG and commands with a message.
    let app = axum::Router::new().route(
        "/interactions",
        axum::routing::post(
            move |headers: HeaderMap, body: axum::body::Bytes| async move {
                let sig = headers
                    .get("x-signature-ed25519")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                let ts = headers
                    .get("x-signature-timestamp")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                let ok = hex::decode(sig)
                    .ok()
                    .and_then(|b| Signature::from_slice(&b).ok())
                    .is_some_and(|s| key.verify(&[ts.as_bytes(), &body].concat(), &s).is_ok());
                if !ok {
                    return (
                        axum::http::StatusCode::UNAUTHORIZED,
                        "bad signature".to_string(),
                    );
                }
                let v: Value = serde_json::from_slice(&body).unwrap();
                let reply = if v["type"] == 1 {
                    json!({"type": 1})
                } else {
                    json!({"type": 4, "data": {"content": "hi"}})
                };
                (axum::http::StatusCode::OK, reply.to_string())
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/interactions", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let ping = serde_json::to_vec(&sim.ping_json()).unwrap();
    let reply = sim.signer().post(&url, &ping).await.unwrap();
    assert_eq!(
        (reply.status, reply.json().unwrap()),
        (200, json!({"type": 1}))
    );
    // A forged signature (another key) and a missing one are refused.
    let other = ct_testkit::discord::InteractionSigner::generate();
    assert_eq!(other.post(&url, &ping).await.unwrap().status, 401);
    assert_eq!(
        ct_testkit::discord::sign::post(&url, &ping, &[])
            .await
            .unwrap()
            .status,
        401
    );

    let alice = sim.user("alice");
    let p = sim
        .prepare_slash(&sim.origin(&alice), &SlashCommand::new("agents"))
        .unwrap();
    let reply = sim.post_interaction(&url, &p).await.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(
        sim.interaction(&p.interaction.id).unwrap().response_type,
        Some(4)
    );
    server.abort();
}

#[tokio::test]
async fn shutdown_stops_the_servers() {
    let sim = DiscordSim::start().await.unwrap();
    let base = sim.api_base();
    let started = Instant::now();
    sim.shutdown().await;
    assert!(started.elapsed() < WAIT);
    let addr = base.trim_start_matches("http://").to_string();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
