//! The one place engine errors become gRPC and HTTP status codes.

use axum::http::StatusCode;
use strata_core::StrataError;

/// gRPC status for an engine error; the message is the error's own text, and the
/// `strata-error-kind` header carries its kind to a downstream tier.
pub fn to_grpc(err: &StrataError) -> tonic::Status {
    use tonic::Code;
    let code = match kind(err) {
        "parse" | "plan" | "config" | "invalid_request" => Code::InvalidArgument,
        "read_only" => Code::PermissionDenied,
        "not_supported" => Code::Unimplemented,
        "unknown_dataset" => Code::NotFound,
        "dataset_unavailable" | "source" | "upstream_unavailable" => Code::Unavailable,
        "resources_exhausted" | "overloaded" | "log_full" => Code::ResourceExhausted,
        "timeout" => Code::DeadlineExceeded,
        _ => Code::Internal,
    };
    let mut status = tonic::Status::new(code, err.to_string());
    if let Ok(value) = kind(err).parse() {
        status.metadata_mut().insert(strata_upstream::wire::ERROR_KIND_HEADER, value);
    }
    status
}

/// HTTP status for an engine error.
pub fn to_http(err: &StrataError) -> StatusCode {
    match kind(err) {
        "parse" | "plan" | "config" | "invalid_request" => StatusCode::BAD_REQUEST,
        "read_only" => StatusCode::FORBIDDEN,
        "not_supported" => StatusCode::NOT_IMPLEMENTED,
        "unknown_dataset" => StatusCode::NOT_FOUND,
        "dataset_unavailable" | "source" | "upstream_unavailable" | "log_full" => StatusCode::SERVICE_UNAVAILABLE,
        "overloaded" => StatusCode::TOO_MANY_REQUESTS,
        "resources_exhausted" => StatusCode::UNPROCESSABLE_ENTITY,
        "timeout" => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// Short machine-readable name of the error kind, for JSON bodies and metrics labels.
pub fn kind(err: &StrataError) -> &'static str {
    err.kind()
}
