//! The HTTPS server: every connection must present a certificate signed by
//! the cluster CA (rustls verifies it during the handshake), and the verified
//! identity travels with each request as an extension.
//!
//! Written over tokio-rustls + hyper-util by hand rather than with a
//! ready-made TLS server wrapper because handlers need the peer's verified
//! certificate (for audit and, later, role checks), which those wrappers do
//! not hand to axum.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use ferry_pki::PeerIdentity;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;
use tracing::{debug, info};

/// A client gets this long to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `router` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let acceptor = TlsAcceptor::from(tls);
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer_addr) = tokio::select! {
            _ = &mut shutdown => {
                info!("shutting down the API listener");
                return;
            }
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    debug!(%error, "accept failed");
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    info!(%peer_addr, %error, "TLS handshake refused");
                    return;
                }
                Err(_) => {
                    info!(%peer_addr, "TLS handshake timed out");
                    return;
                }
            };
            let identity = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .and_then(|cert| PeerIdentity::from_der(cert.as_ref()).ok());
            let Some(identity) = identity else {
                // rustls already required a CA-signed certificate; one we
                // cannot read is refused all the same.
                info!(%peer_addr, "client certificate without a Ferry identity refused");
                return;
            };
            debug!(%peer_addr, peer = %identity.name, "connection");
            let identity = Arc::new(identity);
            let service = hyper::service::service_fn(
                move |mut request: hyper::Request<hyper::body::Incoming>| {
                    request.extensions_mut().insert(identity.clone());
                    router.clone().oneshot(request)
                },
            );
            if let Err(error) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await
            {
                debug!(%peer_addr, %error, "connection ended with an error");
            }
        });
    }
}
