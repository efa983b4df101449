//! Mutual TLS with rustls: the node's certificate and key, the listeners' server configs, and the
//! connector its peer channels dial with.
//!
//! Both ends of a peer connection check the other's certificate for more than a valid chain: it
//! must name a node of the cluster's trust domain (`spiffe://<domain>/node/<id>`) and carry the
//! cluster's jurisdiction as its subject country. The dialing side checks it in
//! [`PeerVerifier`] during the handshake; the listening side in the authorization layer
//! (`auth.rs`) before any peer RPC runs. A node also checks its own certificate at start: one
//! whose identity or country disagrees with its configuration does not start.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use hyper_util::rt::TokioIo;
use residency_types::{Identity, Jurisdiction, Principal};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tonic::transport::{Certificate, ServerTlsConfig};

use crate::config::{ClientCertificates, ValidConfig, ValidTls};

/// What a verified certificate says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertIdentity {
    pub identity: Identity,
    /// The subject's country (`C=`), if it has one: a node's jurisdiction.
    pub country: Option<String>,
}

/// Why a certificate names nobody we accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertIdentityError {
    #[error("the certificate cannot be parsed")]
    Unparsable,
    #[error("the certificate carries no spiffe:// URI SAN")]
    NoIdentity,
    #[error("the certificate carries more than one spiffe:// URI SAN")]
    ManyIdentities,
    #[error("the certificate's identity is malformed: {0}")]
    Malformed(String),
}

/// The identity in a certificate's single `spiffe://` URI SAN and its subject country. The chain
/// was verified by rustls before this runs.
pub fn cert_identity(der: &[u8]) -> Result<CertIdentity, CertIdentityError> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|_| CertIdentityError::Unparsable)?;
    let mut uris = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name
                && uri.starts_with("spiffe://")
            {
                uris.push(*uri);
            }
        }
    }
    let uri = match uris.as_slice() {
        [] => return Err(CertIdentityError::NoIdentity),
        [uri] => *uri,
        _ => return Err(CertIdentityError::ManyIdentities),
    };
    let identity =
        Identity::parse(uri).map_err(|error| CertIdentityError::Malformed(error.to_string()))?;
    let country = cert
        .subject()
        .iter_country()
        .next()
        .and_then(|attribute| attribute.as_str().ok())
        .map(str::to_string);
    Ok(CertIdentity { identity, country })
}

/// Whether a certificate's holder may talk on the peer port: a node of `trust_domain` whose
/// country is `jurisdiction`. Returns the node id.
pub fn peer_node(
    holder: &CertIdentity,
    trust_domain: &str,
    jurisdiction: Jurisdiction,
) -> Result<u64, String> {
    let Principal::Node(id) = holder.identity.principal() else {
        return Err(format!(
            "{} is not a node: only nodes talk on the peer port",
            holder.identity
        ));
    };
    if holder.identity.trust_domain() != trust_domain {
        return Err(format!(
            "{} is not of this cluster's trust domain {trust_domain}",
            holder.identity
        ));
    }
    match holder.country.as_deref() {
        Some(country) if country == jurisdiction.as_str() => Ok(*id),
        Some(country) => Err(format!(
            "node certificate {} is for jurisdiction {country}; this cluster admits only {jurisdiction}",
            holder.identity
        )),
        None => Err(format!(
            "node certificate {} names no jurisdiction (subject C=)",
            holder.identity
        )),
    }
}

/// The node's TLS material, loaded and checked once at start.
#[derive(Debug, Clone)]
pub struct NodeTls {
    settings: ValidTls,
    ca_pem: Vec<u8>,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    peer_client: Arc<rustls::ClientConfig>,
}

fn read(path: &std::path::Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read the {what} {}", path.display()))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs ring as the process's rustls provider (tonic's configs use the process default).
pub fn install_crypto_provider() {
    // Fails only when a provider is installed already, which is as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl NodeTls {
    /// Loads the CA, the node's certificate and key, and checks that the certificate is this
    /// node's: `spiffe://<trust_domain>/node/<node_id>`, country = the configured jurisdiction,
    /// which must be the cluster's.
    pub fn load(config: &ValidConfig, settings: &ValidTls) -> anyhow::Result<NodeTls> {
        install_crypto_provider();
        let ca_pem = read(&settings.ca_file, "CA certificate (tls.ca_file)")?;
        let cert_pem = read(&settings.cert_file, "node certificate (tls.cert_file)")?;
        let key_pem = read(&settings.key_file, "node key (tls.key_file)")?;
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&ca_pem) {
            let cert = cert.context("tls.ca_file holds a malformed PEM certificate")?;
            roots
                .add(cert)
                .context("tls.ca_file holds a certificate rustls cannot use as a root")?;
        }
        anyhow::ensure!(!roots.is_empty(), "tls.ca_file holds no certificate");
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<_, _>>()
            .context("tls.cert_file holds a malformed PEM certificate")?;
        let own = chain
            .first()
            .context("tls.cert_file holds no certificate")?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .context("tls.key_file holds no PEM private key")?;
        let holder = cert_identity(own).context("tls.cert_file")?;
        let expected = Identity::node(&settings.trust_domain, config.node_id)
            .context("the node's identity")?;
        anyhow::ensure!(
            holder.identity == expected,
            "tls.cert_file is the certificate of {}, but this node is {expected}",
            holder.identity
        );
        anyhow::ensure!(
            holder.country.as_deref() == Some(config.jurisdiction.as_str()),
            "tls.cert_file's subject country is {:?}, but the node's jurisdiction is {}",
            holder.country,
            config.jurisdiction
        );
        peer_node(
            &holder,
            &settings.trust_domain,
            config.required_jurisdiction,
        )
        .map_err(anyhow::Error::msg)
        .context("this node may not join this cluster")?;
        // The chain must verify against the CA, or peers would refuse us on every connection.
        let parsed = ParsedCertificate::try_from(own).context("tls.cert_file")?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &chain[1..],
            UnixTime::now(),
            provider().signature_verification_algorithms.all,
        )
        .map_err(|error| {
            anyhow::anyhow!("tls.cert_file does not verify against tls.ca_file: {error}")
        })?;
        let verifier = PeerVerifier {
            roots: Arc::new(roots),
            algorithms: provider().signature_verification_algorithms,
            trust_domain: settings.trust_domain.clone(),
            jurisdiction: config.required_jurisdiction,
        };
        let mut peer_client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("rustls protocol versions")?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(chain, key)
            .context("tls.key_file does not match tls.cert_file")?;
        peer_client.alpn_protocols = vec![b"h2".to_vec()];
        Ok(NodeTls {
            settings: settings.clone(),
            ca_pem,
            cert_pem,
            key_pem,
            peer_client: Arc::new(peer_client),
        })
    }

    pub fn settings(&self) -> &ValidTls {
        &self.settings
    }

    fn server_config(&self, client_auth_optional: bool) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(
                &self.cert_pem,
                &self.key_pem,
            ))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
            .client_auth_optional(client_auth_optional)
            .timeout(Duration::from_millis(self.settings.handshake_timeout_ms))
    }

    /// The client listener: a certificate from the CA required or optional, as configured.
    pub fn client_listener(&self) -> ServerTlsConfig {
        self.server_config(self.settings.client_certificates == ClientCertificates::Optional)
    }

    /// The peer listener: a certificate from the CA always required.
    pub fn peer_listener(&self) -> ServerTlsConfig {
        self.server_config(false)
    }

    /// What peer channels dial with.
    pub fn peer_connector(&self, connect_timeout: Duration) -> PeerConnector {
        PeerConnector {
            tls: TlsConnector::from(self.peer_client.clone()),
            connect_timeout,
        }
    }
}

/// Checks a peer's server certificate: the chain to the cluster's CA, then that it names a node
/// of the trust domain in the cluster's jurisdiction. Host names play no part: peers are dialed
/// by address, and the identity is what is checked.
#[derive(Debug)]
struct PeerVerifier {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
    trust_domain: String,
    jurisdiction: Jurisdiction,
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let refuse = |message: String| {
            tracing::warn!(%message, "refused a peer's certificate");
            rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
        };
        let holder = cert_identity(end_entity).map_err(|error| refuse(error.to_string()))?;
        peer_node(&holder, &self.trust_domain, self.jurisdiction).map_err(refuse)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
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

/// Dials a peer over TCP and TLS with the node's certificate, for tonic's
/// `connect_with_connector`.
#[derive(Clone)]
pub struct PeerConnector {
    tls: TlsConnector,
    connect_timeout: Duration,
}

impl std::fmt::Debug for PeerConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerConnector")
            .field("connect_timeout", &self.connect_timeout)
            .finish_non_exhaustive()
    }
}

impl tower::Service<http::Uri> for PeerConnector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let tls = self.tls.clone();
        let connect_timeout = self.connect_timeout;
        Box::pin(async move {
            let invalid = |message: &str| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, message.to_string())
            };
            let host = uri
                .host()
                .ok_or_else(|| invalid("a peer address has a host"))?;
            let port = uri
                .port_u16()
                .ok_or_else(|| invalid("a peer address has a port"))?;
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let tcp =
                tokio::time::timeout(connect_timeout, TcpStream::connect((host.as_str(), port)))
                    .await
                    .map_err(|_| {
                        std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "connecting to a peer timed out",
                        )
                    })??;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(host)
                .map_err(|_| invalid("a peer's host is not a name or an address"))?;
            let stream = tokio::time::timeout(connect_timeout, tls.connect(name, tcp))
                .await
                .map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the TLS handshake with a peer timed out",
                    )
                })??;
            Ok(TokioIo::new(stream))
        })
    }
}
