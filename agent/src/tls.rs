//! TLS as the agent uses it: TLS 1.3 only, any relay certificate, and the channel binding the handshake signs.
//!
//! Why the agent accepts any certificate: relays run with self-signed certificates by default, and the agent
//! does not need the Web PKI to know it reached the right relay. Authentication is the ct_protocol handshake:
//! the relay signs a transcript that includes the TLS channel binding (a keying-material exporter value), and
//! the agent checks the relay's key against the fingerprint pinned from the pairing token. A man in the
//! middle can present any certificate he likes, but he terminates TLS himself, so his channel binding
//! differs from the relay's and he cannot produce the relay's signature over it.
//!
//! What the verifier still checks: the server's TLS 1.3 CertificateVerify signature over the handshake. That
//! proves the server holds the private key of the certificate it sent, which keeps the TLS handshake itself
//! sound. TLS 1.2 is refused because its exporter is only safe with extended master secret, and the relay
//! speaks 1.3 anyway.

use std::sync::Arc;

use ct_protocol::handshake::{CHANNEL_BINDING_LABEL, CHANNEL_BINDING_LEN};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{ring, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// Accepts any end-entity certificate, verifies the TLS 1.3 handshake signature, refuses TLS 1.2.
#[derive(Debug)]
struct PinnedByHandshake {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedByHandshake {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // See the module docs: the relay is authenticated by the ct_protocol handshake, not by this chain.
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Unreachable with our TLS 1.3-only config, but refuse explicitly in case the config ever changes.
        Err(rustls::Error::General(
            "TLS 1.2 is not accepted: the relay must speak TLS 1.3".into(),
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A TLS 1.3-only client config with the ring provider (never a process-wide default) offering `alpn`.
pub(crate) fn client_config(alpn: &[u8]) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let provider: Arc<CryptoProvider> = Arc::new(ring::default_provider());
    let verifier = PinnedByHandshake {
        algorithms: provider.signature_verification_algorithms,
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(config))
}

/// The channel binding of a TLS-over-TCP connection.
pub(crate) fn tcp_channel_binding(
    conn: &rustls::ClientConnection,
) -> Result<[u8; CHANNEL_BINDING_LEN], rustls::Error> {
    conn.export_keying_material([0u8; CHANNEL_BINDING_LEN], CHANNEL_BINDING_LABEL, Some(b""))
}

/// The channel binding of a QUIC connection.
pub(crate) fn quic_channel_binding(
    conn: &quinn::Connection,
) -> Result<[u8; CHANNEL_BINDING_LEN], String> {
    let mut out = [0u8; CHANNEL_BINDING_LEN];
    conn.export_keying_material(&mut out, CHANNEL_BINDING_LABEL, b"")
        .map_err(|e| format!("{e:?}"))?;
    Ok(out)
}

/// Splits `host:port` (IPv6 hosts in brackets) into the host as TLS and DNS want it and the port.
pub fn split_host_port(addr: &str) -> Option<(&str, u16)> {
    let (host, port) = if let Some(rest) = addr.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        (host, after.strip_prefix(':')?)
    } else {
        addr.rsplit_once(':')?
    };
    if host.is_empty() || host.contains(':') && !addr.starts_with('[') {
        return None;
    }
    Some((host, port.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        assert_eq!(
            split_host_port("relay.example:7443"),
            Some(("relay.example", 7443))
        );
        assert_eq!(split_host_port("127.0.0.1:1"), Some(("127.0.0.1", 1)));
        assert_eq!(split_host_port("[::1]:8443"), Some(("::1", 8443)));
        for bad in [
            "relay",
            ":7443",
            "::1:7443",
            "[::1]",
            "host:port",
            "host:70000",
        ] {
            assert_eq!(split_host_port(bad), None, "{bad}");
        }
    }

    #[test]
    fn config_is_tls13_only() {
        let config = client_config(b"x").unwrap();
        assert_eq!(config.alpn_protocols, vec![b"x".to_vec()]);
    }
}
