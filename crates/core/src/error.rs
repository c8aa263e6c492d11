//! The one error type of the engine. Its variants keep the phase visible (config, plan,
//! execution, resource limits, sources) so each interface can map it to its own status codes.

use datafusion::error::DataFusionError;

/// Everything the engine can refuse or fail with, each carrying what a user needs to fix it.
#[derive(Debug, thiserror::Error)]
pub enum StrataError {
    /// The config file is unusable; the message names file, line/field and the problem.
    #[error("{0}")]
    Config(String),

    /// The SQL does not parse; DataFusion's parser message carries the line and column.
    #[error("SQL parse error: {0}")]
    Parse(String),

    /// The SQL parses but cannot be planned (unknown table or column, type mismatch, ...).
    #[error("{0}")]
    Plan(String),

    /// A request is malformed or refused by a bound on what a tier accepts: bytes that do
    /// not decode, a shipped plan that reads anything but named tables, an input over a
    /// configured limit. The message names what is wrong (and the limit, if one).
    #[error("invalid request: {0}")]
    InvalidRequest(String),

    /// Only read queries run on the query path.
    #[error("only read-only queries are allowed; {0} statements are rejected")]
    ReadOnly(String),

    /// The statement used a feature Strata does not support.
    #[error("not supported: {0}")]
    NotSupported(String),

    /// A named dataset does not exist.
    #[error("unknown dataset `{0}`")]
    UnknownDataset(String),

    /// A dataset exists but cannot be read yet (still loading, or its source is unreachable).
    #[error("dataset `{name}` is not available: {reason}")]
    DatasetUnavailable { name: String, reason: String },

    /// A configured limit was hit; the message names the limit and its value.
    #[error("{0}")]
    ResourcesExhausted(String),

    /// The query ran past `limits.query_timeout` and was cancelled.
    #[error("query cancelled after exceeding the query timeout of {0:?} (limits.query_timeout)")]
    Timeout(std::time::Duration),

    /// Too many queries in flight; the client should retry later.
    #[error("server busy: {0} queries already running (limits.max_concurrent_queries); retry later")]
    Overloaded(usize),

    /// A source (PostgreSQL, files) failed.
    #[error("source error for dataset `{dataset}`: {message}")]
    Source { dataset: String, message: String },

    /// The upstream platform cannot be reached: down, its circuit breaker open, or the call
    /// deadline passed. Local answers are unaffected.
    #[error("upstream unavailable: {0}")]
    UpstreamUnavailable(String),

    /// A write was refused because the durable log is full; nothing was stored, retry later.
    #[error("write refused: {0}")]
    LogFull(String),

    /// Another tier refused or failed the query; `kind` is its error kind, the message its own.
    #[error("{message}")]
    Remote { kind: &'static str, message: String },

    /// Query execution failed for a reason other than the above.
    #[error("execution error: {0}")]
    Execution(String),

    /// A bug: an invariant of Strata itself was broken.
    #[error("internal error: {0}")]
    Internal(String),
}

impl StrataError {
    /// Short machine-readable name of the error kind: JSON bodies, metrics labels, and the
    /// `strata-error-kind` header that carries an error from one tier to the next.
    pub fn kind(&self) -> &'static str {
        match self {
            StrataError::Config(_) => "config",
            StrataError::Parse(_) => "parse",
            StrataError::Plan(_) => "plan",
            StrataError::InvalidRequest(_) => "invalid_request",
            StrataError::ReadOnly(_) => "read_only",
            StrataError::NotSupported(_) => "not_supported",
            StrataError::UnknownDataset(_) => "unknown_dataset",
            StrataError::DatasetUnavailable { .. } => "dataset_unavailable",
            StrataError::ResourcesExhausted(_) => "resources_exhausted",
            StrataError::Timeout(_) => "timeout",
            StrataError::Overloaded(_) => "overloaded",
            StrataError::Source { .. } => "source",
            StrataError::UpstreamUnavailable(_) => "upstream_unavailable",
            StrataError::LogFull(_) => "log_full",
            StrataError::Remote { kind, .. } => kind,
            StrataError::Execution(_) => "execution",
            StrataError::Internal(_) => "internal",
        }
    }

    /// An error another tier reported with `kind` and its full message.
    pub fn from_kind(kind: &str, message: String) -> Self {
        const KINDS: [&str; 16] = [
            "log_full",
            "invalid_request",
            "config",
            "parse",
            "plan",
            "read_only",
            "not_supported",
            "unknown_dataset",
            "dataset_unavailable",
            "resources_exhausted",
            "timeout",
            "overloaded",
            "source",
            "upstream_unavailable",
            "execution",
            "internal",
        ];
        match kind {
            "upstream_unavailable" => StrataError::UpstreamUnavailable(
                message.strip_prefix("upstream unavailable: ").unwrap_or(&message).to_string(),
            ),
            k => StrataError::Remote { kind: KINDS.into_iter().find(|x| *x == k).unwrap_or("execution"), message },
        }
    }
}

/// Result with [`StrataError`].
pub type Result<T, E = StrataError> = std::result::Result<T, E>;

impl From<DataFusionError> for StrataError {
    fn from(err: DataFusionError) -> Self {
        classify(err)
    }
}

impl From<arrow::error::ArrowError> for StrataError {
    fn from(err: arrow::error::ArrowError) -> Self {
        classify(DataFusionError::ArrowError(Box::new(err), None))
    }
}

/// Maps DataFusion's error tree to our phases, looking through context and shared wrappers
/// so a limit hit deep inside an operator still surfaces as `ResourcesExhausted`.
fn classify(err: DataFusionError) -> StrataError {
    match err {
        DataFusionError::Context(ctx, inner) => match classify(*inner) {
            StrataError::Execution(msg) => StrataError::Execution(format!("{ctx}: {msg}")),
            other => other,
        },
        DataFusionError::Diagnostic(_, inner) => classify(*inner),
        DataFusionError::Shared(inner) => classify(
            std::sync::Arc::try_unwrap(inner).unwrap_or_else(|arc| DataFusionError::Execution(arc.to_string())),
        ),
        DataFusionError::External(inner) => match inner.downcast::<StrataError>() {
            Ok(strata) => *strata,
            Err(other) => match other.downcast::<DataFusionError>() {
                Ok(df) => classify(*df),
                Err(other) => StrataError::Execution(other.to_string()),
            },
        },
        DataFusionError::ResourcesExhausted(msg) => {
            StrataError::ResourcesExhausted(format!("memory limit exceeded (limits.memory_limit): {msg}"))
        }
        DataFusionError::SQL(err, _) => StrataError::Parse(err.to_string()),
        DataFusionError::Plan(msg) => StrataError::Plan(msg),
        DataFusionError::SchemaError(err, _) => StrataError::Plan(err.to_string()),
        DataFusionError::NotImplemented(msg) => StrataError::NotSupported(msg),
        DataFusionError::Internal(msg) => StrataError::Internal(msg),
        other => StrataError::Execution(other.strip_backtrace()),
    }
}

impl From<StrataError> for DataFusionError {
    fn from(err: StrataError) -> Self {
        DataFusionError::External(Box::new(err))
    }
}
