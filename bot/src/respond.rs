//! Answering an interaction without ever missing Discord's 3-second deadline for the initial response.
//!
//! [`answer_in_time`] runs the work that produces the answer; if it finishes quickly the answer is the
//! initial response itself, and if not, a deferred response ("thinking…") goes out first and the answer
//! replaces it when ready (the interaction token allows that for 15 minutes). Command handlers can then be
//! written as plain async functions returning an [`Answer`] (or, with [`deliver`], any [`Initial`]
//! response, in gateway or HTTP-interactions mode alike).

use std::future::Future;
use std::time::Duration;

use serde_json::Value;
use serenity::all::{
    AutocompleteChoice, CreateActionRow, CreateAutocompleteResponse, CreateEmbed,
    CreateInteractionResponse, CreateInteractionResponseMessage, CreateModal,
    EditInteractionResponse, InteractionId,
};
use tokio::sync::oneshot;

use crate::rest::{Rest, RestError};

/// How long the work may take before the interaction is deferred: well inside 3 s, leaving room for the
/// callback's own round trip (and a short rate-limit wait).
pub const DEFER_AFTER: Duration = Duration::from_millis(1500);

/// A message answering an interaction.
#[derive(Debug, Clone, Default)]
pub struct Answer {
    pub content: String,
    pub embeds: Vec<CreateEmbed>,
    pub components: Vec<CreateActionRow>,
    /// Only the person who used the command sees it (errors, pairing codes).
    pub ephemeral: bool,
}

impl Answer {
    /// A visible text answer.
    pub fn text(content: impl Into<String>) -> Self {
        Self {
            content: content.into(),
            ..Self::default()
        }
    }

    /// A text only the person who asked sees: how every error a user can cause is answered.
    pub fn private(content: impl Into<String>) -> Self {
        Self {
            content: content.into(),
            ephemeral: true,
            ..Self::default()
        }
    }

    fn message(&self) -> CreateInteractionResponseMessage {
        CreateInteractionResponseMessage::new()
            .content(&self.content)
            .embeds(self.embeds.clone())
            .components(self.components.clone())
            .ephemeral(self.ephemeral)
    }

    fn edit(&self) -> EditInteractionResponse {
        EditInteractionResponse::new()
            .content(&self.content)
            .embeds(self.embeds.clone())
            .components(self.components.clone())
    }
}

/// How the answer went out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// As the initial response.
    Immediately,
    /// Deferred first, then edited in.
    AfterDefer,
}

/// Answers interaction `id` with the result of `work`, deferring first if `work` takes longer than
/// [`DEFER_AFTER`]. `ephemeral_if_deferred` decides whether the "thinking…" message (and so the answer
/// that replaces it) is private: Discord fixes that at the defer, before the answer is known.
pub async fn answer_in_time(
    rest: &Rest,
    id: InteractionId,
    token: &str,
    ephemeral_if_deferred: bool,
    work: impl Future<Output = Answer>,
) -> Result<Delivered, RestError> {
    answer_within(rest, id, token, ephemeral_if_deferred, DEFER_AFTER, work).await
}

/// [`answer_in_time`] with another defer threshold.
pub async fn answer_within(
    rest: &Rest,
    id: InteractionId,
    token: &str,
    ephemeral_if_deferred: bool,
    defer_after: Duration,
    work: impl Future<Output = Answer>,
) -> Result<Delivered, RestError> {
    tokio::pin!(work);
    if let Ok(answer) = tokio::time::timeout(defer_after, &mut work).await {
        let response = CreateInteractionResponse::Message(answer.message());
        rest.respond(id, token, &response, &[]).await?;
        return Ok(Delivered::Immediately);
    }
    let defer = CreateInteractionResponse::Defer(
        CreateInteractionResponseMessage::new().ephemeral(ephemeral_if_deferred),
    );
    rest.respond(id, token, &defer, &[]).await?;
    let answer = work.await;
    rest.edit_original(token, &answer.edit(), &[]).await?;
    Ok(Delivered::AfterDefer)
}

/// Any initial response, not only a message: what the bot's handlers produce.
#[derive(Debug, Clone)]
pub enum Initial {
    Message(Answer),
    /// A form (deny reason, free-text answer); only valid as the initial response.
    Modal(CreateModal),
    /// A click taken note of with no message of its own (the message it was on is edited later).
    Acknowledge,
    /// Autocomplete suggestions (never deferred: Discord has no defer for them).
    Choices(Vec<AutocompleteChoice>),
}

impl Initial {
    fn response(&self) -> CreateInteractionResponse {
        match self {
            Self::Message(a) => CreateInteractionResponse::Message(a.message()),
            Self::Modal(m) => CreateInteractionResponse::Modal(m.clone()),
            Self::Acknowledge => CreateInteractionResponse::Acknowledge,
            Self::Choices(c) => CreateInteractionResponse::Autocomplete(
                CreateAutocompleteResponse::new().set_choices(c.clone()),
            ),
        }
    }
}

/// Where an interaction's initial response goes: gateway interactions are answered by a callback POST;
/// HTTP interactions by the body of the response to Discord's own POST, which the relay's HTTP handler
/// waits for on the other end of the channel.
#[derive(Debug)]
pub enum Responder {
    Rest { id: InteractionId },
    Http(oneshot::Sender<Value>),
}

impl Responder {
    async fn send(
        self,
        rest: &Rest,
        token: &str,
        response: &CreateInteractionResponse,
    ) -> Result<(), RestError> {
        match self {
            Self::Rest { id } => rest.respond(id, token, response, &[]).await,
            Self::Http(tx) => {
                let mut body =
                    serde_json::to_value(response).map_err(|source| RestError::Encode {
                        method: reqwest::Method::POST,
                        path: "/discord/interactions".into(),
                        source,
                    })?;
                crate::mentions::quiet_response(&mut body);
                // The HTTP handler gave up waiting (past Discord's deadline): nothing else can be done.
                let _ = tx.send(body);
                Ok(())
            }
        }
    }
}

/// Like [`answer_in_time`] for any [`Initial`] and either delivery: the work's result is the initial
/// response if it is ready within [`DEFER_AFTER`], else the interaction is deferred and the result edited
/// into the deferred message. A modal or acknowledgement that comes too late for that is turned into a
/// message (a modal can only open as the initial response), so the user is never left with "thinking…".
pub async fn deliver(
    rest: &Rest,
    responder: Responder,
    token: &str,
    ephemeral_if_deferred: bool,
    work: impl Future<Output = Initial>,
) -> Result<Delivered, RestError> {
    tokio::pin!(work);
    if let Ok(initial) = tokio::time::timeout(DEFER_AFTER, &mut work).await {
        responder.send(rest, token, &initial.response()).await?;
        return Ok(Delivered::Immediately);
    }
    let defer = CreateInteractionResponse::Defer(
        CreateInteractionResponseMessage::new().ephemeral(ephemeral_if_deferred),
    );
    responder.send(rest, token, &defer).await?;
    let answer = match work.await {
        Initial::Message(a) => a,
        Initial::Modal(_) => Answer::private("That took too long to open a form: click again."),
        Initial::Acknowledge | Initial::Choices(_) => Answer::private("Done."),
    };
    rest.edit_original(token, &answer.edit(), &[]).await?;
    Ok(Delivered::AfterDefer)
}
