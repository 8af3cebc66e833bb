//! Discord's documented limits, checked the way Discord checks them: a request over a limit is answered
//! `400` with `{"code": 50035, "message": "Invalid Form Body", "errors": {...}}`, the `errors` tree naming the
//! offending field by path (`embeds.0.title._errors`).
//!
//! The same checks are public so the bot's own tests can validate what it builds (its slash command
//! definitions) against one statement of the rules.

use serde_json::{json, Map, Value};

/// Message `content`, in characters.
pub const CONTENT_MAX: usize = 2000;
pub const EMBEDS_MAX: usize = 10;
pub const EMBED_TITLE_MAX: usize = 256;
pub const EMBED_DESCRIPTION_MAX: usize = 4096;
pub const EMBED_FIELDS_MAX: usize = 25;
pub const EMBED_FIELD_NAME_MAX: usize = 256;
pub const EMBED_FIELD_VALUE_MAX: usize = 1024;
pub const EMBED_FOOTER_MAX: usize = 2048;
pub const EMBED_AUTHOR_MAX: usize = 256;
/// All text of all embeds of one message together.
pub const EMBED_TOTAL_MAX: usize = 6000;
pub const ACTION_ROWS_MAX: usize = 5;
pub const BUTTONS_PER_ROW_MAX: usize = 5;
pub const CUSTOM_ID_MAX: usize = 100;
pub const BUTTON_LABEL_MAX: usize = 80;
pub const SELECT_OPTIONS_MAX: usize = 25;
pub const MODAL_TITLE_MAX: usize = 45;
pub const TEXT_INPUT_LABEL_MAX: usize = 45;
pub const TEXT_INPUT_VALUE_MAX: usize = 4000;
pub const COMMAND_NAME_MAX: usize = 32;
pub const COMMAND_DESCRIPTION_MAX: usize = 100;
pub const COMMAND_OPTIONS_MAX: usize = 25;
pub const CHOICES_MAX: usize = 25;
/// Name, description and every option's and choice's name, description and value of one command together.
pub const COMMAND_TOTAL_MAX: usize = 4000;

/// An error answer in Discord's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct DiscordError {
    pub status: u16,
    pub body: Value,
}

impl DiscordError {
    pub fn new(status: u16, code: u32, message: &str) -> Self {
        Self {
            status,
            body: json!({"message": message, "code": code}),
        }
    }

    /// The error code Discord puts in the body (`50035`, `10062`, ...).
    pub fn code(&self) -> u64 {
        self.body["code"].as_u64().unwrap_or(0)
    }
}

/// Collects field problems into Discord's nested `errors` tree.
#[derive(Debug, Default)]
pub struct FormErrors {
    errors: Map<String, Value>,
    /// Flat `path: message` lines, for test failure messages.
    pub problems: Vec<String>,
}

impl FormErrors {
    pub fn add(&mut self, path: &str, code: &str, message: impl Into<String>) {
        let message = message.into();
        self.problems.push(format!("{path}: {message}"));
        let mut node = &mut self.errors;
        for part in path.split('.') {
            node = node
                .entry(part.to_string())
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .expect("error tree nodes are objects");
        }
        let list = node.entry("_errors").or_insert_with(|| json!([]));
        if let Some(list) = list.as_array_mut() {
            list.push(json!({"code": code, "message": message}));
        }
    }

    pub fn is_empty(&self) -> bool {
        self.problems.is_empty()
    }

    /// `Ok` when nothing was added, else the 400 Discord answers.
    pub fn into_result(self) -> Result<(), DiscordError> {
        if self.is_empty() {
            return Ok(());
        }
        Err(DiscordError {
            status: 400,
            body: json!({"code": 50035, "message": "Invalid Form Body", "errors": self.errors}),
        })
    }

    fn max_len(&mut self, path: &str, v: &Value, max: usize) -> usize {
        let n = v.as_str().map_or(0, |s| s.chars().count());
        if n > max {
            self.add(
                path,
                "BASE_TYPE_MAX_LENGTH",
                format!("Must be {max} or fewer in length."),
            );
        }
        n
    }

    fn len_between(&mut self, path: &str, v: &Value, min: usize, max: usize) -> usize {
        let n = v.as_str().map_or(0, |s| s.chars().count());
        if n < min || n > max {
            self.add(
                path,
                "BASE_TYPE_BAD_LENGTH",
                format!("Must be between {min} and {max} in length."),
            );
        }
        n
    }

    fn max_items(&mut self, path: &str, v: &Value, max: usize) {
        if v.as_array().is_some_and(|a| a.len() > max) {
            self.add(
                path,
                "BASE_TYPE_MAX_LENGTH",
                format!("Must be {max} or fewer in length."),
            );
        }
    }
}

fn items(v: &Value) -> &[Value] {
    v.as_array().map_or(&[], Vec::as_slice)
}

/// Checks a message body (create or edit): content, embeds, components. `files` is how many files came with
/// it; `edit` relaxes the rule that a message may not be empty (an edit may change only one field).
pub fn check_message(body: &Value, files: usize, edit: bool) -> Result<(), DiscordError> {
    let mut e = FormErrors::default();
    e.max_len("content", &body["content"], CONTENT_MAX);
    // A message's nonce is at most 25 characters.
    e.max_len("nonce", &body["nonce"], 25);
    check_embeds(&mut e, &body["embeds"]);
    check_components(&mut e, &body["components"]);
    e.into_result()?;
    let empty = |k: &str| match &body[k] {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    };
    let attachments = !empty("attachments") || files > 0;
    if !edit
        && empty("content")
        && empty("embeds")
        && empty("components")
        && empty("sticker_ids")
        && !attachments
        && body["poll"].is_null()
    {
        return Err(DiscordError::new(
            400,
            50006,
            "Cannot send an empty message",
        ));
    }
    Ok(())
}

fn check_embeds(e: &mut FormErrors, embeds: &Value) {
    e.max_items("embeds", embeds, EMBEDS_MAX);
    let mut total = 0;
    for (i, embed) in items(embeds).iter().enumerate() {
        let p = |f: &str| format!("embeds.{i}.{f}");
        total += e.max_len(&p("title"), &embed["title"], EMBED_TITLE_MAX);
        total += e.max_len(
            &p("description"),
            &embed["description"],
            EMBED_DESCRIPTION_MAX,
        );
        total += e.max_len(
            &p("footer.text"),
            &embed["footer"]["text"],
            EMBED_FOOTER_MAX,
        );
        total += e.max_len(
            &p("author.name"),
            &embed["author"]["name"],
            EMBED_AUTHOR_MAX,
        );
        e.max_items(&p("fields"), &embed["fields"], EMBED_FIELDS_MAX);
        for (j, field) in items(&embed["fields"]).iter().enumerate() {
            total += e.len_between(
                &p(&format!("fields.{j}.name")),
                &field["name"],
                1,
                EMBED_FIELD_NAME_MAX,
            );
            total += e.len_between(
                &p(&format!("fields.{j}.value")),
                &field["value"],
                1,
                EMBED_FIELD_VALUE_MAX,
            );
        }
    }
    if total > EMBED_TOTAL_MAX {
        e.add(
            "embeds",
            "MESSAGE_EMBEDS_TOO_LONG",
            format!("Embed size exceeds maximum size of {EMBED_TOTAL_MAX}"),
        );
    }
}

fn check_components(e: &mut FormErrors, rows: &Value) {
    e.max_items("components", rows, ACTION_ROWS_MAX);
    let mut ids = Vec::new();
    for (i, row) in items(rows).iter().enumerate() {
        let p = format!("components.{i}");
        if row["type"] != 1 {
            e.add(
                &format!("{p}.type"),
                "COMPONENT_LAYOUT_WIDTH_EXCEEDED",
                "Top-level components must be action rows",
            );
            continue;
        }
        let children = items(&row["components"]);
        let selects = children.iter().filter(|c| c["type"] != 2).count();
        if children.is_empty()
            || children.len() > BUTTONS_PER_ROW_MAX
            || (selects > 0 && children.len() > 1)
        {
            e.add(
                &format!("{p}.components"),
                "COMPONENT_LAYOUT_WIDTH_EXCEEDED",
                "An action row holds 1-5 buttons or one select menu",
            );
        }
        for (j, c) in children.iter().enumerate() {
            let cp = format!("{p}.components.{j}");
            let link = c["type"] == 2 && c["style"] == 5;
            if link {
                if c["url"].is_null() {
                    e.add(
                        &format!("{cp}.url"),
                        "BASE_TYPE_REQUIRED",
                        "This field is required",
                    );
                }
            } else if let Some(id) = c["custom_id"].as_str() {
                e.len_between(
                    &format!("{cp}.custom_id"),
                    &c["custom_id"],
                    1,
                    CUSTOM_ID_MAX,
                );
                if ids.contains(&id) {
                    e.add(
                        &format!("{cp}.custom_id"),
                        "COMPONENT_CUSTOM_ID_DUPLICATED",
                        "Component custom id cannot be duplicated",
                    );
                }
                ids.push(id);
            } else {
                e.add(
                    &format!("{cp}.custom_id"),
                    "BASE_TYPE_REQUIRED",
                    "This field is required",
                );
            }
            e.max_len(&format!("{cp}.label"), &c["label"], BUTTON_LABEL_MAX);
            e.max_len(&format!("{cp}.placeholder"), &c["placeholder"], 150);
            e.max_items(&format!("{cp}.options"), &c["options"], SELECT_OPTIONS_MAX);
            for (k, o) in items(&c["options"]).iter().enumerate() {
                e.len_between(&format!("{cp}.options.{k}.label"), &o["label"], 1, 100);
                e.len_between(&format!("{cp}.options.{k}.value"), &o["value"], 1, 100);
                e.max_len(
                    &format!("{cp}.options.{k}.description"),
                    &o["description"],
                    100,
                );
            }
        }
    }
}

/// Checks the `data` of a modal response (callback type 9).
pub fn check_modal(data: &Value) -> Result<(), DiscordError> {
    let mut e = FormErrors::default();
    e.len_between("data.title", &data["title"], 1, MODAL_TITLE_MAX);
    e.len_between("data.custom_id", &data["custom_id"], 1, CUSTOM_ID_MAX);
    let rows = items(&data["components"]);
    if rows.is_empty() || rows.len() > ACTION_ROWS_MAX {
        e.add(
            "data.components",
            "BASE_TYPE_BAD_LENGTH",
            "Must be between 1 and 5 in length.",
        );
    }
    for (i, row) in rows.iter().enumerate() {
        for (j, c) in items(&row["components"]).iter().enumerate() {
            let p = format!("data.components.{i}.components.{j}");
            if c["type"] != 4 {
                e.add(
                    &format!("{p}.type"),
                    "UNION_TYPE_CHOICES",
                    "Modals hold text inputs",
                );
            }
            e.len_between(&format!("{p}.custom_id"), &c["custom_id"], 1, CUSTOM_ID_MAX);
            e.len_between(&format!("{p}.label"), &c["label"], 1, TEXT_INPUT_LABEL_MAX);
            if c["max_length"]
                .as_u64()
                .is_some_and(|m| m as usize > TEXT_INPUT_VALUE_MAX)
            {
                e.add(
                    &format!("{p}.max_length"),
                    "NUMBER_TYPE_MAX",
                    format!("int value should be less than or equal to {TEXT_INPUT_VALUE_MAX}."),
                );
            }
        }
    }
    e.into_result()
}

/// Checks the `data` of an autocomplete result (callback type 8).
pub fn check_autocomplete(data: &Value) -> Result<(), DiscordError> {
    let mut e = FormErrors::default();
    e.max_items("data.choices", &data["choices"], CHOICES_MAX);
    for (i, c) in items(&data["choices"]).iter().enumerate() {
        e.len_between(&format!("data.choices.{i}.name"), &c["name"], 1, 100);
        if c["value"].is_string() {
            e.max_len(&format!("data.choices.{i}.value"), &c["value"], 100);
        }
    }
    e.into_result()
}

/// Checks a whole set of commands as sent to `PUT .../commands` (bulk overwrite).
pub fn check_commands(commands: &Value) -> Result<(), DiscordError> {
    let mut e = FormErrors::default();
    let Some(list) = commands.as_array() else {
        e.add("_root", "MODEL_TYPE_CONVERT", "Expected an array");
        return e.into_result();
    };
    if list.len() > 100 {
        e.add(
            "_root",
            "BASE_TYPE_MAX_LENGTH",
            "Must be 100 or fewer in length.",
        );
    }
    let mut names = Vec::new();
    for (i, cmd) in list.iter().enumerate() {
        check_command_at(&mut e, &i.to_string(), cmd);
        let key = (
            cmd["type"].as_u64().unwrap_or(1),
            cmd["name"].as_str().unwrap_or(""),
        );
        if names.contains(&key) {
            e.add(
                &format!("{i}.name"),
                "APPLICATION_COMMANDS_DUPLICATE_NAME",
                "Application command names must be unique",
            );
        }
        names.push(key);
    }
    e.into_result()
}

/// Checks one command (`POST .../commands`).
pub fn check_command(cmd: &Value) -> Result<(), DiscordError> {
    let mut e = FormErrors::default();
    check_command_at(&mut e, "", cmd);
    e.into_result()
}

fn join(prefix: &str, field: &str) -> String {
    if prefix.is_empty() {
        field.to_string()
    } else {
        format!("{prefix}.{field}")
    }
}

/// A chat-input name: 1-32 characters, letters, digits, `-` and `_`, and lowercase where a letter has a
/// lowercase form.
fn check_name(e: &mut FormErrors, path: &str, v: &Value) -> usize {
    let name = v.as_str().unwrap_or("");
    let n = name.chars().count();
    let ok_chars = name
        .chars()
        .all(|c| (c.is_alphanumeric() || c == '-' || c == '_') && c.to_lowercase().eq([c]));
    if n == 0 || n > COMMAND_NAME_MAX || !ok_chars {
        e.add(
            path,
            "APPLICATION_COMMAND_INVALID_NAME",
            format!("Command name is invalid: {name:?}"),
        );
    }
    n
}

fn check_command_at(e: &mut FormErrors, p: &str, cmd: &Value) {
    let chat_input = cmd["type"].as_u64().unwrap_or(1) == 1;
    let mut total = if chat_input {
        check_name(e, &join(p, "name"), &cmd["name"])
    } else {
        e.len_between(&join(p, "name"), &cmd["name"], 1, COMMAND_NAME_MAX)
    };
    if chat_input {
        total += e.len_between(
            &join(p, "description"),
            &cmd["description"],
            1,
            COMMAND_DESCRIPTION_MAX,
        );
    }
    total += check_options(e, &join(p, "options"), &cmd["options"], 0);
    if total > COMMAND_TOTAL_MAX {
        e.add(
            p,
            "APPLICATION_COMMAND_TOO_LARGE",
            format!("Command exceeds maximum size ({COMMAND_TOTAL_MAX})"),
        );
    }
}

/// Checks one level of options; `depth` 0 is the command's own. Returns the characters they count toward
/// the command's total.
fn check_options(e: &mut FormErrors, p: &str, options: &Value, depth: u8) -> usize {
    let list = items(options);
    e.max_items(p, options, COMMAND_OPTIONS_MAX);
    let mut total = 0;
    let mut names = Vec::new();
    let mut seen_optional = false;
    let subs = list
        .iter()
        .filter(|o| matches!(o["type"].as_u64(), Some(1 | 2)))
        .count();
    if subs > 0 && subs < list.len() {
        e.add(
            p,
            "APPLICATION_COMMAND_OPTIONS_TYPE_INVALID",
            "Subcommands and subcommand groups cannot be mixed with other options",
        );
    }
    for (i, o) in list.iter().enumerate() {
        let op = format!("{p}.{i}");
        let kind = o["type"].as_u64().unwrap_or(0);
        total += check_name(e, &format!("{op}.name"), &o["name"]);
        total += e.len_between(
            &format!("{op}.description"),
            &o["description"],
            1,
            COMMAND_DESCRIPTION_MAX,
        );
        let name = o["name"].as_str().unwrap_or("");
        if names.contains(&name) {
            e.add(
                &format!("{op}.name"),
                "APPLICATION_COMMAND_OPTION_NAME_ALREADY_EXISTS",
                "Option names must be unique",
            );
        }
        names.push(name);
        match kind {
            // A group may hold only subcommands; a subcommand holds only values; neither nests deeper.
            1 | 2 => {
                let allowed = if kind == 2 { depth == 0 } else { depth <= 1 };
                if !allowed {
                    e.add(
                        &format!("{op}.type"),
                        "APPLICATION_COMMAND_OPTIONS_TYPE_INVALID",
                        "Subcommands nest at most: command > group > subcommand",
                    );
                }
                if kind == 2
                    && items(&o["options"])
                        .iter()
                        .any(|c| c["type"].as_u64() != Some(1))
                {
                    e.add(
                        &format!("{op}.options"),
                        "APPLICATION_COMMAND_OPTIONS_TYPE_INVALID",
                        "A subcommand group holds only subcommands",
                    );
                }
                total += check_options(e, &format!("{op}.options"), &o["options"], depth + 1);
            }
            3..=11 => {
                let required = o["required"].as_bool().unwrap_or(false);
                if required && seen_optional {
                    e.add(
                        &format!("{op}.required"),
                        "APPLICATION_COMMAND_OPTIONS_REQUIRED_INVALID",
                        "Required options must be placed before non-required options",
                    );
                }
                seen_optional |= !required;
                let choices = &o["choices"];
                e.max_items(&format!("{op}.choices"), choices, CHOICES_MAX);
                if o["autocomplete"].as_bool() == Some(true) {
                    if !items(choices).is_empty() {
                        e.add(
                            &format!("{op}.autocomplete"),
                            "AUTOCOMPLETE_AND_CHOICES",
                            "Autocomplete cannot be set with choices",
                        );
                    }
                    if !matches!(kind, 3 | 4 | 10) {
                        e.add(
                            &format!("{op}.autocomplete"),
                            "AUTOCOMPLETE_INVALID_TYPE",
                            "Autocomplete is for string, integer and number options",
                        );
                    }
                }
                for (j, c) in items(choices).iter().enumerate() {
                    total += e.len_between(&format!("{op}.choices.{j}.name"), &c["name"], 1, 100);
                    if c["value"].is_string() {
                        total += e.max_len(&format!("{op}.choices.{j}.value"), &c["value"], 100);
                    }
                }
                if kind == 3 {
                    for k in ["min_length", "max_length"] {
                        if o[k].as_u64().is_some_and(|n| n > 6000) {
                            e.add(
                                &format!("{op}.{k}"),
                                "NUMBER_TYPE_MAX",
                                "int value should be less than or equal to 6000.",
                            );
                        }
                    }
                }
                if !items(&o["options"]).is_empty() {
                    e.add(
                        &format!("{op}.options"),
                        "APPLICATION_COMMAND_OPTIONS_TYPE_INVALID",
                        "Only subcommands and groups have options",
                    );
                }
            }
            _ => e.add(
                &format!("{op}.type"),
                "BASE_TYPE_CHOICES",
                format!("Value must be one of 1-11, not {kind}."),
            ),
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_over_2000_chars_is_refused_in_discord_shape() {
        let ok = json!({"content": "é".repeat(2000)});
        assert!(
            check_message(&ok, 0, false).is_ok(),
            "2000 characters (4000 bytes) fit"
        );
        let err = check_message(&json!({"content": "x".repeat(2001)}), 0, false).unwrap_err();
        assert_eq!(err.status, 400);
        assert_eq!(err.code(), 50035);
        assert_eq!(
            err.body["errors"]["content"]["_errors"][0]["code"],
            "BASE_TYPE_MAX_LENGTH"
        );
    }

    #[test]
    fn empty_messages_are_refused_unless_edits_or_files() {
        assert_eq!(
            check_message(&json!({}), 0, false).unwrap_err().code(),
            50006
        );
        assert!(check_message(&json!({}), 1, false).is_ok());
        assert!(check_message(&json!({"content": ""}), 0, true).is_ok());
    }

    #[test]
    fn embed_limits_name_the_field() {
        let long_title = json!({"embeds": [{"title": "t".repeat(257)}]});
        let err = check_message(&long_title, 0, false).unwrap_err();
        assert!(err.body["errors"]["embeds"]["0"]["title"]["_errors"].is_array());
        let total = json!({"embeds": [
            {"description": "d".repeat(4000)}, {"description": "d".repeat(2001)}
        ]});
        let err = check_message(&total, 0, false).unwrap_err();
        assert_eq!(
            err.body["errors"]["embeds"]["_errors"][0]["code"],
            "MESSAGE_EMBEDS_TOO_LONG"
        );
        let empty_field = json!({"embeds": [{"fields": [{"name": "", "value": "v"}]}]});
        assert!(check_message(&empty_field, 0, false).is_err());
    }

    #[test]
    fn component_limits() {
        let button = |id: &str| json!({"type": 2, "style": 1, "label": "x", "custom_id": id});
        let six = json!({"components": [{"type": 1, "components":
            (0..6).map(|i| button(&i.to_string())).collect::<Vec<_>>()}]});
        assert!(check_message(&six, 0, false).is_err());
        let dup = json!({"components": [{"type": 1, "components": [button("a"), button("a")]}]});
        assert!(check_message(&dup, 0, false).is_err());
        let long = json!({"components": [{"type": 1, "components": [button(&"a".repeat(101))]}]});
        assert!(check_message(&long, 0, false).is_err());
        let fine = json!({"components": [{"type": 1, "components": [button("a"), button("b")]}]});
        assert!(check_message(&fine, 0, false).is_ok());
    }

    #[test]
    fn command_rules() {
        let good = json!([{"name": "task", "description": "Start a task", "options": [
            {"type": 3, "name": "prompt", "description": "What to do", "required": true},
            {"type": 3, "name": "project", "description": "Where", "autocomplete": true},
        ]}]);
        assert!(check_commands(&good).is_ok());
        for bad in [
            json!([{"name": "Task", "description": "x"}]),
            json!([{"name": "a b", "description": "x"}]),
            json!([{"name": "x".repeat(33), "description": "x"}]),
            json!([{"name": "t", "description": "d".repeat(101)}]),
            json!([{"name": "t", "description": ""}]),
            json!([{"name": "t", "description": "x", "options": [
                {"type": 3, "name": "a", "description": "x"},
                {"type": 3, "name": "b", "description": "x", "required": true}]}]),
            json!([{"name": "t", "description": "x", "options": [
                {"type": 3, "name": "a", "description": "x", "autocomplete": true,
                 "choices": [{"name": "n", "value": "v"}]}]}]),
            json!([{"name": "t", "description": "x", "options": [
                {"type": 1, "name": "a", "description": "x"},
                {"type": 3, "name": "b", "description": "x"}]}]),
            json!([{"name": "t", "description": "x"}, {"name": "t", "description": "y"}]),
            json!([{"name": "t", "description": "x", "options":
                (0..26).map(|i| json!({"type": 3, "name": format!("o{i}"), "description": "x"}))
                    .collect::<Vec<_>>()}]),
        ] {
            assert!(check_commands(&bad).is_err(), "should be refused: {bad}");
        }
    }

    #[test]
    fn modal_and_autocomplete_rules() {
        let modal = json!({"title": "Deny", "custom_id": "m", "components": [{"type": 1, "components": [
            {"type": 4, "custom_id": "reason", "label": "Why", "style": 2}]}]});
        assert!(check_modal(&modal).is_ok());
        let mut long = modal.clone();
        long["title"] = json!("t".repeat(46));
        assert!(check_modal(&long).is_err());
        let choices: Vec<_> = (0..26)
            .map(|i| json!({"name": i.to_string(), "value": "v"}))
            .collect();
        assert!(check_autocomplete(&json!({"choices": choices})).is_err());
        assert!(check_autocomplete(&json!({"choices": choices[..25]})).is_ok());
    }
}
