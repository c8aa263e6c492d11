//! Authentication of every request, in front of every handler: one check shared by the gRPC
//! stack (Flight SQL, the tier protocol, reflection) and the HTTP stack, so no endpoint can
//! be added without it.
//!
//! A request is let in with `authorization: Bearer <key>` (or `x-api-key: <key>`); the
//! Flight SQL handshake also takes `Basic` credentials whose password is the key, and
//! answers with the bearer token to use (the key itself: any replica behind a load balancer
//! accepts it, no session is kept). Only `GET /health` answers without a key, and gRPC
//! reflection when `auth.public_reflection` says so. Once in, the caller's tenant replaces
//! any `strata-tenant` header it sent, so every handler reads who is asking from one place
//! that the client cannot forge. Over mutual TLS a caller may instead be known by its
//! verified client certificate's subject (`auth.certificates`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use axum::http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use futures::future::BoxFuture;
use strata_core::auth::{AuthError, KeyStore, Principal};
use tracing::debug;

use crate::route_headers::TENANT_HEADER;

/// The Flight handshake: the one call that may present `Basic` credentials.
const HANDSHAKE: &str = "/arrow.flight.protocol.FlightService/Handshake";
const REFLECTION: [&str; 2] = ["/grpc.reflection.v1.ServerReflection/", "/grpc.reflection.v1alpha.ServerReflection/"];

/// The keys of one process and what was refused, per interface.
#[derive(Debug)]
pub struct Authenticator {
    keys: KeyStore,
    refused_grpc: AtomicU64,
    refused_http: AtomicU64,
}

impl Authenticator {
    pub fn new(keys: KeyStore) -> Arc<Self> {
        Arc::new(Self { keys, refused_grpc: AtomicU64::new(0), refused_http: AtomicU64::new(0) })
    }

    /// Requests refused for missing or invalid credentials: (gRPC, HTTP).
    pub fn refused(&self) -> (u64, u64) {
        (self.refused_grpc.load(Ordering::Relaxed), self.refused_http.load(Ordering::Relaxed))
    }

    /// Lets a gRPC call in or says why not, marking the caller's tenant on it.
    fn admit_grpc<B>(&self, request: &mut Request<B>) -> Result<(), AuthError> {
        let path = request.uri().path();
        if self.keys.public_reflection() && REFLECTION.iter().any(|p| path.starts_with(p)) {
            return Ok(());
        }
        let handshake = path == HANDSHAKE;
        let headers = request.headers();
        let sent_key = headers.contains_key(header::AUTHORIZATION) || headers.contains_key("x-api-key");
        // No key, but a client certificate the TLS handshake verified: known by its subject
        // (`auth.certificates`), as a platform knows the sidecars that call it over mTLS.
        let certificate = request.extensions().get::<crate::tls::PeerCertificate>().and_then(|p| p.subject.clone());
        let principal = match certificate {
            Some(subject) if !sent_key => self.keys.verify_certificate(&subject),
            _ => self.verify(headers, handshake),
        };
        self.finish(principal, request, &self.refused_grpc)
    }

    /// Lets an HTTP request in or says why not. `/health` needs no key (probes and load
    /// balancers must see a live process), nor does `/v1/ready` when none is sent: a
    /// Kubernetes probe cannot carry a secret. Anonymous, it says ready or not and lists no
    /// dataset; with a key, the key is checked and the caller's pending datasets are listed.
    fn admit_http<B>(&self, request: &mut Request<B>) -> Result<(), AuthError> {
        let path = request.uri().path();
        if path == "/health" {
            return Ok(());
        }
        let headers = request.headers();
        let sent_key = headers.contains_key(header::AUTHORIZATION) || headers.contains_key("x-api-key");
        if path == "/v1/ready" && !sent_key {
            // No tenant: it sees nothing (and none the client names).
            request.headers_mut().remove(TENANT_HEADER);
            return Ok(());
        }
        let principal = self.verify(request.headers(), false);
        self.finish(principal, request, &self.refused_http)
    }

    fn verify(&self, headers: &HeaderMap, basic_allowed: bool) -> Result<Principal, AuthError> {
        let authorization = headers.get(header::AUTHORIZATION).map(HeaderValue::as_bytes);
        if basic_allowed && let Some(password) = authorization.and_then(strata_core::auth::basic_password) {
            return self.keys.verify(&password);
        }
        self.keys.verify_header(authorization, headers.get("x-api-key").map(HeaderValue::as_bytes))
    }

    fn finish<B>(
        &self,
        principal: Result<Principal, AuthError>,
        request: &mut Request<B>,
        refused: &AtomicU64,
    ) -> Result<(), AuthError> {
        match principal {
            Ok(principal) => {
                // Header values are visible ASCII; tenant names come from the config.
                let tenant = HeaderValue::from_str(&principal.tenant).map_err(|_| AuthError::Invalid)?;
                request.headers_mut().insert(TENANT_HEADER, tenant);
                request.extensions_mut().insert(principal);
                Ok(())
            }
            Err(err) => {
                refused.fetch_add(1, Ordering::Relaxed);
                debug!(path = %request.uri().path(), error = %err, "request refused: credentials");
                Err(err)
            }
        }
    }
}

/// The credential a Flight SQL handshake presented, to hand back as its bearer token (the
/// authentication layer already verified it; without `auth:` any credential is accepted and
/// a random token returned, so clients that always authenticate can connect).
pub fn handshake_token(metadata: &tonic::metadata::MetadataMap) -> Option<String> {
    let value = metadata.get("authorization")?.as_bytes();
    let token = match strata_core::auth::basic_password(value) {
        Some(password) => password,
        None => strata_core::auth::bearer(value)?.to_vec(),
    };
    String::from_utf8(token).ok()
}

/// The tower layer of the gRPC stack.
#[derive(Clone)]
pub struct GrpcAuthLayer {
    auth: Arc<Authenticator>,
    /// Only keys of this tenant are let in (the cluster's worker service).
    only: Option<Arc<str>>,
}

impl GrpcAuthLayer {
    /// Lets in any valid key.
    pub fn new(auth: Arc<Authenticator>) -> Self {
        Self { auth, only: None }
    }

    /// Lets in only keys (or certificates) of `tenant`; any other is refused as invalid,
    /// whatever it may query elsewhere.
    pub fn only(auth: Arc<Authenticator>, tenant: &str) -> Self {
        Self { auth, only: Some(tenant.into()) }
    }
}

impl<S> tower::Layer<S> for GrpcAuthLayer {
    type Service = GrpcAuth<S>;
    fn layer(&self, inner: S) -> GrpcAuth<S> {
        GrpcAuth { auth: Arc::clone(&self.auth), only: self.only.clone(), inner }
    }
}

/// Refuses unauthenticated calls with UNAUTHENTICATED before any handler runs.
#[derive(Clone)]
pub struct GrpcAuth<S> {
    auth: Arc<Authenticator>,
    only: Option<Arc<str>>,
    inner: S,
}

impl<S, B> tower::Service<Request<B>> for GrpcAuth<S>
where
    S: tower::Service<Request<B>, Response = Response<tonic::body::Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let admitted = self.auth.admit_grpc(&mut request).and_then(|()| match &self.only {
            Some(tenant) if request.extensions().get::<Principal>().is_none_or(|p| p.tenant != *tenant) => {
                self.auth.refused_grpc.fetch_add(1, Ordering::Relaxed);
                Err(AuthError::Invalid)
            }
            _ => Ok(()),
        });
        match admitted {
            Ok(()) => Box::pin(self.inner.call(request)),
            Err(err) => {
                let response = tonic::Status::unauthenticated(err.to_string()).into_http();
                Box::pin(async move { Ok(response) })
            }
        }
    }
}

/// The HTTP stack's check, as axum middleware: 401 with `WWW-Authenticate: Bearer`.
pub async fn http_middleware(
    axum::extract::State(auth): axum::extract::State<Arc<Authenticator>>,
    mut request: Request<axum::body::Body>,
    next: axum::middleware::Next,
) -> Response<axum::body::Body> {
    use axum::response::IntoResponse;
    match auth.admit_http(&mut request) {
        Ok(()) => next.run(request).await,
        Err(err) => {
            let body = serde_json::json!({"error": {"kind": "unauthenticated", "message": err.to_string()}});
            let mut response = (StatusCode::UNAUTHORIZED, axum::Json(body)).into_response();
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            response
        }
    }
}
