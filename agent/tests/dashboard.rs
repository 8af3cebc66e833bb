//! Issue 18 end to end, in a real browser: a person types `/dashboard` in Discord (the simulator), opens the
//! link in headless Chromium, sees their agent online, starts tasks from the page and watches them live, allows
//! one write (the file appears), denies another (it does not, and Claude hears why), cancels a third. A second
//! person signed in beside them cannot see or touch the first one's tasks; a spent link and a request without
//! the CSRF token are refused; `/dashboard signout:all` ends the sessions. The real relay, agent and Claude
//! Code CLI on the scripted Messages API.

use ct_testkit::discord::{Opt, SimUser, SlashCommand};
use ct_testkit::{Browser, DiscordSim, Reply};
use serde_json::{json, Value};

use crate::discord::{add_project, private, world, write, T};
use crate::support::TestAgent;

/// `/dashboard` as `user`: the link in the private answer.
async fn dashboard_link(sim: &DiscordSim, user: &SimUser) -> String {
    let ix = sim
        .send_slash(&sim.origin(user), &SlashCommand::new("dashboard"))
        .unwrap();
    let said = private(sim, &ix).await;
    let start = said.find("](").expect("a link") + 2;
    let end = said[start..].find(')').unwrap() + start;
    let url = said[start..end].to_string();
    assert!(
        url.starts_with("https://127.0.0.1:") && url.contains("/dashboard/signin#t="),
        "{said}"
    );
    url
}

/// A browser signed in through `link`, on the agents page.
async fn signed_in(link: &str) -> Browser {
    let browser = Browser::start()
        .await
        .expect("Chromium (scripts/test installs it)");
    browser.goto(link).await.unwrap();
    browser.wait_for("#me-user").await.unwrap();
    let url = browser.current_url().await.unwrap();
    assert!(
        url.contains("/dashboard/") && !url.contains("t="),
        "no secret left in the address after signing in: {url}"
    );
    browser
}

/// Starts a task from the New task page; returns its id once the page shows it.
async fn start_from_page(browser: &Browser, base: &str, prompt: &str) -> String {
    browser
        .goto(&format!("{base}/dashboard/#/new"))
        .await
        .unwrap();
    browser
        .wait_for("#new-project option")
        .await
        .expect("the project list");
    browser.fill("#new-prompt", prompt).await.unwrap();
    browser.select("#new-mode", "default").await.unwrap();
    browser.click("#new-submit").await.unwrap();
    let id = browser
        .wait_for_js(
            "const m = location.hash.match(/^#\\/task\\/(t_[A-Za-z0-9_-]+)/); return m && m[1];",
            vec![],
        )
        .await
        .expect("the page moves to the new task");
    id.as_str().unwrap().to_string()
}

/// The open approval card on the task page, waited for; its id.
async fn open_approval(browser: &Browser) -> String {
    browser
        .wait_for(".approval.open button.allow-once")
        .await
        .expect("an approval on the page");
    browser
        .eval(
            "return document.querySelector('.approval.open').dataset.approval;",
            vec![],
        )
        .await
        .unwrap()
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_signs_in_from_discord_and_drives_tasks_from_the_dashboard() {
    let w = world().await;
    let (alice, bob) = (w.sim.user("alice"), w.sim.user("bob"));
    crate::support::pair(&w.relay, w.agent_dir.path(), &alice.id).await;
    let mut agent = TestAgent::start_with(w.run_options());
    agent.connected(T).await;
    add_project(&w.sim, &alice, &w.project).await;
    let base = format!("https://{}", w.relay.addr);

    // Signing in: the link from Discord sets an HttpOnly, Secure, SameSite cookie, and the agent is online.
    let link = dashboard_link(&w.sim, &alice).await;
    let page = signed_in(&link).await;
    assert_eq!(page.text("#me-user").await.unwrap(), alice.id);
    let cookie = page
        .cookie("__Host-ct_session")
        .await
        .unwrap()
        .expect("the session cookie");
    assert!(cookie.http_only && cookie.secure, "{cookie:?}");
    assert_eq!(cookie.same_site.as_deref(), Some("Strict"), "{cookie:?}");
    page.wait_for("#agents .agent .online.on")
        .await
        .expect("the agent shown online");
    let card = page.text("#agents .agent").await.unwrap();
    assert!(card.contains("app") && card.contains("quic"), "{card}");

    // The same link again, in another browser: refused, with what to do.
    let other = Browser::start().await.unwrap();
    other.goto(&link).await.unwrap();
    let said = other
        .wait_for_text("#signin-status.error", "/dashboard")
        .await
        .expect("a spent link refused");
    assert!(said.contains("already used"), "{said}");
    assert!(other.cookie("__Host-ct_session").await.unwrap().is_none());

    // 1. A write, allowed from the page: the approval arrives live, the file is written, the text after it
    //    arrives rendered as Markdown, and nothing a model writes becomes markup.
    let hello = w.project.join("hello.txt");
    w.fake.push(Reply::tool_use(
        "Write",
        write(&hello, "hi from the dashboard\n"),
    ));
    w.fake.push(Reply::text(
        "I wrote **hello.txt**. <img src=x id=injected> [x](javascript:alert(1))",
    ));
    let first = start_from_page(&page, &base, "write hello.txt").await;
    let approval = open_approval(&page).await;
    assert!(page
        .text(&format!(".approval[data-approval='{approval}']"))
        .await
        .unwrap()
        .contains("hello.txt"));
    page.click(".approval.open button.allow-once")
        .await
        .unwrap();
    page.wait_for_text("#task-state", "done")
        .await
        .expect("the task ends done, live");
    assert_eq!(
        std::fs::read_to_string(&hello).unwrap(),
        "hi from the dashboard\n"
    );
    page.wait_for_text("#conversation .event.text strong", "hello.txt")
        .await
        .unwrap();
    let conversation = page.text("#conversation").await.unwrap();
    assert!(conversation.contains("<img src=x"), "{conversation}");
    assert!(!page.exists("#injected").await.unwrap());
    assert!(!page
        .exists("#conversation a[href^='javascript']")
        .await
        .unwrap());
    page.wait_for(".approval.closed").await.unwrap();
    assert!(!page.exists(".approval button.allow-once").await.unwrap());
    let tool = page
        .wait_for_text("#conversation details.tool", "Write")
        .await
        .expect("the tool call on the page");
    assert!(tool.contains("hello.txt"), "{tool}");
    let usage = page.text("#task-usage").await.unwrap();
    assert!(usage.contains('$'), "the live usage line: {usage}");

    // A follow-up from the keyboard (Ctrl+Enter) continues the ended task as a new one, and the page moves to it.
    w.fake.push(Reply::text("Bye from the follow-up."));
    page.fill("#reply-text", "now say bye\u{E009}\u{E007}")
        .await
        .unwrap();
    let follow_up = page
        .wait_for_js(
            "const m = location.hash.match(/^#\\/task\\/(t_[A-Za-z0-9_-]+)/); \
             return m && m[1] !== arguments[0] && m[1];",
            vec![json!(first)],
        )
        .await
        .expect("the page moves to the follow-up")
        .as_str()
        .unwrap()
        .to_string();
    page.wait_for_text("#conversation", "Bye from the follow-up")
        .await
        .unwrap();
    page.wait_for_text("#task-state", "done").await.unwrap();

    // 2. A write denied with a reason: no file, and the reason reaches Claude.
    let nope = w.project.join("nope.txt");
    w.fake.push(Reply::tool_use("Write", write(&nope, "no\n")));
    w.fake.push(Reply::text("Understood, I left it."));
    let second = start_from_page(&page, &base, "write nope.txt").await;
    assert_ne!(second, first);
    open_approval(&page).await;
    page.fill(".approval.open input.deny-reason", "not that file")
        .await
        .unwrap();
    page.click(".approval.open button.deny").await.unwrap();
    page.wait_for_text("#task-state", "done").await.unwrap();
    assert!(!nope.exists());
    assert!(
        w.fake
            .main_requests()
            .iter()
            .any(|r| r.body.to_string().contains("not that file")),
        "the reason reached Claude"
    );

    // 3. Cancelled from the page while it waits for an approval.
    let third_file = w.project.join("third.txt");
    w.fake
        .push(Reply::tool_use("Write", write(&third_file, "3\n")));
    let third = start_from_page(&page, &base, "write third.txt").await;
    open_approval(&page).await;
    page.click("#cancel-task").await.unwrap();
    page.accept_alert().await.unwrap();
    page.wait_for_text("#task-state", "cancelled")
        .await
        .expect("cancelled from the page");
    assert!(!third_file.exists());

    // 4. Claude asks a question (AskUserQuestion): answered from the page, the answer reaches Claude.
    w.fake.push(Reply::tool_use(
        "AskUserQuestion",
        json!({ "questions": [{
            "question": "Which database should I use?",
            "header": "Database",
            "options": [
                { "label": "Postgres", "description": "relational" },
                { "label": "SQLite", "description": "embedded" }
            ],
            "multiSelect": false
        }] }),
    ));
    w.fake.push(Reply::text("SQLite it is."));
    let fourth = start_from_page(&page, &base, "set up storage").await;
    page.wait_for(".approval.open button.send-answers")
        .await
        .expect("the question on the page");
    assert!(!page
        .exists(".approval.open button.allow-once:not([hidden])")
        .await
        .unwrap());
    page.click(".approval.open input[value='SQLite']")
        .await
        .unwrap();
    page.click(".approval.open button.send-answers")
        .await
        .unwrap();
    page.wait_for_text("#task-state", "done").await.unwrap();
    assert!(
        w.fake.main_requests().iter().any(|r| r
            .body
            .to_string()
            .contains(r#"\"Which database should I use?\"=\"SQLite\""#)),
        "the answer reached Claude"
    );

    // The task list has them all, newest first.
    page.goto(&format!("{base}/dashboard/#/tasks"))
        .await
        .unwrap();
    page.wait_for(&format!("#tasks tr.task[data-id='{first}']"))
        .await
        .unwrap();
    let ids: Value = page
        .eval(
            "return [...document.querySelectorAll('#tasks tr.task')].map(r => r.dataset.id);",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(ids, json!([fourth, third, second, follow_up, first]));

    // A request without the CSRF token, with the real cookie, is refused, and changes nothing.
    let (status, body) = page
        .fetch(
            "POST",
            &format!("/dashboard/api/tasks/{first}/reply"),
            &[("content-type", "application/json")],
            Some(r#"{"prompt":"forged"}"#),
        )
        .await
        .unwrap();
    assert_eq!(status, 403, "{body}");

    // A second person, signed in beside the first: sees none of it, and cannot act on it.
    let bob_link = dashboard_link(&w.sim, &bob).await;
    drop(other);
    let bobs = signed_in(&bob_link).await;
    bobs.goto(&format!("{base}/dashboard/#/tasks"))
        .await
        .unwrap();
    bobs.wait_for_js(
        "const e = document.querySelector('#tasks-empty'); return e && !e.hidden;",
        vec![],
    )
    .await
    .expect("bob is told he has no tasks");
    assert_eq!(bobs.count("#tasks tr.task").await.unwrap(), 0);
    let (status, body) = bobs
        .fetch("GET", &format!("/dashboard/api/tasks/{first}"), &[], None)
        .await
        .unwrap();
    assert_eq!(status, 404, "{body}");
    assert!(!body.contains("hello"), "{body}");
    let (_, me) = bobs
        .fetch("GET", "/dashboard/api/me", &[], None)
        .await
        .unwrap();
    let csrf = serde_json::from_str::<Value>(&me).unwrap()["csrf"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, _) = bobs
        .fetch(
            "POST",
            &format!("/dashboard/api/tasks/{first}/reply"),
            &[
                ("content-type", "application/json"),
                ("x-csrf-token", &csrf),
            ],
            Some(r#"{"prompt":"let me in"}"#),
        )
        .await
        .unwrap();
    assert_eq!(status, 404);
    bobs.goto(&format!("{base}/dashboard/#/task/{first}"))
        .await
        .unwrap();
    bobs.wait_for_text("#alert-text", "no task")
        .await
        .expect("the page says there is no such task");

    // Shares from the page: alice shares `app` with bob, who then sees it to start tasks in; she removes it.
    page.goto(&format!("{base}/dashboard/#/shares"))
        .await
        .unwrap();
    page.fill("#share-grantee", &bob.id).await.unwrap();
    page.fill("#share-projects", "app").await.unwrap();
    page.select("#share-level", "run").await.unwrap();
    page.click("#share-submit").await.unwrap();
    let row = format!("#shares tr.share[data-grantee='{}']", bob.id);
    page.wait_for_text(&row, "app")
        .await
        .expect("the share listed");
    bobs.goto(&format!("{base}/dashboard/#/new")).await.unwrap();
    bobs.wait_for_text("#new-project option", "app")
        .await
        .expect("bob may start tasks in alice's app");
    page.click(&format!("{row} .remove-share")).await.unwrap();
    page.wait_gone(&row).await.expect("the share removed");
    let (_, projects) = bobs
        .fetch("GET", "/dashboard/api/projects", &[], None)
        .await
        .unwrap();
    assert_eq!(projects, "[]", "the share ended at once");

    // Audit, usage and sessions pages, with what happened above.
    page.goto(&format!("{base}/dashboard/#/audit"))
        .await
        .unwrap();
    page.wait_for_text("#audit tr.audit-entry", "app")
        .await
        .expect("the audit log");
    page.goto(&format!("{base}/dashboard/#/usage"))
        .await
        .unwrap();
    let total = page.wait_for_text("#usage-total", "Total").await.unwrap();
    assert!(total.contains('5'), "five tasks of alice's: {total}");
    page.goto(&format!("{base}/dashboard/#/sessions"))
        .await
        .unwrap();
    page.wait_for("#sessions .session.current").await.unwrap();
    assert_eq!(page.count("#sessions .session").await.unwrap(), 1);

    // On a phone-sized screen the page does not scroll sideways.
    page.set_window_size(375, 800).await.unwrap();
    page.goto(&format!("{base}/dashboard/#/task/{first}"))
        .await
        .unwrap();
    page.wait_for_text("#task-state", "done").await.unwrap();
    let fits = page
        .eval(
            "return document.documentElement.scrollWidth <= window.innerWidth + 1;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(fits, json!(true), "the task page fits 375 px");

    // `/dashboard signout:all` in Discord: the page finds itself signed out.
    let ix = w
        .sim
        .send_slash(
            &w.sim.origin(&alice),
            &SlashCommand::new("dashboard").opt(Opt::str("signout", "all")),
        )
        .unwrap();
    let said = private(&w.sim, &ix).await;
    assert!(said.contains("Signed out"), "{said}");
    page.goto(&format!("{base}/dashboard/#/agents"))
        .await
        .unwrap();
    page.wait_for("#signed-out").await.expect("signed out");
    assert!(bobs.goto(&format!("{base}/dashboard/")).await.is_ok());
    bobs.wait_for("#me-user")
        .await
        .expect("bob is still signed in");
    agent.stop().await.unwrap();
}
