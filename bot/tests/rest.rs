//! The bot's REST client against the Discord simulator: 429s are waited out by their `retry_after`,
//! never retried early or in a burst; an empty bucket (`X-RateLimit-Remaining: 0`) is waited out before
//! the next call; waits longer than the call may take fail fast; Discord's errors and uploads come through.

use std::time::Duration;

use ct_bot::config::Secret;
use ct_bot::rest::{RestError, Upload};
use ct_bot::Rest;
use ct_testkit::discord::{DiscordSim, SlashCommand};
use serenity::all::{
    ChannelId, CreateInteractionResponse, CreateInteractionResponseFollowup,
    CreateInteractionResponseMessage, CreateMessage, EditInteractionResponse, EditMessage,
};

const WAIT: Duration = Duration::from_secs(5);

fn rest(sim: &DiscordSim, max_wait: Duration) -> Rest {
    let rest = Rest::with_base(&sim.api_base(), Some(Secret::new(sim.token())), max_wait);
    rest.set_application_id(sim.application_id().parse().unwrap());
    rest
}

fn general(sim: &DiscordSim) -> ChannelId {
    sim.channel_id().parse().unwrap()
}

#[tokio::test]
async fn waits_out_429s_by_retry_after() {
    let sim = DiscordSim::start().await.unwrap();
    let rest = rest(&sim, Duration::from_secs(10));
    sim.rate_limit(
        "POST",
        "/channels/*/messages",
        2,
        Duration::from_millis(400),
    );

    let msg = rest
        .send_message(general(&sim), &CreateMessage::new().content("hello"), &[])
        .await
        .unwrap();
    assert_eq!(msg.content, "hello");

    let calls = sim.calls_to("POST", "/channels/*/messages");
    let statuses: Vec<u16> = calls.iter().map(|c| c.status).collect();
    assert_eq!(
        statuses,
        [429, 429, 200],
        "two refusals, then one success: no burst"
    );
    for pair in calls.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(
            gap >= Duration::from_millis(400),
            "retried after {gap:?}, before retry_after"
        );
    }
    assert_eq!(sim.messages(sim.channel_id()).len(), 1);
}

#[tokio::test]
async fn a_global_limit_holds_back_every_route() {
    let sim = DiscordSim::start().await.unwrap();
    let rest = rest(&sim, Duration::from_secs(10));
    sim.rate_limit_global(
        "POST",
        "/channels/*/messages",
        1,
        Duration::from_millis(600),
    );

    let channel = general(&sim);
    // An impatient caller meets the global 429 and gives up; the limit stays recorded in the shared state.
    let impatient = rest.with_max_wait(Duration::from_millis(100));
    let err = impatient
        .send_message(channel, &CreateMessage::new().content("a"), &[])
        .await
        .unwrap_err();
    assert!(matches!(err, RestError::RateLimited { .. }), "{err}");
    let refused = sim.calls().pop().unwrap();
    assert_eq!(refused.status, 429);
    // Another route, right after: it is held until the global reset too.
    rest.channel(channel).await.unwrap();
    let get = sim.calls().pop().unwrap();
    assert_eq!(get.method, "GET");
    assert!(
        get.at - refused.at >= Duration::from_millis(550),
        "{:?}",
        get.at - refused.at
    );
    assert_eq!(sim.calls().len(), 2);
}

#[tokio::test]
async fn an_empty_bucket_is_waited_out_before_the_next_call() {
    let sim = DiscordSim::start().await.unwrap();
    let rest = rest(&sim, Duration::from_secs(10));
    // 2 per 700 ms: the simulator answers 429 to a third call inside the window.
    sim.set_bucket_limit(2, Duration::from_millis(700));
    let channel = general(&sim);
    let msg = rest
        .send_message(channel, &CreateMessage::new().content("0"), &[])
        .await
        .unwrap();
    for i in 1..=4 {
        rest.edit_message(channel, msg.id, &EditMessage::new().content(i.to_string()))
            .await
            .unwrap();
    }
    let edits = sim.calls_to("PATCH", "/channels/*/messages/*");
    assert_eq!(edits.len(), 4);
    assert!(
        edits.iter().all(|c| c.status == 200),
        "the client paced itself by the headers and never met a 429: {:?}",
        edits.iter().map(|c| c.status).collect::<Vec<_>>()
    );
    assert!(edits[2].at - edits[0].at >= Duration::from_millis(600));
    assert_eq!(sim.message(&msg.id.to_string()).unwrap().content, "4");
}

/// Calls made at once on one route go one at a time, each paced by the answer before it: none meets a 429.
/// (Sent together, they would all read the same `X-RateLimit-Remaining` and overrun the bucket.) Another
/// route does not wait for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_made_at_once_on_one_route_never_overrun_its_bucket() {
    let sim = DiscordSim::start().await.unwrap();
    let rest = rest(&sim, Duration::from_secs(10));
    sim.set_bucket_limit(3, Duration::from_millis(500));
    let channel = general(&sim);
    let calls: Vec<_> = (0..10)
        .map(|i| {
            let rest = rest.clone();
            tokio::spawn(async move {
                rest.send_message(channel, &CreateMessage::new().content(i.to_string()), &[])
                    .await
            })
        })
        .collect();
    // Meanwhile another route is called at once, not after the ten.
    let other = rest.channel(channel).await.unwrap();
    assert!(
        sim.calls_to("POST", "/channels/*/messages").len() < 10,
        "{other:?}"
    );
    for call in calls {
        call.await.unwrap().unwrap();
    }
    let posts = sim.calls_to("POST", "/channels/*/messages");
    assert_eq!(posts.len(), 10);
    assert!(
        posts.iter().all(|c| c.status == 200),
        "no call overran the bucket: {:?}",
        posts.iter().map(|c| c.status).collect::<Vec<_>>()
    );
    // Ten calls at three per window need at least three windows after the first.
    assert!(posts[9].at - posts[0].at >= Duration::from_millis(1400));
}

#[tokio::test]
async fn a_wait_longer_than_allowed_fails_fast() {
    let sim = DiscordSim::start().await.unwrap();
    let rest = rest(&sim, Duration::from_secs(1));
    sim.rate_limit("POST", "/channels/*/messages", 1, Duration::from_secs(30));
    let started = tokio::time::Instant::now();
    let err = rest
        .send_message(general(&sim), &CreateMessage::new().content("x"), &[])
        .await
        .unwrap_err();
    assert!(
        matches!(err, RestError::RateLimited { retry_after, .. } if retry_after == Duration::from_secs(30)),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "did not sleep on a hopeless wait"
    );
    assert_eq!(sim.calls_to("POST", "/channels/*/messages").len(), 1);
}

#[tokio::test]
async fn discord_errors_come_back_with_their_code() {
    let sim = DiscordSim::start().await.unwrap();
    let rest = rest(&sim, WAIT);
    let err = rest
        .send_message(
            general(&sim),
            &CreateMessage::new().content("x".repeat(2001)),
            &[],
        )
        .await
        .unwrap_err();
    match &err {
        RestError::Discord {
            status, code, body, ..
        } => {
            assert_eq!((*status, *code), (400, 50035));
            assert!(body["errors"]["content"].is_object());
        }
        other => panic!("expected a Discord error, got {other}"),
    }
    assert_eq!(err.code(), Some(50035));
    let unknown = rest.channel(ChannelId::new(1)).await.unwrap_err();
    assert_eq!(unknown.code(), Some(10003));
    let no_token = Rest::with_base(&sim.api_base(), None, WAIT);
    assert!(matches!(
        no_token.channel(general(&sim)).await,
        Err(RestError::NoToken(_))
    ));
}

#[tokio::test]
async fn uploads_and_interaction_responses() {
    let sim = DiscordSim::start().await.unwrap();
    let rest = rest(&sim, WAIT);
    let files = [
        Upload {
            filename: "diff.patch".into(),
            data: vec![b'+'; 3000],
        },
        Upload {
            filename: "log.txt".into(),
            data: vec![b'.'; 10],
        },
    ];
    let msg = rest
        .send_message(
            general(&sim),
            &CreateMessage::new().content("📎 two files"),
            &files,
        )
        .await
        .unwrap();
    let names: Vec<(&str, u32)> = msg
        .attachments
        .iter()
        .map(|a| (a.filename.as_str(), a.size))
        .collect();
    assert_eq!(names, [("diff.patch", 3000), ("log.txt", 10)]);
    let call = sim.calls_to("POST", "/channels/*/messages").pop().unwrap();
    assert_eq!(
        call.files
            .iter()
            .map(|f| f.field.as_str())
            .collect::<Vec<_>>(),
        ["files[0]", "files[1]"]
    );
    assert_eq!(call.body["attachments"][1]["filename"], "log.txt");

    // An interaction (built, not dispatched: no gateway here), answered, edited, followed up with a file.
    let alice = sim.user("alice");
    let p = sim
        .prepare_slash(&sim.origin(&alice), &SlashCommand::new("agents"))
        .unwrap();
    let ix = p.interaction;
    let id = ix.id.parse().unwrap();
    rest.respond(
        id,
        &ix.token,
        &CreateInteractionResponse::Defer(CreateInteractionResponseMessage::new().ephemeral(true)),
        &[],
    )
    .await
    .unwrap();
    rest.edit_original(
        &ix.token,
        &EditInteractionResponse::new().content("2 agents"),
        &[],
    )
    .await
    .unwrap();
    let f = rest
        .followup(
            &ix.token,
            &CreateInteractionResponseFollowup::new().content("details"),
            &[Upload {
                filename: "agents.txt".into(),
                data: b"laptop\n".to_vec(),
            }],
        )
        .await
        .unwrap();
    assert_eq!(f.attachments[0].filename, "agents.txt");
    let state = sim.interaction(&ix.id).unwrap();
    assert_eq!(state.response_type, Some(5));
    let original = sim
        .message(state.original_message.as_deref().unwrap())
        .unwrap();
    assert_eq!(original.content, "2 agents");
    assert!(original.is_ephemeral());

    // A thread from the message, with a name cut to Discord's 100 characters.
    let thread = rest
        .start_thread(general(&sim), msg.id, &"n".repeat(150))
        .await
        .unwrap();
    assert_eq!(thread.name.chars().count(), 100);
    assert_eq!(
        sim.threads()[0].parent_id.as_deref(),
        Some(sim.channel_id())
    );
}

#[tokio::test]
async fn an_interaction_callback_never_waits_past_its_deadline() {
    let sim = DiscordSim::start().await.unwrap();
    let rest = rest(&sim, Duration::from_secs(30));
    let alice = sim.user("alice");
    let ix = sim
        .prepare_slash(&sim.origin(&alice), &SlashCommand::new("agents"))
        .unwrap()
        .interaction;
    sim.rate_limit(
        "POST",
        "/interactions/*/*/callback",
        1,
        Duration::from_secs(5),
    );
    let started = tokio::time::Instant::now();
    let err = rest
        .respond(
            ix.id.parse().unwrap(),
            &ix.token,
            &CreateInteractionResponse::Message(
                CreateInteractionResponseMessage::new().content("hi"),
            ),
            &[],
        )
        .await
        .unwrap_err();
    assert!(matches!(err, RestError::RateLimited { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3));

    // A short limit on a callback is waited out and the answer still lands in time.
    let ix = sim
        .prepare_slash(&sim.origin(&alice), &SlashCommand::new("agents"))
        .unwrap()
        .interaction;
    sim.rate_limit(
        "POST",
        "/interactions/*/*/callback",
        1,
        Duration::from_millis(300),
    );
    rest.respond(
        ix.id.parse().unwrap(),
        &ix.token,
        &CreateInteractionResponse::Message(CreateInteractionResponseMessage::new().content("hi")),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(sim.interaction(&ix.id).unwrap().response_type, Some(4));
}
