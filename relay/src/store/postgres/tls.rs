//! TLS to PostgreSQL, with libpq's `sslmode` meanings, so a URL that works with `psql` works here.
//!
//! Managed databases require it (Amazon RDS for PostgreSQL 15 and later refuses unencrypted connections by
//! default) and a cluster's nodes often reach their database across a network. The `postgres` crate knows
//! `disable`, `prefer` and `require` only, and refuses options it does not know; this module takes libpq's
//! TLS options out of the URL before the crate sees it:
//!
//! | `sslmode` | here |
//! |---|---|
//! | `disable`, `prefer` (the default) | no TLS. (libpq's `prefer` tries TLS without checking the certificate, which protects from nothing an attacker on the path cannot undo; ask for `require` or better.) |
//! | `require` | TLS; the certificate is checked only when `sslrootcert` is given (as `verify-ca`), as libpq does |
//! | `verify-ca` | TLS; the server's chain must lead to `sslrootcert` (or the system's roots without it) |
//! | `verify-full` | as `verify-ca`, and the certificate must name the host in the URL |
//!
//! `sslrootcert=PATH` names a PEM file of CA certificates (`system` for the system's roots, as in libpq 16).
//! Client certificates (`sslcert`, `sslkey`) are not supported: the error says so rather than connecting
//! without them.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context as _, Result};
use postgres::config::SslMode;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

/// How the store's connections are made: the crate's configuration, and TLS if the URL asks for it.
#[derive(Clone)]
pub(super) struct Target {
    pub config: postgres::Config,
    tls: Option<MakeRustlsConnect>,
    /// What was asked for, for errors and logs.
    pub mode: Mode,
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field("config", &self.config)
            .field("mode", &self.mode)
            .finish()
    }
}

/// libpq's `sslmode`, as far as it changes what this module does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    Plain,
    /// Encrypted, the certificate not checked.
    Require,
    VerifyCa,
    VerifyFull,
}

impl Target {
    /// Parses `url` (the `postgres://` form, or libpq's `key=value` form without TLS options).
    pub fn parse(url: &str) -> Result<Self> {
        let (rest, tls) = split_tls_options(url)?;
        let mut config: postgres::Config = rest.parse().with_context(|| {
            format!(
                "reading the database URL{}",
                if url.contains("://") {
                    ""
                } else {
                    " (for sslmode=verify-ca/verify-full or sslrootcert, use the postgres:// form)"
                }
            )
        })?;
        let mode = match (tls.mode.as_deref(), config.get_ssl_mode()) {
            (Some("verify-full"), _) => Mode::VerifyFull,
            (Some("verify-ca"), _) => Mode::VerifyCa,
            (_, SslMode::Require) if tls.root.is_some() => Mode::VerifyCa,
            (_, SslMode::Require) => Mode::Require,
            _ => Mode::Plain,
        };
        if mode == Mode::Plain && tls.root.is_some() {
            // A CA named for nothing: the operator surely meant the database's certificate to be checked.
            bail!(
                "the database URL names sslrootcert but its sslmode does not use TLS: add sslmode=verify-full \
                 (or verify-ca)"
            );
        }
        if mode == Mode::Plain {
            // No TLS offered at all, so `prefer` connects in the clear exactly as it did before TLS was known.
            config.ssl_mode(SslMode::Disable);
            return Ok(Self {
                config,
                tls: None,
                mode,
            });
        }
        config.ssl_mode(SslMode::Require);
        let verifier: Arc<dyn ServerCertVerifier> = match mode {
            Mode::Require => Arc::new(Unchecked(provider())),
            Mode::VerifyCa => Arc::new(ChainOnly(webpki(tls.root.as_ref())?)),
            _ => webpki(tls.root.as_ref())?,
        };
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("TLS settings for the database")?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(Self {
            config,
            tls: Some(MakeRustlsConnect::new(client)),
            mode,
        })
    }

    /// A new connection.
    pub fn connect(&self) -> Result<postgres::Client, postgres::Error> {
        match &self.tls {
            None => self.config.connect(postgres::NoTls),
            Some(tls) => self.config.connect(tls.clone()),
        }
    }
}

/// libpq's TLS options, taken out of a URL.
#[derive(Debug, Default)]
struct TlsOptions {
    /// `verify-ca` or `verify-full` (the others stay in the URL for the crate).
    mode: Option<String>,
    root: Option<Root>,
}

#[derive(Debug, Clone)]
enum Root {
    System,
    File(PathBuf),
}

/// `url` without the TLS options the `postgres` crate does not know, and those options.
fn split_tls_options(url: &str) -> Result<(String, TlsOptions)> {
    let mut tls = TlsOptions::default();
    if !url.contains("://") {
        for word in url.split_whitespace() {
            let key = word.split('=').next().unwrap_or_default();
            if matches!(key, "sslrootcert" | "sslcert" | "sslkey")
                || word.starts_with("sslmode=verify")
            {
                bail!(
                    "{key} in a key=value database URL: write it as a postgres:// URL \
                     (postgres://user:password@host:port/dbname?sslmode=verify-full&sslrootcert=/path/ca.pem)"
                );
            }
        }
        return Ok((url.to_string(), tls));
    }
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), tls));
    };
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_encoding::percent_decode_str(value)
            .decode_utf8()
            .with_context(|| format!("the database URL's {key} is not UTF-8"))?;
        match key {
            "sslmode" if matches!(&*value, "verify-ca" | "verify-full") => {
                tls.mode = Some(value.into_owned());
            }
            "sslrootcert" => {
                tls.root = Some(match &*value {
                    "system" => Root::System,
                    path => Root::File(PathBuf::from(path)),
                });
            }
            "sslcert" | "sslkey" | "sslpassword" => bail!(
                "the database URL asks for a client certificate ({key}), which ct-relay does not support: \
                 use password authentication over TLS (sslmode=verify-full)"
            ),
            _ => kept.push(pair),
        }
    }
    let rest = match kept.is_empty() {
        true => base.to_string(),
        false => format!("{base}?{}", kept.join("&")),
    };
    Ok((rest, tls))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A verifier of chain and name against `root`'s certificates, or the system's.
fn webpki(root: Option<&Root>) -> Result<Arc<WebPkiServerVerifier>> {
    let mut roots = RootCertStore::empty();
    match root {
        Some(Root::File(path)) => {
            let pem = std::fs::read(path)
                .with_context(|| format!("reading sslrootcert {}", path.display()))?;
            let mut found = 0;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert =
                    cert.with_context(|| format!("reading sslrootcert {}", path.display()))?;
                roots
                    .add(cert)
                    .with_context(|| format!("a certificate in sslrootcert {}", path.display()))?;
                found += 1;
            }
            if found == 0 {
                bail!("sslrootcert {} holds no PEM certificate", path.display());
            }
        }
        None | Some(Root::System) => {
            let native = rustls_native_certs::load_native_certs();
            for cert in native.certs {
                // One unreadable system certificate must not keep the others out.
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                bail!(
                    "no CA certificates found on this system to check the database's certificate: install \
                     ca-certificates, or name the database's CA with sslrootcert=/path/ca.pem"
                );
            }
        }
    }
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .context("TLS settings for the database")
}

/// `sslmode=require`: encrypted, whoever answers. The handshake's signatures are still checked (the server
/// must hold the key of the certificate it shows), which is all libpq's `require` promises.
#[derive(Debug)]
struct Unchecked(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `sslmode=verify-ca`: the chain must lead to a trusted root; the name in the certificate is not compared
/// with the host (a database reached by an address its certificate does not list).
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            // webpki checks the chain before the name: a name error means the chain was good.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_tls_options_are_taken_out_of_the_url_and_the_rest_kept() {
        let (rest, tls) = split_tls_options(
            "postgres://u:p%40ss@db:5432/ct?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem",
        )
        .unwrap();
        assert_eq!(rest, "postgres://u:p%40ss@db:5432/ct?application_name=x");
        assert_eq!(tls.mode.as_deref(), Some("verify-full"));
        assert!(
            matches!(tls.root, Some(Root::File(p)) if p == std::path::Path::new("/etc/ca.pem"))
        );
        let (rest, tls) = split_tls_options("postgres://db/ct?sslmode=require").unwrap();
        assert_eq!(rest, "postgres://db/ct?sslmode=require");
        assert!(tls.mode.is_none() && tls.root.is_none());
        assert_eq!(
            split_tls_options("postgres://db/ct").unwrap().0,
            "postgres://db/ct"
        );
    }

    #[test]
    fn modes_follow_libpq() {
        let mode = |url: &str| Target::parse(url).unwrap().mode;
        assert_eq!(mode("postgres://db/ct"), Mode::Plain);
        assert_eq!(mode("postgres://db/ct?sslmode=prefer"), Mode::Plain);
        assert_eq!(mode("postgres://db/ct?sslmode=disable"), Mode::Plain);
        assert_eq!(mode("postgres://db/ct?sslmode=require"), Mode::Require);
        assert_eq!(mode("host=db dbname=ct sslmode=require"), Mode::Require);
        let ca = tempfile::NamedTempFile::new().unwrap();
        let cert = rcgen::generate_simple_self_signed(vec!["db".into()]).unwrap();
        std::fs::write(ca.path(), cert.cert.pem()).unwrap();
        let root = ca.path().display();
        assert_eq!(
            mode(&format!(
                "postgres://db/ct?sslmode=require&sslrootcert={root}"
            )),
            Mode::VerifyCa
        );
        assert_eq!(
            mode(&format!(
                "postgres://db/ct?sslmode=verify-ca&sslrootcert={root}"
            )),
            Mode::VerifyCa
        );
        assert_eq!(
            mode(&format!(
                "postgres://db/ct?sslmode=verify-full&sslrootcert={root}"
            )),
            Mode::VerifyFull
        );
    }

    #[test]
    fn what_cannot_be_honoured_is_an_error_that_says_what_to_do() {
        let err = |url: &str| format!("{:#}", Target::parse(url).unwrap_err());
        assert!(err("postgres://db/ct?sslcert=/c.pem&sslkey=/k.pem").contains("client certificate"));
        assert!(err("host=db sslmode=verify-full").contains("postgres:// URL"));
        assert!(
            err("postgres://db/ct?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem")
                .contains("reading sslrootcert /nonexistent/ca.pem")
        );
        let empty = tempfile::NamedTempFile::new().unwrap();
        assert!(err(&format!(
            "postgres://db/ct?sslmode=verify-ca&sslrootcert={}",
            empty.path().display()
        ))
        .contains("holds no PEM certificate"));
        assert!(err("postgres://db/ct?sslmode=bogus").contains("reading the database URL"));
        assert!(err("postgres://db/ct?sslrootcert=system").contains("add sslmode=verify-full"));
    }

    /// A CA, and a server certificate it signed for `localhost` only.
    fn pki() -> (String, String, String) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        (ca.pem(), cert.pem(), key.serialize_pem())
    }

    /// Whether the connection `url` makes is encrypted, as the server sees it.
    fn encrypted(url: &str) -> Result<bool> {
        let mut client = Target::parse(url)?.connect()?;
        let row = client.query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )?;
        Ok(row.get(0))
    }

    #[test]
    fn each_mode_against_a_real_server_that_speaks_tls() {
        let (ca, cert, key) = pki();
        let server = ct_testkit::postgres::PgServer::start_tls(&cert, &key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, &ca).unwrap();
        let other_ca = dir.path().join("other.pem");
        std::fs::write(&other_ca, pki().0).unwrap();
        let port = server.port();
        let url =
            |host: &str, query: &str| format!("postgres://postgres@{host}:{port}/postgres?{query}");
        let root = format!("sslrootcert={}", ca_file.display());

        assert!(
            !encrypted(&url("127.0.0.1", "")).unwrap(),
            "no sslmode: in the clear, as before"
        );
        assert!(encrypted(&url("127.0.0.1", "sslmode=require")).unwrap());
        assert!(encrypted(&url("localhost", &format!("sslmode=verify-full&{root}"))).unwrap());
        // verify-ca does not compare names: the address is not in the certificate, the chain is good.
        assert!(encrypted(&url("127.0.0.1", &format!("sslmode=verify-ca&{root}"))).unwrap());
        // require with a root is verify-ca, as in libpq.
        assert!(encrypted(&url("127.0.0.1", &format!("sslmode=require&{root}"))).unwrap());

        // The store itself (its migrations, then its pool) connects the same way.
        let store =
            super::super::PgStore::open(&url("localhost", &format!("sslmode=verify-full&{root}")))
                .expect("a store over verify-full TLS");
        use crate::store::Store as _;
        assert!(store.agents().unwrap().is_empty());
        let mut admin = Target::parse(&url("127.0.0.1", ""))
            .unwrap()
            .connect()
            .unwrap();
        let row = admin
            .query_one(
                "SELECT count(*) FILTER (WHERE ssl), count(*) FILTER (WHERE NOT ssl) \
                 FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE application_name = 'ct-relay'",
                &[],
            )
            .unwrap();
        let (tls, plain): (i64, i64) = (row.get(0), row.get(1));
        assert!(
            tls >= 1 && plain == 0,
            "the store's connections: {tls} encrypted, {plain} not"
        );
        drop(store);

        // What each check is for: a certificate for another name, or from another CA, is refused.
        let refused = |u: String| format!("{:#}", encrypted(&u).unwrap_err());
        let e = refused(url("127.0.0.1", &format!("sslmode=verify-full&{root}")));
        assert!(
            e.contains("not valid for name") || e.contains("NotValidForName"),
            "{e}"
        );
        let e = refused(url(
            "localhost",
            &format!("sslmode=verify-full&sslrootcert={}", other_ca.display()),
        ));
        assert!(e.contains("invalid peer certificate"), "{e}");
        let e = refused(url(
            "127.0.0.1",
            &format!("sslmode=require&sslrootcert={}", other_ca.display()),
        ));
        assert!(e.contains("invalid peer certificate"), "{e}");
    }

    #[test]
    fn require_against_a_server_without_tls_fails_rather_than_connect_in_the_clear() {
        let server = ct_testkit::postgres::PgServer::shared();
        let url = format!("{}?sslmode=require", server.url());
        let e = format!("{:#}", encrypted(&url).unwrap_err());
        assert!(e.to_lowercase().contains("tls") || e.contains("ssl"), "{e}");
        assert!(!encrypted(&server.url()).unwrap());
    }
}
