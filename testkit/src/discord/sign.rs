//! HTTP interactions mode, Discord's side: sign a body the way Discord does (ed25519 over the timestamp
//! followed by the body, hex signature in `X-Signature-Ed25519`, the timestamp in `X-Signature-Timestamp`)
//! and POST it to the app's interactions URL.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use axum::body::{to_bytes, Body, Bytes};
use ed25519_dalek::{Signer as _, SigningKey};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// Discord's application key pair for interactions; the public half is the app's "public key".
#[derive(Clone)]
pub struct InteractionSigner {
    key: SigningKey,
}

impl std::fmt::Debug for InteractionSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InteractionSigner")
            .field("public_key", &self.public_key_hex())
            .finish_non_exhaustive()
    }
}

/// What the app answered.
#[derive(Debug, Clone)]
pub struct HttpReply {
    pub status: u16,
    pub body: Bytes,
}

impl HttpReply {
    pub fn json(&self) -> anyhow::Result<Value> {
        serde_json::from_slice(&self.body).context("reply is not JSON")
    }
}

impl InteractionSigner {
    pub fn generate() -> Self {
        Self {
            key: SigningKey::generate(&mut rand::rngs::OsRng),
        }
    }

    /// The hex public key, as the developer portal shows it (`DISCORD_PUBLIC_KEY`).
    pub fn public_key_hex(&self) -> String {
        hex::encode(self.key.verifying_key().to_bytes())
    }

    /// Hex signature of `timestamp` followed by `body`.
    pub fn sign(&self, timestamp: &str, body: &[u8]) -> String {
        let mut msg = Vec::with_capacity(timestamp.len() + body.len());
        msg.extend_from_slice(timestamp.as_bytes());
        msg.extend_from_slice(body);
        hex::encode(self.key.sign(&msg).to_bytes())
    }

    /// The two headers Discord sends, for `body` signed now.
    pub fn headers(&self, body: &[u8]) -> Vec<(String, String)> {
        let ts = unix_now().to_string();
        vec![
            ("x-signature-ed25519".into(), self.sign(&ts, body)),
            ("x-signature-timestamp".into(), ts),
        ]
    }

    /// Signs `body` now and POSTs it to `url`, as Discord delivers an interaction.
    pub async fn post(&self, url: &str, body: &[u8]) -> anyhow::Result<HttpReply> {
        post(url, body, &self.headers(body)).await
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// POSTs `body` as JSON to an `http://` URL with extra headers (tests forge or drop signatures with it).
pub async fn post(
    url: &str,
    body: &[u8],
    headers: &[(String, String)],
) -> anyhow::Result<HttpReply> {
    let uri: axum::http::Uri = url.parse().context("bad URL")?;
    anyhow::ensure!(uri.scheme_str() == Some("http"), "only http:// URLs: {url}");
    let host = uri.host().context("URL has no host")?.to_string();
    let port = uri.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .with_context(|| format!("connecting to {host}:{port}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let mut req = axum::http::Request::post(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header("host", format!("{host}:{port}"))
        .header("content-type", "application/json")
        .header(
            "user-agent",
            "Discord-Interactions/1.0 (+https://discord.com)",
        );
    for (k, v) in headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let req = req.body(Body::from(body.to_vec()))?;
    let exchange = async move {
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = to_bytes(Body::new(resp.into_body()), 16 * 1024 * 1024).await?;
        // With the sender gone and nothing in flight, the connection future below completes.
        drop(sender);
        Ok::<_, anyhow::Error>(HttpReply { status, body })
    };
    // The connection is driven here, alongside the exchange, rather than in a spawned task.
    let (reply, _) = tokio::join!(exchange, conn);
    reply
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signature, Verifier as _, VerifyingKey};

    #[test]
    fn signature_covers_timestamp_then_body() {
        let s = InteractionSigner::generate();
        let sig = s.sign("1700000000", b"{\"type\":1}");
        let key =
            VerifyingKey::from_bytes(&hex::decode(s.public_key_hex()).unwrap().try_into().unwrap())
                .unwrap();
        let sig = Signature::from_slice(&hex::decode(sig).unwrap()).unwrap();
        assert!(key.verify(b"1700000000{\"type\":1}", &sig).is_ok());
        assert!(key.verify(b"1700000001{\"type\":1}", &sig).is_err());
    }
}
