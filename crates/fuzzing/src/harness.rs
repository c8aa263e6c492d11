//! One engine per fuzzing process, loaded once, and the way inputs reach it: raw gRPC
//! request bodies sent through the tier's own tonic services, in process (no socket, so
//! libFuzzer runs thousands of inputs a second).

use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use strata_core::{Config, Engine};
use tokio::runtime::Runtime;
use tower::ServiceExt;

/// The longest any one input may take: a query runs at most `limits.query_timeout` (2 s
/// here), so an input still answering after this is a hang, and a finding.
const HANG: Duration = Duration::from_secs(10);

/// A platform over the example data (a CSV federated, an NDJSON file accelerated) with
/// tight limits, so an input that asks for much is refused quickly.
fn config() -> Config {
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/data");
    let yaml = format!(
        "region: fuzz\nlimits:\n  query_timeout: 2s\n  memory_limit: 256MiB\n  max_message_size: 4MiB\n  max_request_body: 4MiB\n\
         datasets:\n  - name: customers\n    from: file:{data}/customers.csv\n  - name: orders\n    from: file:{data}/orders.ndjson\n    acceleration: {{refresh: full}}\n"
    );
    Config::parse(&yaml, "the fuzzing engine").expect("the fuzzing engine's config")
}

pub(crate) struct Harness {
    pub runtime: Runtime,
    pub engine: Engine,
}

/// The process's engine, started and ready.
pub(crate) fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let engine = runtime.block_on(async {
            let engine = Engine::new(&config()).expect("the fuzzing engine");
            engine.start();
            tokio::time::timeout(Duration::from_secs(60), engine.wait_ready()).await.expect("the engine gets ready");
            engine
        });
        Harness { runtime, engine }
    })
}

/// What came back from one gRPC call.
pub(crate) struct Answer {
    /// `grpc-status`, from the headers (a trailers-only answer) or the trailers.
    pub status: Option<String>,
    pub message: Option<String>,
}

impl Answer {
    pub fn outcome(&self) -> crate::Outcome {
        match self.status.as_deref() {
            Some("0" | "streaming") => crate::Outcome::Accepted,
            status => crate::Outcome::Refused(format!(
                "grpc-status {}: {}",
                status.unwrap_or("none"),
                self.message.as_deref().unwrap_or_default()
            )),
        }
    }
}

fn header(map: &http::HeaderMap, name: &str) -> Option<String> {
    map.get(name).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// Sends `body` as the request body of gRPC method `path` to `service`, reads the whole
/// answer, and checks it is a well-formed gRPC answer within [`HANG`]. A subscription never
/// ends on its own: with `idle`, an answer that sends nothing for that long is taken as a
/// live stream and dropped (the subscriber going away).
pub(crate) async fn call<S>(service: S, path: &str, body: Bytes, idle: Option<Duration>) -> Answer
where
    S: tower::Service<
            http::Request<Full<Bytes>>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        >,
{
    let request = http::Request::post(format!("http://fuzz{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(body))
        .expect("a request");
    let exchange = async {
        let Ok(response) = service.oneshot(request).await;
        let (parts, mut body) = response.into_parts();
        let mut status = header(&parts.headers, "grpc-status");
        let mut message = header(&parts.headers, "grpc-message");
        while status.is_none() {
            let next = match idle {
                Some(idle) => match tokio::time::timeout(idle, body.frame()).await {
                    Ok(next) => next,
                    Err(_) => return Answer { status: Some("streaming".into()), message: None },
                },
                None => body.frame().await,
            };
            let Some(Ok(frame)) = next else { break };
            if let Some(trailers) = frame.trailers_ref() {
                status = header(trailers, "grpc-status");
                message = header(trailers, "grpc-message");
            }
        }
        Answer { status, message }
    };
    match tokio::time::timeout(HANG, exchange).await {
        Ok(answer) => {
            assert!(answer.status.is_some(), "{path}: the answer ended without a grpc-status");
            answer
        }
        Err(_) => panic!("{path}: no complete answer within {HANG:?}"),
    }
}

/// Frames `message` as one gRPC message: uncompressed flag, big-endian length, bytes.
pub(crate) fn grpc_frame(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 5);
    out.push(0);
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// A request body from fuzz bytes. The first byte chooses how the rest is sent: as raw
/// bytes (framing that may lie about its lengths), as one well-framed message, or as a
/// sequence of messages each prefixed by a 16-bit length (streams: DoPut, DoExchange).
pub(crate) fn request_body(mode: u8, rest: &[u8]) -> Bytes {
    match mode % 3 {
        0 => Bytes::copy_from_slice(rest),
        1 => grpc_frame(rest).into(),
        _ => chunks(rest).flat_map(grpc_frame).collect::<Vec<u8>>().into(),
    }
}

/// The pieces of `[len u16 | bytes]...` (a length past the end takes what is left), the way
/// the targets' multi-message modes read fuzz bytes.
pub(crate) fn chunks(mut rest: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        if rest.len() < 2 {
            return None;
        }
        let len = (u16::from_le_bytes([rest[0], rest[1]]) as usize).min(rest.len() - 2);
        let (chunk, after) = rest[2..].split_at(len);
        rest = after;
        Some(chunk)
    })
}
