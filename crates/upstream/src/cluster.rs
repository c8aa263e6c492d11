//! A platform replica's view of its cluster (`cluster:`): which replicas' worker services may
//! take tasks now, and the connections to them.
//!
//! Members come from a static list and/or a DNS name (a Kubernetes headless Service lists
//! every ready pod), resolved again every `refresh`. Each candidate is asked its version
//! (datafusion-distributed's `GetWorkerInfo`) on every refresh; only those that answer with
//! this replica's version take tasks, so during a rolling deploy the old and new builds never
//! exchange plan fragments, and a replica that stopped answering drops out within a refresh.
//! The planner reads the list synchronously, so it is kept in memory and swapped whole.

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use datafusion::error::DataFusionError;
use datafusion_distributed::grpc::{BoxCloneSyncChannel, create_worker_client};
use datafusion_distributed::{ChannelResolver, GetWorkerInfoRequest, WorkerChannel};
use strata_core::StrataError;
use strata_core::config::ClusterConfig;
use strata_core::engine::ClusterMembers;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tracing::{info, warn};
use url::Url;

use crate::credential::Credential;

/// Connections to the other replicas' worker services: one lazily connected HTTP/2 channel
/// per URL, with the cluster's connect timeout and keepalive (a frozen replica's PINGs go
/// unanswered and its calls fail instead of hanging), carrying the replicas' credential.
#[derive(Clone)]
pub struct WorkerChannels {
    channels: Arc<RwLock<std::collections::HashMap<Url, BoxCloneSyncChannel>>>,
    connect_timeout: Duration,
    keepalive: Duration,
    credential: Credential,
    /// `cluster.tls`: connections to `https://` workers.
    tls: Option<crate::tls::TlsConnector>,
}

impl WorkerChannels {
    pub fn new(config: &ClusterConfig) -> Result<Self, StrataError> {
        Ok(Self {
            channels: Arc::default(),
            connect_timeout: config.connect_timeout,
            keepalive: config.keepalive,
            credential: Credential::new(config.credential.as_deref(), config.credential_file.as_deref(), "cluster")?,
            tls: match &config.tls {
                Some(files) => Some(crate::tls::TlsConnector::new(
                    crate::tls::ClientTls::new(files, "cluster")?,
                    config.connect_timeout,
                )),
                None => None,
            },
        })
    }

    fn channel(&self, url: &Url) -> Result<BoxCloneSyncChannel, DataFusionError> {
        if let Some(channel) = self.channels.read().unwrap_or_else(|p| p.into_inner()).get(url) {
            return Ok(channel.clone());
        }
        let endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| DataFusionError::Configuration(format!("worker URL `{url}`: {e}")))?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(self.keepalive)
            .keep_alive_timeout(self.keepalive)
            .keep_alive_while_idle(true);
        let channel: Channel = match &self.tls {
            Some(tls) => endpoint.connect_with_connector_lazy(tls.clone()),
            None => endpoint.connect_lazy(),
        };
        let credential = self.credential.clone();
        let channel = BoxCloneSyncChannel::new(
            tower::ServiceBuilder::new()
                .map_request(move |mut request: tonic::codegen::http::Request<tonic::body::Body>| {
                    if let Some(Ok(key)) =
                        credential.current().map(|k| tonic::codegen::http::HeaderValue::from_bytes(k.as_bytes()))
                    {
                        request.headers_mut().insert("authorization", key);
                    }
                    request
                })
                .service(channel),
        );
        let mut channels = self.channels.write().unwrap_or_else(|p| p.into_inner());
        Ok(channels.entry(url.clone()).or_insert(channel).clone())
    }
}

#[async_trait]
impl ChannelResolver for WorkerChannels {
    async fn get_worker_client_for_url(&self, url: &Url) -> Result<Box<dyn WorkerChannel>, DataFusionError> {
        Ok(create_worker_client(self.channel(url)?))
    }
}

/// The replicas that take tasks now, found and checked in the background.
pub struct Replicas {
    self_url: Url,
    version: String,
    static_workers: Vec<Url>,
    dns: Option<String>,
    /// `https` with `cluster.tls`, for the addresses `dns` resolves to.
    scheme: &'static str,
    probe_timeout: Duration,
    channels: WorkerChannels,
    /// The other replicas that answered with this version at the last check.
    compatible: RwLock<Vec<Url>>,
}

impl Replicas {
    /// Checks the members once now (so a query right after start sees them), then again every
    /// `cluster.refresh` until `stop`.
    pub async fn start(
        config: &ClusterConfig,
        self_url: Url,
        channels: WorkerChannels,
        stop: CancellationToken,
    ) -> Result<Arc<Self>, StrataError> {
        let static_workers = config
            .workers
            .iter()
            .enumerate()
            .map(|(i, w)| Url::parse(w).map_err(|e| StrataError::Config(format!("cluster.workers[{i}]: `{w}`: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let replicas = Arc::new(Self {
            self_url,
            version: config.version(),
            static_workers,
            dns: config.dns.clone(),
            scheme: if config.tls.is_some() { "https" } else { "http" },
            probe_timeout: config.connect_timeout,
            channels,
            compatible: RwLock::new(Vec::new()),
        });
        replicas.check().await;
        let (background, every) = (Arc::clone(&replicas), config.refresh);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(every) => background.check().await,
                }
            }
        });
        Ok(replicas)
    }

    /// The candidates now: the static list and what `dns` resolves to, without this replica.
    async fn candidates(&self) -> BTreeSet<Url> {
        let mut urls: BTreeSet<Url> = self.static_workers.iter().cloned().collect();
        if let Some(dns) = &self.dns {
            match tokio::net::lookup_host(dns.as_str()).await {
                Ok(addrs) => urls.extend(addrs.filter_map(|a| Url::parse(&format!("{}://{a}", self.scheme)).ok())),
                Err(err) => {
                    warn!(dns = %dns, error = %err, "cluster.dns does not resolve; keeping the static workers only")
                }
            }
        }
        urls.remove(&self.self_url);
        urls
    }

    /// Asks every candidate its version (at once, each within the connect timeout) and keeps
    /// those that answer with ours.
    async fn check(&self) {
        let candidates = self.candidates().await;
        let answers = futures::future::join_all(candidates.iter().map(|url| self.version_of(url))).await;
        let mut compatible = Vec::new();
        for (url, answer) in candidates.iter().zip(answers) {
            match answer {
                Some(version) if version == self.version => compatible.push(url.clone()),
                Some(version) => {
                    warn!(worker = %url, %version, ours = %self.version, "leaving out a replica of another version")
                }
                None => {}
            }
        }
        let mut current = self.compatible.write().unwrap_or_else(|p| p.into_inner());
        if *current != compatible {
            info!(workers = ?compatible.iter().map(Url::as_str).collect::<Vec<_>>(), "cluster members changed");
            *current = compatible;
        }
    }

    async fn version_of(&self, url: &Url) -> Option<String> {
        let mut client = self.channels.get_worker_client_for_url(url).await.ok()?;
        let ask = client.get_worker_info(GetWorkerInfoRequest {});
        match tokio::time::timeout(self.probe_timeout, ask).await {
            Ok(Ok(info)) => Some(info.version),
            Ok(Err(err)) => {
                tracing::debug!(worker = %url, error = %err, "worker did not answer");
                None
            }
            Err(_) => None,
        }
    }
}

impl Replicas {
    /// How many replicas take tasks now, this one included (for logs).
    pub fn workers_now(&self) -> usize {
        self.workers().len()
    }
}

#[async_trait]
impl ClusterMembers for Replicas {
    /// This replica first, then the others that answered with its version.
    fn workers(&self) -> Vec<Url> {
        let others = self.compatible.read().unwrap_or_else(|p| p.into_inner());
        std::iter::once(self.self_url.clone()).chain(others.iter().cloned()).collect()
    }

    async fn recheck(&self) {
        self.check().await;
    }
}
