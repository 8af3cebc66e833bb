//! The slash commands, as users see them in Discord's command picker, and their registration.
//!
//! Names follow what users of earlier tools know (`/task`, `/status`, `/cancel`, `/approve`, `/project`,
//! `/register`, `/share`, `/agents`, `/cc`). Options that name something the user has (a project, an agent, a
//! task, a model) use autocomplete rather than fixed choices, since the lists are per user; see
//! [`completion_for`]. Commands are guild-only: tasks live in guild threads.

use serenity::all::{
    CommandOptionType, CreateCommand, CreateCommandOption, GuildId, InteractionContext,
};

use crate::rest::{Rest, RestError};

/// What an autocompleted option lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// The user's projects (and those shared with them).
    Project,
    /// The user's agents (and those shared with them).
    Agent,
    /// The user's recent and running tasks.
    Task,
    /// Claude model names.
    Model,
}

/// Discord allows 6,000 characters in a string option; a longer prompt belongs in a file.
const PROMPT_MAX: u16 = 6000;

fn string(name: &str, description: &str) -> CreateCommandOption {
    CreateCommandOption::new(CommandOptionType::String, name, description)
}

fn named(name: &str, description: &str) -> CreateCommandOption {
    string(name, description).set_autocomplete(true)
}

/// Longest agent name or fingerprint typed in an option: fingerprints are 64 characters and names shorter;
/// more could only be a mistake, and would not fit the `/tasks` buttons' custom ids.
const AGENT_MAX: u16 = 100;

/// An option naming an agent.
fn agent_named(name: &str, description: &str) -> CreateCommandOption {
    named(name, description).max_length(AGENT_MAX)
}

fn agent(description: &str) -> CreateCommandOption {
    agent_named("agent", description)
}

fn sub(name: &str, description: &str, options: Vec<CreateCommandOption>) -> CreateCommandOption {
    options.into_iter().fold(
        CreateCommandOption::new(CommandOptionType::SubCommand, name, description),
        CreateCommandOption::add_sub_option,
    )
}

fn command(name: &str, description: &str, options: Vec<CreateCommandOption>) -> CreateCommand {
    CreateCommand::new(name)
        .description(description)
        .set_options(options)
        .contexts(vec![InteractionContext::Guild])
}

fn task_id() -> CreateCommandOption {
    named("task_id", "The task (defaults to this thread's task)")
}

/// Every command the bot registers.
pub fn all() -> Vec<CreateCommand> {
    vec![
        command(
            "register",
            "Pair your computer's agent with CodeTogether",
            vec![
                sub(
                    "pair",
                    "Get a one-time pairing code and the command to run",
                    vec![],
                ),
                sub(
                    "status",
                    "Your agents: online or last seen, fingerprints",
                    vec![],
                ),
                sub(
                    "unregister",
                    "Remove one of your agents",
                    vec![agent( "The agent to remove").required(true)],
                ),
                sub(
                    "mode",
                    "Run your tasks on your own machines (local) or on the operator's worker pool (cluster)",
                    vec![
                        string("mode", "Where your tasks run")
                            .required(true)
                            .add_string_choice("local: my own agents", "local")
                            .add_string_choice("cluster: a worker pool", "cluster"),
                        string("pool", "Which pool (leave out when there is one you may use)")
                            .max_length(64),
                    ],
                ),
            ],
        ),
        command(
            "project",
            "Folders on your agent that tasks can work in",
            vec![
                sub(
                    "add",
                    "Name a folder on your agent as a project",
                    vec![
                        string("name", "A short name, e.g. web")
                            .required(true)
                            .max_length(32),
                        string(
                            "path",
                            "The folder on that machine, e.g. ~/src/web (on a pool: a git URL to clone, or nothing)",
                        )
                        .max_length(1024),
                        agent( "Which of your agents (if you have several)"),
                    ],
                ),
                sub("list", "Your projects and the ones shared with you", vec![]),
                sub(
                    "remove",
                    "Forget a project (the folder is untouched)",
                    vec![
                        named("name", "The project (agent/project where several agents have one)")
                            .required(true),
                        agent( "Which of your agents (where several have this project)"),
                    ],
                ),
            ],
        ),
        command(
            "task",
            "Start a Claude Code session in a new thread",
            vec![
                string("prompt", "What Claude should do")
                    .required(true)
                    .max_length(PROMPT_MAX),
                named(
                    "project",
                    "Where to work (defaults to your only or default project)",
                ),
                CreateCommandOption::new(
                    CommandOptionType::User,
                    "target",
                    "Run on this person's agent (they must have shared it with you)",
                ),
                agent( "Which agent (if there are several)"),
                named("model", "Claude model, e.g. sonnet or opus"),
                string("mode", "How Claude may act without asking")
                    .add_string_choice("Ask before acting (default)", "default")
                    .add_string_choice("Accept file edits", "acceptEdits")
                    .add_string_choice("Plan only, change nothing", "plan"),
                string("isolation", "Where the task edits files")
                    .add_string_choice("A git worktree and branch of its own", "worktree")
                    .add_string_choice("The project's own folder", "shared"),
                CreateCommandOption::new(
                    CommandOptionType::Boolean,
                    "private",
                    "Only you and the agent's owner see the thread (always, where the server says so)",
                ),
                CreateCommandOption::new(
                    CommandOptionType::Attachment,
                    "file",
                    "A file for Claude to read: a log, a screenshot, a spec (more: attach them in the thread)",
                ),
            ],
        ),
        command(
            "reply",
            "Continue this thread's Claude session",
            vec![string("prompt", "What to say to Claude")
                .required(true)
                .max_length(PROMPT_MAX)],
        ),
        command(
            "status",
            "Where a task stands, and its whole output",
            vec![task_id()],
        ),
        command(
            "tasks",
            "Your recent tasks and those others ran on your agents",
            vec![
                agent( "Only tasks on this agent"),
                string("state", "Only tasks in this state")
                    .add_string_choice("Running or waiting", "open")
                    .add_string_choice("Done", "done")
                    .add_string_choice("Failed", "failed")
                    .add_string_choice("Cancelled", "cancelled")
                    .add_string_choice("Lost", "lost"),
            ],
        ),
        command("cancel", "Stop a task", vec![task_id()]),
        command(
            "approve",
            "Answer a pending approval (the buttons do the same)",
            vec![
                string("option", "Your answer")
                    .required(true)
                    .add_string_choice("Allow once", "once")
                    .add_string_choice("Allow this exact use for the session", "session")
                    .add_string_choice("Deny", "deny"),
                task_id(),
            ],
        ),
        // An option rather than subcommands: `/agents` alone keeps listing, as it always has (a command with
        // subcommands cannot be used bare), and `/agents default:NAME` reads as the subcommand would.
        command(
            "agents",
            "Agents you can use, yours and shared, online or not",
            vec![agent_named(
                "default",
                "Make this agent of yours the default for tasks that name none",
            )],
        ),
        command(
            "share",
            "Let others run tasks on your agent",
            vec![
                sub(
                    "add",
                    "Share your agent with someone",
                    vec![
                        CreateCommandOption::new(CommandOptionType::User, "user", "Who")
                            .required(true),
                        named(
                            "projects",
                            "Only these projects, comma-separated (default: all)",
                        ),
                        string("level", "What they may do without you")
                            .add_string_choice("Run tasks; approvals come to me (default)", "run")
                            .add_string_choice(
                                "Trusted: they answer their own approvals",
                                "trusted",
                            ),
                    ],
                ),
                sub(
                    "remove",
                    "Stop sharing with someone (takes effect at once)",
                    vec![
                        CreateCommandOption::new(CommandOptionType::User, "user", "Who")
                            .required(true),
                    ],
                ),
                sub("list", "Who you share with", vec![]),
                sub("available", "Agents others have shared with you", vec![]),
            ],
        ),
        command(
            "cc",
            "Control this thread's Claude Code session",
            vec![
                sub("clear", "Start the conversation afresh", vec![]),
                sub(
                    "compact",
                    "Summarise the conversation to free context",
                    vec![],
                ),
                sub(
                    "model",
                    "Switch model for the next turns",
                    vec![named("name", "Model, e.g. sonnet or opus").required(true)],
                ),
                sub("status", "Session, model, turns and cost so far", vec![]),
                sub("stop", "Interrupt what Claude is doing", vec![]),
            ],
        ),
        command("audit", "Recent tasks and approvals on your agents", vec![]),
        command(
            "mentions",
            "Whether I @mention you when an approval waits for you or your task ends",
            vec![string("set", "Turn them on or off (leave out to see how they are)")
                .add_string_choice("On", "on")
                .add_string_choice("Off", "off")],
        ),
        command(
            "usage",
            "What your tasks on the worker pool spent, and what is left of your budget",
            vec![],
        ),
        command(
            "dashboard",
            "A one-time link that signs you in to the web dashboard (only you see it)",
            vec![string(
                "signout",
                "End your dashboard sessions instead (every browser signed in as you)",
            )
            .add_string_choice("Sign out everywhere", "all")],
        ),
    ]
}

/// What the focused option of an autocomplete lists: `command` is the top-level name, `sub` the subcommand
/// (if any), `option` the focused option's name.
pub fn completion_for(command: &str, sub: Option<&str>, option: &str) -> Option<Completion> {
    match (command, sub, option) {
        (_, _, "project" | "projects") => Some(Completion::Project),
        ("project", Some("remove"), "name") => Some(Completion::Project),
        (_, _, "agent") | ("agents", None, "default") => Some(Completion::Agent),
        (_, _, "task_id") => Some(Completion::Task),
        (_, _, "model") | ("cc", Some("model"), "name") => Some(Completion::Model),
        _ => None,
    }
}

/// Registers [`all`] in `guild` (visible at once) or globally (Discord may take up to an hour).
pub async fn register(rest: &Rest, guild: Option<GuildId>) -> Result<usize, RestError> {
    let registered = rest.register_commands(guild, &all()).await?;
    tracing::info!(count = registered.len(), guild = ?guild, "slash commands registered");
    Ok(registered.len())
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    fn json() -> Value {
        serde_json::to_value(all()).unwrap()
    }

    #[test]
    fn every_command_obeys_discords_rules() {
        if let Err(e) = ct_testkit::discord::limits::check_commands(&json()) {
            panic!("Discord would refuse the commands: {}", e.body);
        }
    }

    #[test]
    fn the_command_list_is_complete() {
        let names: Vec<String> = json()
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            names,
            [
                "register",
                "project",
                "task",
                "reply",
                "status",
                "tasks",
                "cancel",
                "approve",
                "agents",
                "share",
                "cc",
                "audit",
                "mentions",
                "usage",
                "dashboard"
            ]
        );
        let subs = |cmd: &str| -> Vec<String> {
            json()
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == cmd)
                .unwrap()["options"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|o| o["type"] == 1)
                .map(|o| o["name"].as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(subs("register"), ["pair", "status", "unregister", "mode"]);
        assert_eq!(subs("project"), ["add", "list", "remove"]);
        assert_eq!(subs("share"), ["add", "remove", "list", "available"]);
        assert_eq!(subs("cc"), ["clear", "compact", "model", "status", "stop"]);
    }

    /// Walks all options (with their command and subcommand) and checks that every option naming a
    /// project, agent, task or model autocompletes, and that the autocomplete table knows it.
    #[test]
    fn names_autocomplete() {
        fn walk(
            cmd: &str,
            sub: Option<&str>,
            opts: &Value,
            found: &mut Vec<(String, Option<String>, String, bool)>,
        ) {
            for o in opts.as_array().into_iter().flatten() {
                let name = o["name"].as_str().unwrap();
                if o["type"] == 1 {
                    walk(cmd, Some(name), &o["options"], found);
                } else {
                    found.push((
                        cmd.into(),
                        sub.map(Into::into),
                        name.into(),
                        o["autocomplete"] == true,
                    ));
                }
            }
        }
        let mut found = Vec::new();
        for c in json().as_array().unwrap() {
            walk(c["name"].as_str().unwrap(), None, &c["options"], &mut found);
        }
        let mut autocompleted = 0;
        for (cmd, sub, opt, auto) in &found {
            let completion = completion_for(cmd, sub.as_deref(), opt);
            assert_eq!(
                completion.is_some(),
                *auto,
                "/{cmd} {sub:?} {opt}: autocomplete {auto} but table says {completion:?}"
            );
            autocompleted += usize::from(*auto);
        }
        assert!(autocompleted >= 9, "{found:?}");
    }

    #[test]
    fn commands_are_guild_only() {
        for c in json().as_array().unwrap() {
            assert_eq!(c["contexts"], serde_json::json!([0]), "{}", c["name"]);
        }
    }
}
