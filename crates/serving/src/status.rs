//! The one place engine errors become gRPC and HTTP status codes. Both matches are exhaustive
//! over [`ErrorKind`]: a new kind does not compile until it has its codes here.

use axum::http::StatusCode;
use strata_core::{ErrorKind, StrataError};

/// gRPC status for an engine error; the message is the error's own text, and the
/// `strata-error-kind` header carries its kind to a downstream tier.
pub fn to_grpc(err: &StrataError) -> tonic::Status {
    use tonic::Code;
    let code = match err.kind() {
        ErrorKind::Parse | ErrorKind::Plan | ErrorKind::Config | ErrorKind::InvalidRequest => Code::InvalidArgument,
        ErrorKind::ReadOnly | ErrorKind::Forbidden => Code::PermissionDenied,
        ErrorKind::NotSupported => Code::Unimplemented,
        ErrorKind::UnknownDataset => Code::NotFound,
        ErrorKind::DatasetUnavailable | ErrorKind::Source | ErrorKind::UpstreamUnavailable => Code::Unavailable,
        ErrorKind::ResourcesExhausted | ErrorKind::Overloaded | ErrorKind::LogFull => Code::ResourceExhausted,
        ErrorKind::Timeout => Code::DeadlineExceeded,
        // Another tier broke the protocol: this tier's answer depends on a peer that failed it.
        ErrorKind::Protocol => Code::Unavailable,
        // This replica's disk failed: another replica may answer.
        ErrorKind::Storage => Code::Unavailable,
        // The request's own condition (a cached answer) does not hold; retrying will not
        // change that until someone else runs the query.
        ErrorKind::NotCached => Code::FailedPrecondition,
        ErrorKind::Execution | ErrorKind::Internal => Code::Internal,
    };
    let mut status = tonic::Status::new(code, err.to_string());
    if let Ok(value) = err.kind().as_str().parse() {
        status.metadata_mut().insert(strata_upstream::wire::ERROR_KIND_HEADER, value);
    }
    status
}

/// HTTP status for an engine error.
pub fn to_http(err: &StrataError) -> StatusCode {
    match err.kind() {
        ErrorKind::Parse | ErrorKind::Plan | ErrorKind::Config | ErrorKind::InvalidRequest => StatusCode::BAD_REQUEST,
        ErrorKind::ReadOnly | ErrorKind::Forbidden => StatusCode::FORBIDDEN,
        ErrorKind::NotSupported => StatusCode::NOT_IMPLEMENTED,
        ErrorKind::UnknownDataset => StatusCode::NOT_FOUND,
        ErrorKind::DatasetUnavailable | ErrorKind::Source | ErrorKind::UpstreamUnavailable | ErrorKind::LogFull => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        ErrorKind::Overloaded => StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::ResourcesExhausted => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
        ErrorKind::Protocol => StatusCode::BAD_GATEWAY,
        ErrorKind::Storage => StatusCode::SERVICE_UNAVAILABLE,
        // RFC 9111 5.2.1.7: a cache that cannot satisfy `only-if-cached` answers 504.
        ErrorKind::NotCached => StatusCode::GATEWAY_TIMEOUT,
        ErrorKind::Execution | ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// Short machine-readable name of the error kind, for JSON bodies and metrics labels.
pub fn kind(err: &StrataError) -> &'static str {
    err.kind().as_str()
}
