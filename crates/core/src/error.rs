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

    /// The caller's tenant is at its own share of the tier; the message names the limit.
    #[error("{0}")]
    Throttled(String),

    /// The caller is authenticated but its tenant may not do this (operator endpoints).
    #[error("forbidden: {0}")]
    Forbidden(String),

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

    /// Another tier sent bytes that do not follow the tier protocol (a message that does not
    /// decode, a listing without names): that tier's fault or a version mismatch, not ours.
    #[error("tier protocol error: {0}")]
    Protocol(String),

    /// Another tier refused or failed the query; `kind` is its error kind, the message its own.
    #[error("{message}")]
    Remote { kind: ErrorKind, message: String },

    /// This tier's own files (replicas on disk, the edge log, the dead-letter area) could
    /// not be read or written: a full disk, a permission, a corrupt file. An operational
    /// failure, not a bug; the I/O error is kept as the source.
    #[error("{context} {}: {source}", path.display())]
    Storage {
        context: String,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The client asked for a cached answer only (`Cache-Control: only-if-cached`) and the
    /// results cache has none it may serve: nothing was run.
    #[error("not cached: {0}")]
    NotCached(String),

    /// Query execution failed for a reason other than the above.
    #[error("execution error: {0}")]
    Execution(String),

    /// A bug: an invariant of Strata itself was broken.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Declares [`ErrorKind`] with each kind's wire name once, so the name, the parser and the
/// list of kinds cannot drift apart (they were three hand-kept copies).
macro_rules! error_kinds {
    ($($(#[$doc:meta])* $kind:ident => $name:literal,)+) => {
        /// What kind of failure an error is. Each interface maps it to its status code in one
        /// exhaustive match (`strata-serving`'s `status.rs`), so a new kind cannot silently
        /// become "internal"; its name travels between tiers in the `strata-error-kind` header
        /// and appears in JSON bodies and metrics labels.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorKind {
            $($(#[$doc])* $kind,)+
        }

        impl ErrorKind {
            /// Every kind, in declaration order.
            pub const ALL: &'static [ErrorKind] = &[$(ErrorKind::$kind,)+];

            /// The kind's wire name (`unknown_dataset`).
            pub fn as_str(self) -> &'static str {
                match self {
                    $(ErrorKind::$kind => $name,)+
                }
            }

            /// The kind a wire name stands for, if any.
            pub fn from_name(name: &str) -> Option<Self> {
                match name {
                    $($name => Some(ErrorKind::$kind),)+
                    _ => None,
                }
            }
        }
    };
}

error_kinds! {
    /// The config file is unusable.
    Config => "config",
    /// The SQL does not parse.
    Parse => "parse",
    /// The SQL parses but cannot be planned.
    Plan => "plan",
    /// Malformed bytes or an input over a configured bound.
    InvalidRequest => "invalid_request",
    /// A statement other than a read on the query path.
    ReadOnly => "read_only",
    /// A feature Strata does not support.
    NotSupported => "not_supported",
    /// A named dataset does not exist.
    UnknownDataset => "unknown_dataset",
    /// A dataset exists but cannot be read yet.
    DatasetUnavailable => "dataset_unavailable",
    /// A configured resource limit was hit.
    ResourcesExhausted => "resources_exhausted",
    /// The query ran past its timeout.
    Timeout => "timeout",
    /// Too many queries in flight (on the tier, or of the caller's tenant).
    Overloaded => "overloaded",
    /// The caller's tenant may not do this.
    Forbidden => "forbidden",
    /// A source failed.
    Source => "source",
    /// The upstream tier cannot be reached.
    UpstreamUnavailable => "upstream_unavailable",
    /// The edge's durable log is full.
    LogFull => "log_full",
    /// Another tier sent a message that does not follow the tier protocol.
    Protocol => "protocol",
    /// The tier's own files could not be read or written.
    Storage => "storage",
    /// Only a cached answer was asked for, and there is none.
    NotCached => "not_cached",
    /// Execution failed otherwise.
    Execution => "execution",
    /// A bug in Strata.
    Internal => "internal",
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl StrataError {
    /// The error's kind: status codes, JSON bodies, metrics labels, and the
    /// `strata-error-kind` header that carries an error from one tier to the next.
    pub fn kind(&self) -> ErrorKind {
        match self {
            StrataError::Config(_) => ErrorKind::Config,
            StrataError::Parse(_) => ErrorKind::Parse,
            StrataError::Plan(_) => ErrorKind::Plan,
            StrataError::InvalidRequest(_) => ErrorKind::InvalidRequest,
            StrataError::ReadOnly(_) => ErrorKind::ReadOnly,
            StrataError::NotSupported(_) => ErrorKind::NotSupported,
            StrataError::UnknownDataset(_) => ErrorKind::UnknownDataset,
            StrataError::DatasetUnavailable { .. } => ErrorKind::DatasetUnavailable,
            StrataError::ResourcesExhausted(_) => ErrorKind::ResourcesExhausted,
            StrataError::Timeout(_) => ErrorKind::Timeout,
            StrataError::Overloaded(_) | StrataError::Throttled(_) => ErrorKind::Overloaded,
            StrataError::Forbidden(_) => ErrorKind::Forbidden,
            StrataError::Source { .. } => ErrorKind::Source,
            StrataError::UpstreamUnavailable(_) => ErrorKind::UpstreamUnavailable,
            StrataError::LogFull(_) => ErrorKind::LogFull,
            StrataError::Protocol(_) => ErrorKind::Protocol,
            StrataError::Remote { kind, .. } => *kind,
            StrataError::Storage { .. } => ErrorKind::Storage,
            StrataError::Execution(_) => ErrorKind::Execution,
            StrataError::Internal(_) => ErrorKind::Internal,
            StrataError::NotCached(_) => ErrorKind::NotCached,
        }
    }

    /// An error another tier reported with the kind named `kind` and its full message. A
    /// name this version does not know (a newer peer) is an execution error.
    pub fn from_kind(kind: &str, message: String) -> Self {
        Self::remote(ErrorKind::from_name(kind).unwrap_or(ErrorKind::Execution), message)
    }

    /// An error of `kind` with its full message, as another tier (or an earlier run of the
    /// same query) reported it.
    pub fn remote(kind: ErrorKind, message: String) -> Self {
        match kind {
            ErrorKind::UpstreamUnavailable => StrataError::UpstreamUnavailable(
                message.strip_prefix("upstream unavailable: ").unwrap_or(&message).to_string(),
            ),
            kind => StrataError::Remote { kind, message },
        }
    }
}

impl StrataError {
    /// A failed read or write of `path`; `context` says what was being done ("replica
    /// store: cannot sync").
    pub fn storage(context: impl Into<String>, path: &std::path::Path, source: std::io::Error) -> Self {
        StrataError::Storage { context: context.into(), path: path.to_path_buf(), source }
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
        // Shared by several partitions: owned when this is the last holder, else read.
        DataFusionError::Shared(inner) => match std::sync::Arc::try_unwrap(inner) {
            Ok(owned) => classify(owned),
            Err(shared) => match shared.find_root() {
                DataFusionError::ResourcesExhausted(msg) => classify(DataFusionError::ResourcesExhausted(msg.clone())),
                _ => StrataError::Execution(shared.strip_backtrace()),
            },
        },
        DataFusionError::External(inner) => match inner.downcast::<StrataError>() {
            Ok(strata) => *strata,
            Err(other) => match other.downcast::<DataFusionError>() {
                Ok(df) => classify(*df),
                Err(other) => StrataError::Execution(other.to_string()),
            },
        },
        // A tenant's budget names its own limit (see crate::tenant_memory).
        DataFusionError::ResourcesExhausted(msg) if msg.contains(".memory_limit") => {
            StrataError::ResourcesExhausted(format!("memory limit exceeded: {msg}"))
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_through_its_name() {
        for kind in ErrorKind::ALL {
            assert_eq!(ErrorKind::from_name(kind.as_str()), Some(*kind));
            let carried = StrataError::from_kind(kind.as_str(), format!("{kind} happened"));
            assert_eq!(carried.kind(), *kind, "{carried}");
        }
        assert_eq!(StrataError::from_kind("from_a_newer_peer", "x".into()).kind(), ErrorKind::Execution);
    }

    #[test]
    fn memory_exhausted_in_an_error_shared_by_partitions_stays_a_resource_error() {
        let root = std::sync::Arc::new(DataFusionError::ResourcesExhausted(
            "Memory Exhausted while SpillPool (DiskManager is disabled)".into(),
        ));
        let _other_partition = std::sync::Arc::clone(&root);
        let err = StrataError::from(DataFusionError::Shared(root));
        assert_eq!(err.kind(), ErrorKind::ResourcesExhausted, "{err}");
        assert!(err.to_string().contains("(limits.memory_limit)"), "{err}");
    }

    #[test]
    fn a_storage_failure_keeps_its_io_error_and_is_no_bug() {
        let io = std::io::Error::new(std::io::ErrorKind::StorageFull, "no space left on device");
        let err = StrataError::storage("ingest log: cannot write", std::path::Path::new("/data/1.log"), io);
        assert_eq!(err.kind(), ErrorKind::Storage);
        assert_eq!(err.to_string(), "ingest log: cannot write /data/1.log: no space left on device");
        let source = std::error::Error::source(&err).and_then(|s| s.downcast_ref::<std::io::Error>());
        assert_eq!(source.map(std::io::Error::kind), Some(std::io::ErrorKind::StorageFull));
    }

    #[test]
    fn an_upstream_outage_stays_one_after_a_hop() {
        let err = StrataError::UpstreamUnavailable("breaker open".into());
        let carried = StrataError::from_kind(err.kind().as_str(), err.to_string());
        assert!(matches!(carried, StrataError::UpstreamUnavailable(ref m) if m == "breaker open"), "{carried:?}");
        assert_eq!(carried.to_string(), err.to_string());
    }
}
