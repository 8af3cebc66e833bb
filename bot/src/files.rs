//! Files people attach in Discord (the `/task` file option, a message in a task's thread): checked against
//! the limits from what Discord says about them before anything is downloaded, then fetched from Discord's
//! CDN only, never more bytes than the limit whatever the server says.
//!
//! Only `https://cdn.discordapp.com` and `https://media.discordapp.net` are fetched, so an attachment URL can
//! never make the relay fetch from a host someone else chose. With `DISCORD_API_PROXY` set (a proxy, or the
//! Discord simulator in tests), those URLs are fetched through that base instead, path and query kept.

use std::sync::OnceLock;
use std::time::Duration;

use ct_protocol::files::{Attachment, MAX_FILES, MAX_FILE_BYTES, MAX_TASK_FILES_BYTES};
use reqwest::Url;

/// Discord's CDN hosts: the only ones attachments are downloaded from.
const CDN_HOSTS: &[&str] = &["cdn.discordapp.com", "media.discordapp.net"];
/// The downloads of one message's files may take this long in all.
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(60);

/// What Discord says about an attached file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub name: String,
    pub size: u64,
    pub url: String,
    pub content_type: Option<String>,
}

impl From<&serenity::all::Attachment> for Wanted {
    fn from(a: &serenity::all::Attachment) -> Self {
        Self {
            name: a.filename.clone(),
            size: u64::from(a.size),
            url: a.url.clone(),
            content_type: a.content_type.clone(),
        }
    }
}

/// Refuses, by the sizes Discord reported, before anything is downloaded.
pub fn check(wanted: &[Wanted]) -> Result<(), String> {
    if wanted.len() > MAX_FILES {
        return Err(format!(
            "{} files attached, more than the {MAX_FILES} a task takes: attach fewer (or zip them)",
            wanted.len()
        ));
    }
    for w in wanted {
        if w.size > MAX_FILE_BYTES {
            return Err(format!(
                "{:?} is {}, over the {} a file may be: attach a smaller file (or the part that matters); \
                 nothing was started",
                w.name,
                mib(w.size),
                mib(MAX_FILE_BYTES)
            ));
        }
    }
    let total: u64 = wanted.iter().map(|w| w.size).sum();
    if total > MAX_TASK_FILES_BYTES {
        return Err(format!(
            "the attached files add up to {}, over the {} a task takes: attach fewer or smaller ones; \
             nothing was started",
            mib(total),
            mib(MAX_TASK_FILES_BYTES)
        ));
    }
    Ok(())
}

fn mib(n: u64) -> String {
    format!("{:.1} MiB", n as f64 / 1_048_576.0)
}

/// Where to fetch `url` from: a Discord CDN URL as is, or through `proxy` when one is set. Anything else is
/// refused.
pub fn source(url: &str, proxy: Option<&str>) -> Result<Url, String> {
    let parsed =
        Url::parse(url).map_err(|_| "an attachment URL that does not parse".to_string())?;
    let host = parsed.host_str().unwrap_or_default();
    if parsed.scheme() != "https"
        || !CDN_HOSTS.contains(&host)
        || parsed.port().is_some()
        || !parsed.username().is_empty()
        || parsed.password().is_some()
    {
        return Err(format!(
            "an attachment URL not on Discord's CDN ({host}) is not fetched"
        ));
    }
    let Some(base) = proxy else {
        return Ok(parsed);
    };
    let mut via = Url::parse(base).map_err(|_| "DISCORD_API_PROXY does not parse".to_string())?;
    let prefix = via.path().trim_end_matches('/').to_string();
    via.set_path(&format!("{prefix}{}", parsed.path()));
    via.set_query(parsed.query());
    Ok(via)
}

fn client() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            // A redirect could lead anywhere: the CDN serves attachments directly.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(DOWNLOAD_TIMEOUT)
            .build()
            // Only a TLS backend that cannot start fails this, and the bot's REST client (built the same way
            // at start) would have failed first. A default client would follow redirects: never fall back.
            .expect("the HTTP client for attachments builds")
    })
}

/// Downloads one checked file, reading at most its reported size (and never past the per-file limit).
pub async fn download(w: &Wanted, proxy: Option<&str>) -> Result<Attachment, String> {
    let url = source(&w.url, proxy)?;
    let cap = w.size.min(MAX_FILE_BYTES);
    let fail =
        |e: reqwest::Error| format!("{:?} could not be downloaded from Discord: {e}", w.name);
    let mut resp = client().get(url).send().await.map_err(fail)?;
    if !resp.status().is_success() {
        return Err(format!(
            "{:?} could not be downloaded from Discord ({}): attach it again",
            w.name,
            resp.status()
        ));
    }
    if resp.content_length().is_some_and(|n| n > cap) {
        return Err(format!(
            "{:?} is larger than Discord said: attach it again",
            w.name
        ));
    }
    let mut data = Vec::with_capacity(cap as usize);
    while let Some(chunk) = resp.chunk().await.map_err(fail)? {
        if data.len() as u64 + chunk.len() as u64 > cap {
            return Err(format!(
                "{:?} is larger than Discord said: attach it again",
                w.name
            ));
        }
        data.extend_from_slice(&chunk);
    }
    Ok(Attachment {
        name: w.name.clone(),
        media_type: w.content_type.clone(),
        data,
    })
}

/// Messages or commands whose files download at once (each batch at most the per-task total).
static DOWNLOADS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);

/// Checks, then downloads every file (one after another: they are few, and bounded in all), within
/// [`DOWNLOAD_TIMEOUT`] for all of them together.
pub async fn fetch(wanted: &[Wanted], proxy: Option<&str>) -> Result<Vec<Attachment>, String> {
    check(wanted)?;
    let all = async {
        // Each download may hold its whole size in memory until the task takes it: a few at a time across
        // the bot, whoever posts; the others wait their turn within the same deadline.
        let _turn = DOWNLOADS.acquire().await.map_err(|e| e.to_string())?;
        let mut out = Vec::with_capacity(wanted.len());
        for w in wanted {
            out.push(download(w, proxy).await?);
        }
        Ok(out)
    };
    tokio::time::timeout(DOWNLOAD_TIMEOUT, all)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "the attached files took over {}s to download from Discord: try again (or attach fewer)",
                DOWNLOAD_TIMEOUT.as_secs()
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wanted(size: u64) -> Wanted {
        Wanted {
            name: "a.log".into(),
            size,
            url: "https://cdn.discordapp.com/attachments/1/2/a.log?ex=1".into(),
            content_type: None,
        }
    }

    #[test]
    fn limits_are_checked_on_what_discord_reports() {
        assert!(check(&[wanted(MAX_FILE_BYTES)]).is_ok());
        let err = check(&[wanted(50_000_000)]).unwrap_err();
        assert!(err.contains("over the 8.0 MiB"), "{err}");
        assert!(check(&[
            wanted(MAX_FILE_BYTES),
            wanted(MAX_FILE_BYTES),
            wanted(MAX_FILE_BYTES),
            wanted(2 << 20)
        ])
        .is_err());
        assert!(check(&vec![wanted(1); MAX_FILES + 1]).is_err());
    }

    #[test]
    fn only_discords_cdn_is_fetched_and_the_proxy_keeps_path_and_query() {
        let ok = "https://cdn.discordapp.com/attachments/1/2/a.log?ex=1&is=2";
        assert_eq!(source(ok, None).unwrap().as_str(), ok);
        assert_eq!(
            source(ok, Some("http://127.0.0.1:9/")).unwrap().as_str(),
            "http://127.0.0.1:9/attachments/1/2/a.log?ex=1&is=2"
        );
        assert!(source("https://media.discordapp.net/attachments/1/2/x.png", None).is_ok());
        for bad in [
            "https://evil.example/attachments/1/2/a",
            "http://cdn.discordapp.com/attachments/1/2/a",
            "https://cdn.discordapp.com.evil.example/a",
            "https://user@cdn.discordapp.com/a",
            "https://cdn.discordapp.com:8443/a",
            "file:///etc/passwd",
            "not a url",
        ] {
            assert!(source(bad, None).is_err(), "{bad}");
            assert!(source(bad, Some("http://127.0.0.1:9")).is_err(), "{bad}");
        }
    }
}
