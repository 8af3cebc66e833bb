//! Nobody is pinged by accident: every message the bot posts or edits says whom it may mention.
//!
//! Prompts, Claude's output, tool summaries and file names all reach Discord as message text, and any of them
//! can contain `@everyone`, `@here`, a role mention or a user mention. Discord pings whatever a message
//! mentions unless the message carries `allowed_mentions`, so the REST client adds "nobody"
//! (`{"parse": []}`) to every message body that does not already say whom it means (a reply that pings its
//! author on purpose sets its own). Doing it here, on the way out, covers messages nobody thought of.

use serde_json::{json, Value};

/// Interaction response types whose `data` is a message: CHANNEL_MESSAGE_WITH_SOURCE and UPDATE_MESSAGE.
const MESSAGE_RESPONSES: [u64; 2] = [4, 7];

/// Whether a REST path creates or edits a message (channel messages, interaction webhooks).
pub fn carries_message(path: &str) -> bool {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    matches!(
        parts.as_slice(),
        ["channels", _, "messages"]
            | ["channels", _, "messages", _]
            | ["webhooks", _, _]
            | ["webhooks", _, _, "messages", _]
    )
}

/// Adds `allowed_mentions: {"parse": []}` to a message body that does not set its own.
pub fn quiet_message(body: &mut Value) {
    if let Some(message) = body.as_object_mut() {
        let unset = message.get("allowed_mentions").is_none_or(Value::is_null);
        if unset {
            message.insert("allowed_mentions".into(), json!({ "parse": [] }));
        }
    }
}

/// [`quiet_message`] for the message inside an interaction response, when it has one.
pub fn quiet_response(body: &mut Value) {
    let is_message = body["type"]
        .as_u64()
        .is_some_and(|t| MESSAGE_RESPONSES.contains(&t));
    if is_message {
        if body.get("data").is_none_or(Value::is_null) {
            body["data"] = json!({});
        }
        quiet_message(&mut body["data"]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_without_allowed_mentions_pings_nobody_and_an_explicit_choice_is_kept() {
        let mut plain = json!({"content": "@everyone look"});
        quiet_message(&mut plain);
        assert_eq!(plain["allowed_mentions"], json!({"parse": []}));
        let mut chosen =
            json!({"content": "<@1>", "allowed_mentions": {"parse": [], "users": ["1"]}});
        quiet_message(&mut chosen);
        assert_eq!(chosen["allowed_mentions"]["users"], json!(["1"]));
    }

    #[test]
    fn only_message_responses_get_it() {
        let mut message = json!({"type": 4, "data": {"content": "@here"}});
        quiet_response(&mut message);
        assert_eq!(message["data"]["allowed_mentions"], json!({"parse": []}));
        let mut modal = json!({"type": 9, "data": {"custom_id": "x"}});
        quiet_response(&mut modal);
        assert!(modal["data"].get("allowed_mentions").is_none());
        assert!(carries_message("/channels/1/messages/2"));
        assert!(carries_message("/webhooks/1/tok/messages/@original"));
        assert!(!carries_message("/channels/1/messages/2/threads"));
        assert!(!carries_message("/applications/1/commands"));
    }
}
