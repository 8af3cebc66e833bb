//! The relay's identity and TLS: its ed25519 key (what agents pin), and the certificate both listeners use.
//!
//! Agents authenticate the relay by its ed25519 key through the handshake, which is bound to the TLS channel,
//! so a self-signed certificate generated on first start is enough; operators may give real certificate files
//! instead (for browsers, proxies that inspect SNI, or policy). Both are kept in the data directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use ct_protocol::link::{Transport, QUIC_ALPN};
use ed25519_dalek::SigningKey;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

use crate::files;

/// Where the certificate comes from.
#[derive(Debug, Clone)]
pub enum CertSource {
    /// Generated on first start and kept in the data directory.
    SelfSigned,
    /// PEM files given by the operator.
    Files { cert: PathBuf, key: PathBuf },
}

/// Loads the relay key from `dir/relay.key`, creating it on first start.
pub fn relay_key(dir: &Path) -> Result<SigningKey> {
    if let Some(key) = read_relay_key(dir)? {
        return Ok(key);
    }
    let path = dir.join("relay.key");
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    files::write_private(&path, ct_protocol::b64::encode(&key.to_bytes()).as_bytes())?;
    tracing::info!(path = %path.display(), "generated a new relay key");
    Ok(key)
}

/// The relay key of an existing relay's data directory (`ct-relay migrate`); an error if there is none.
pub fn existing_relay_key(dir: &Path) -> Result<SigningKey> {
    read_relay_key(dir)?.with_context(|| {
        format!(
            "{} has no relay.key: is it a relay's data directory (--data-dir of the relay to move)?",
            dir.display()
        )
    })
}

fn read_relay_key(dir: &Path) -> Result<Option<SigningKey>> {
    let path = dir.join("relay.key");
    if let Some(bytes) = files::read_private(&path)? {
        let seed = ct_protocol::b64::decode_array::<32>(String::from_utf8_lossy(&bytes).trim())
            .with_context(|| {
                format!(
                    "{} is not a relay key; restore it from a backup (agents pin it)",
                    path.display()
                )
            })?;
        return Ok(Some(SigningKey::from_bytes(&seed)));
    }
    Ok(None)
}

/// The certificate chain and private key to serve.
pub fn certificate(
    dir: &Path,
    source: &CertSource,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let (cert_path, key_path) = match source {
        CertSource::Files { cert, key } => (cert.clone(), key.clone()),
        CertSource::SelfSigned => {
            let tls_dir = dir.join("tls");
            files::private_dir(&tls_dir)?;
            let (cert, key) = (tls_dir.join("cert.pem"), tls_dir.join("key.pem"));
            if !cert.exists() || !key.exists() {
                let generated =
                    rcgen::generate_simple_self_signed(vec!["codetogether-relay".to_string()])?;
                files::write_private(&key, generated.key_pair.serialize_pem().as_bytes())?;
                files::write_private(&cert, generated.cert.pem().as_bytes())?;
                tracing::info!(path = %cert.display(), "generated a self-signed certificate");
            }
            (cert, key)
        }
    };
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(&cert_path)
            .with_context(|| format!("opening certificate {}", cert_path.display()))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .with_context(|| format!("reading certificate {}", cert_path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{} holds no PEM certificate",
        cert_path.display()
    );
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
        std::fs::File::open(&key_path)
            .with_context(|| format!("opening private key {}", key_path.display()))?,
    ))?
    .with_context(|| format!("{} holds no PEM private key", key_path.display()))?;
    Ok((certs, key))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS 1.3 only: the channel binding relies on TLS 1.3's exporter.
fn server_tls(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    alpn: &[u8],
) -> Result<rustls::ServerConfig> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(cfg)
}

/// The HTTPS (WebSocket, health, metrics) listener's TLS configuration.
pub fn https_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<rustls::ServerConfig>> {
    Ok(Arc::new(server_tls(certs, key, b"http/1.1")?))
}

/// The QUIC endpoint's configuration, with keep-alive and idle timeout from the link timing.
pub fn quic_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<quinn::ServerConfig> {
    let tls = server_tls(certs, key, QUIC_ALPN)?;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let timing = Transport::Quic.timing();
    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(Some(timing.heartbeat))
        .max_idle_timeout(Some(timing.dead_after.try_into()?))
        // One control stream per agent; later features may open a few more, never many.
        .max_concurrent_bidi_streams(4u32.into())
        .max_concurrent_uni_streams(0u32.into());
    cfg.transport_config(Arc::new(transport));
    Ok(cfg)
}

/// The QUIC endpoint's configuration: stateless resets that survive a restart.
///
/// After a crash or a restart the new process has no state for the agents' old connections. quinn's defaults
/// then stay silent (a fresh random reset key, and connection IDs validated against a fresh random key), so
/// agents keep sending into the dead connection until their idle timeout (4 s) and only then back off. Here
/// the reset key is derived from the relay key and any well-formed connection ID is accepted, so the
/// restarted relay answers the first packet of an old connection (a keep-alive comes every second) with a
/// stateless reset the agent recognises, and the agent reconnects at once. Measured with 200 agents (half on
/// QUIC) and a SIGKILL (`ct-loadgen bench --only restart`): QUIC agents noticed the restart after 3.8 s (p50)
/// before this and 0.8 s after; all agents were back online within 4.1 s before, 1.5 s after.
pub fn quic_endpoint_config(relay_key: &SigningKey) -> quinn::EndpointConfig {
    let mut cfg = quinn::EndpointConfig::new(Arc::new(ResetKey::derive(relay_key)));
    cfg.cid_generator(|| Box::new(RandomCids));
    // quinn sends at most one reset per 20 ms by default, so a thousand agents would need 20 s to all hear.
    // A reset is always smaller than the packet that caused it (quinn pads to one byte less), so it can
    // neither amplify nor loop; answering every such packet costs one HMAC.
    cfg.min_reset_interval(std::time::Duration::ZERO);
    cfg
}

/// Random 8-byte connection IDs. Unlike quinn's default generator, whose IDs only validate under a key drawn
/// at start, these are recognised as ours by a restarted relay, which must reset them.
#[derive(Debug)]
struct RandomCids;

impl quinn::ConnectionIdGenerator for RandomCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        let mut id = [0u8; 8];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut id);
        quinn::ConnectionId::new(&id)
    }

    fn cid_len(&self) -> usize {
        8
    }

    fn cid_lifetime(&self) -> Option<std::time::Duration> {
        None
    }
}

/// HMAC-SHA256 (RFC 2104) under a key derived from, but not revealing, the relay key.
struct ResetKey([u8; 32]);

impl ResetKey {
    fn derive(relay_key: &SigningKey) -> Self {
        let mut h = Sha256::new();
        h.update(b"codetogether quic stateless reset key\0");
        h.update(relay_key.to_bytes());
        Self(h.finalize().into())
    }

    fn mac(&self, data: &[u8]) -> [u8; 32] {
        let (mut inner, mut outer) = (Sha256::new(), Sha256::new());
        let mut block = [0u8; 64];
        block[..32].copy_from_slice(&self.0);
        inner.update(block.map(|b| b ^ 0x36));
        inner.update(data);
        outer.update(block.map(|b| b ^ 0x5c));
        outer.update(inner.finalize());
        outer.finalize().into()
    }
}

impl quinn::crypto::HmacKey for ResetKey {
    fn sign(&self, data: &[u8], signature_out: &mut [u8]) {
        let mac = self.mac(data);
        let n = signature_out.len().min(mac.len());
        signature_out[..n].copy_from_slice(&mac[..n]);
    }

    fn signature_len(&self) -> usize {
        32
    }

    fn verify(&self, data: &[u8], signature: &[u8]) -> Result<(), quinn::crypto::CryptoError> {
        use subtle::ConstantTimeEq;
        if bool::from(self.mac(data).as_slice().ct_eq(signature)) {
            Ok(())
        } else {
            Err(quinn::crypto::CryptoError)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quinn::crypto::HmacKey;

    #[test]
    fn reset_key_is_hmac_sha256_and_stable_across_restarts() {
        // RFC 4231 test case 2 checks the HMAC itself (its 4-byte key, zero-padded like ours).
        let mut key = ResetKey([0; 32]);
        key.0[..4].copy_from_slice(b"Jefe");
        assert_eq!(
            hex::encode(key.mac(b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let relay = SigningKey::from_bytes(&[7; 32]);
        let (a, b) = (ResetKey::derive(&relay), ResetKey::derive(&relay));
        let (mut sa, mut sb) = ([0u8; 32], [0u8; 32]);
        a.sign(b"connection id", &mut sa);
        b.sign(b"connection id", &mut sb);
        assert_eq!(sa, sb, "a restarted relay must derive the same tokens");
        assert!(a.verify(b"connection id", &sa).is_ok());
        assert!(a.verify(b"another id", &sa).is_err());
        assert_ne!(
            ResetKey::derive(&SigningKey::from_bytes(&[8; 32])).0,
            a.0,
            "each relay has its own key"
        );
    }
}
