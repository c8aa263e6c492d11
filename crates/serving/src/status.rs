//! The one place engine errors become gRPC and HTTP status codes.

use axum::http::StatusCode;
use strata_core::StrataError;

/// gRPC status for an engine error; the message is the error's own text.
pub fn to_grpc(err: &StrataError) -> tonic::Status {
    use tonic::Code;
    let code = match err {
        StrataError::Parse(_) | StrataError::Plan(_) | StrataError::Config(_) => Code::InvalidArgument,
        StrataError::ReadOnly(_) => Code::PermissionDenied,
        StrataError::NotSupported(_) => Code::Unimplemented,
        StrataError::UnknownDataset(_) => Code::NotFound,
        StrataError::DatasetUnavailable { .. } | StrataError::Source { .. } => Code::Unavailable,
        StrataError::ResourcesExhausted(_) | StrataError::Overloaded(_) => Code::ResourceExhausted,
        StrataError::Timeout(_) => Code::DeadlineExceeded,
        StrataError::Execution(_) => Code::Internal,
        StrataError::Internal(_) => Code::Internal,
    };
    tonic::Status::new(code, err.to_string())
}

/// HTTP status for an engine error.
pub fn to_http(err: &StrataError) -> StatusCode {
    match err {
        StrataError::Parse(_) | StrataError::Plan(_) | StrataError::Config(_) => StatusCode::BAD_REQUEST,
        StrataError::ReadOnly(_) => StatusCode::FORBIDDEN,
        StrataError::NotSupported(_) => StatusCode::NOT_IMPLEMENTED,
        StrataError::UnknownDataset(_) => StatusCode::NOT_FOUND,
        StrataError::DatasetUnavailable { .. } | StrataError::Source { .. } => StatusCode::SERVICE_UNAVAILABLE,
        StrataError::Overloaded(_) => StatusCode::TOO_MANY_REQUESTS,
        StrataError::ResourcesExhausted(_) => StatusCode::UNPROCESSABLE_ENTITY,
        StrataError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        StrataError::Execution(_) | StrataError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// Short machine-readable name of the error kind, for JSON bodies and metrics labels.
pub fn kind(err: &StrataError) -> &'static str {
    match err {
        StrataError::Config(_) => "config",
        StrataError::Parse(_) => "parse",
        StrataError::Plan(_) => "plan",
        StrataError::ReadOnly(_) => "read_only",
        StrataError::NotSupported(_) => "not_supported",
        StrataError::UnknownDataset(_) => "unknown_dataset",
        StrataError::DatasetUnavailable { .. } => "dataset_unavailable",
        StrataError::ResourcesExhausted(_) => "resources_exhausted",
        StrataError::Timeout(_) => "timeout",
        StrataError::Overloaded(_) => "overloaded",
        StrataError::Source { .. } => "source",
        StrataError::Execution(_) => "execution",
        StrataError::Internal(_) => "internal",
    }
}
