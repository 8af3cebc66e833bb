//! Answering in time: quick work is the initial response; slow work is deferred first and edited in, so
//! even work that outlasts Discord's deadline never misses it (the simulator refuses late callbacks).

use std::time::Duration;

use ct_bot::config::Secret;
use ct_bot::respond::{answer_within, Answer, Delivered};
use ct_bot::Rest;
use ct_testkit::discord::{DiscordSim, SlashCommand};

#[tokio::test]
async fn quick_work_answers_directly_and_slow_work_defers() {
    let sim = DiscordSim::start().await.unwrap();
    let rest = Rest::with_base(
        &sim.api_base(),
        Some(Secret::new(sim.token())),
        Duration::from_secs(5),
    );
    rest.set_application_id(sim.application_id().parse().unwrap());
    let alice = sim.user("alice");
    // A short deadline so the slow case is quick to run; the same logic holds for Discord's 3 s.
    sim.set_interaction_deadline(Duration::from_millis(800));

    let ix = sim
        .prepare_slash(&sim.origin(&alice), &SlashCommand::new("agents"))
        .unwrap()
        .interaction;
    let how = answer_within(
        &rest,
        ix.id.parse().unwrap(),
        &ix.token,
        true,
        Duration::from_millis(300),
        async { Answer::private("laptop: online") },
    )
    .await
    .unwrap();
    assert_eq!(how, Delivered::Immediately);
    let state = sim.interaction(&ix.id).unwrap();
    assert_eq!(state.response_type, Some(4));
    let msg = sim
        .message(state.original_message.as_deref().unwrap())
        .unwrap();
    assert_eq!(msg.content, "laptop: online");
    assert!(msg.is_ephemeral());

    let ix = sim
        .prepare_slash(&sim.origin(&alice), &SlashCommand::new("agents"))
        .unwrap()
        .interaction;
    let how = answer_within(
        &rest,
        ix.id.parse().unwrap(),
        &ix.token,
        false,
        Duration::from_millis(300),
        async {
            // Longer than the whole deadline.
            tokio::time::sleep(Duration::from_millis(1200)).await;
            Answer::text("2 agents")
        },
    )
    .await
    .unwrap();
    assert_eq!(how, Delivered::AfterDefer);
    let callback = sim
        .calls_to("POST", &format!("/interactions/{}/*/callback", ix.id))
        .pop()
        .unwrap();
    assert_eq!(
        (callback.status, callback.body["type"].as_u64()),
        (204, Some(5))
    );
    let state = sim.interaction(&ix.id).unwrap();
    let msg = sim
        .message(state.original_message.as_deref().unwrap())
        .unwrap();
    assert_eq!(
        msg.content, "2 agents",
        "the answer replaced the thinking message"
    );
    assert!(!msg.is_ephemeral());
    assert_eq!(msg.flags & 128, 0, "no longer loading");
}
