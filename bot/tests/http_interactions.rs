//! HTTP-interactions mode over real HTTP: the simulator signs interactions with the application key and
//! POSTs them to an endpoint that checks them with `ct_bot::verify` (as the relay's will): PING gets PONG,
//! a slash command gets its answer as the HTTP response, and forged, missing or tampered signatures get 401.

use std::time::SystemTime;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use ct_bot::config::{BotConfig, Delivery};
use ct_bot::verify::{pong, Incoming, InteractionVerifier};
use ct_testkit::discord::{sign, DiscordSim, InteractionSigner, Opt, SlashCommand};
use serde_json::json;
use serenity::all::Interaction;

/// The endpoint: verify, then PONG or a message naming the command and its first option.
async fn endpoint(
    verifier: InteractionVerifier,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    match verifier.check(&headers, &body, SystemTime::now()) {
        Err(e) => (StatusCode::from_u16(e.status()).unwrap(), e.to_string()),
        Ok(Incoming::Ping) => (StatusCode::OK, pong().to_string()),
        Ok(Incoming::Interaction(i)) => {
            let Interaction::Command(c) = *i else {
                return (StatusCode::OK, json!({"type": 6}).to_string());
            };
            let first = c
                .data
                .options()
                .first()
                .map(|o| o.name.to_string())
                .unwrap_or_default();
            let reply = json!({"type": 4, "data": {"content": format!("/{} {first}", c.data.name), "flags": 64}});
            (StatusCode::OK, reply.to_string())
        }
    }
}

#[tokio::test]
async fn signed_interactions_are_verified_and_answered() {
    let sim = DiscordSim::start().await.unwrap();
    // The configuration the relay would read for this application.
    let config = BotConfig::from_lookup(|k| match k {
        "DISCORD_PUBLIC_KEY" => Some(sim.signer().public_key_hex()),
        "DISCORD_APPLICATION_ID" => Some(sim.application_id().to_string()),
        _ => None,
    })
    .unwrap()
    .unwrap();
    let Delivery::Http { public_key } = &config.delivery else {
        panic!("HTTP mode expected")
    };
    let verifier = InteractionVerifier::from_hex(public_key).unwrap();

    let app = axum::Router::new().route(
        "/discord/interactions",
        axum::routing::post(move |h: HeaderMap, b: Bytes| endpoint(verifier.clone(), h, b)),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/discord/interactions",
        listener.local_addr().unwrap()
    );
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let ping = serde_json::to_vec(&sim.ping_json()).unwrap();
    let reply = sim.signer().post(&url, &ping).await.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json().unwrap(), json!({"type": 1}));

    let alice = sim.user("alice");
    let p = sim
        .prepare_slash(
            &sim.origin(&alice),
            &SlashCommand::new("register").sub("pair", []),
        )
        .unwrap();
    let reply = sim.post_interaction(&url, &p).await.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json().unwrap()["data"]["content"], "/register pair");
    assert_eq!(
        sim.interaction(&p.interaction.id).unwrap().response_type,
        Some(4)
    );

    // Signed by someone else, not signed, or changed after signing: 401, as Discord requires.
    let body = serde_json::to_vec(&p.json).unwrap();
    let forged = InteractionSigner::generate();
    assert_eq!(forged.post(&url, &body).await.unwrap().status, 401);
    assert_eq!(sign::post(&url, &body, &[]).await.unwrap().status, 401);
    let mut headers = sim.signer().headers(&body);
    let tampered = serde_json::to_vec(
        &sim.prepare_slash(
            &sim.origin(&alice),
            &SlashCommand::new("task").opt(Opt::str("prompt", "rm -rf /")),
        )
        .unwrap()
        .json,
    )
    .unwrap();
    assert_eq!(
        sign::post(&url, &tampered, &headers).await.unwrap().status,
        401
    );
    // A replayed request from long ago.
    headers[1].1 = "1600000000".into();
    headers[0].1 = sim.signer().sign("1600000000", &body);
    assert_eq!(sign::post(&url, &body, &headers).await.unwrap().status, 401);

    server.abort();
}
