//! API keys and tenants: who may call a tier, and which datasets each caller sees.
//!
//! Keys are long random secrets (`strata keygen`); the config stores only their SHA-256, so a
//! leaked config does not leak a key. A key of 256 random bits needs no slow hash: there is
//! nothing to brute-force, and a fast hash keeps authentication off the lookup path's budget.
//! A presented key is hashed once and compared with *every* stored hash in constant time, so
//! neither the time taken nor the error says which key came close, or whether the key was
//! unknown rather than expired.
//!
//! A key belongs to a tenant; `tenants:` grants each tenant datasets by name or glob. The
//! engine enforces the grants on every query and listing (see [`Access`]); a dataset the
//! caller is not granted behaves exactly like one that does not exist.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::SystemTime;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// `auth:` in strata.yaml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// The keys accepted here. Several may belong to one tenant, so a key is rotated by
    /// adding its successor, moving clients over, then removing it (or letting it expire).
    #[serde(default)]
    pub keys: Vec<ApiKeyConfig>,
    /// Whether gRPC server reflection answers without a key (it lists service and message
    /// names, no data). Off by default: everything but `GET /health` needs a key.
    #[serde(default)]
    pub public_reflection: bool,
    /// Callers known by their TLS client certificate (mutual TLS, `server.tls.client_ca_file`)
    /// rather than a key: a verified certificate whose subject common name is listed acts
    /// for its tenant. A key sent on the same call wins.
    #[serde(default)]
    pub certificates: Vec<CertificateIdentity>,
}

/// A client certificate subject and the tenant it acts for.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateIdentity {
    /// The certificate's subject common name (`CN`), e.g. `sidecar-eu-1`.
    pub subject: String,
    pub tenant: String,
}

/// One accepted API key, stored as its hash.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// Names the key in logs and errors of the config; never the secret.
    pub id: String,
    /// The tenant the key acts for (one of `tenants:`).
    pub tenant: String,
    /// `sha256:` and the 64 hex digits of the key's SHA-256 (what `strata keygen` prints).
    pub hash: String,
    /// When the key stops working, RFC 3339 (`2027-01-31T00:00:00Z`); none: never.
    #[serde(default)]
    pub expires: Option<String>,
}

/// One tenant in `tenants:`: what its keys may read and how much of the tier they may use.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Dataset names or globs (`*` matches any run of characters: `eu.*`, `*`), compared
    /// without regard to case.
    #[serde(default)]
    pub datasets: Vec<String>,
    /// Queries of this tenant running at once; more are refused (RESOURCE_EXHAUSTED / 429).
    #[serde(default)]
    pub max_concurrent_queries: Option<usize>,
    /// Rows one answer may return to this tenant (at most `limits.max_result_rows`).
    #[serde(default)]
    pub max_result_rows: Option<u64>,
    /// Query memory all of this tenant's running queries may hold together (`512MiB`),
    /// within the shared `limits.memory_limit`; past it a query fails with RESOURCES
    /// EXHAUSTED naming this limit, and other tenants' queries are unaffected.
    #[serde(default)]
    pub memory_limit: Option<crate::config::ByteSize>,
    /// May use the operator endpoints: `/metrics`, refreshes on demand, and the whole
    /// `/v1/datasets` status (dead letters, upstream endpoints). For Prometheus and on-call.
    #[serde(default)]
    pub operator: bool,
}

/// Why a request was refused. Deliberately vague: the client learns that its credentials
/// were refused, never which part (unknown key, expired key, malformed header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("authentication required: send `authorization: Bearer <api key>`")]
    Missing,
    #[error("invalid credentials")]
    Invalid,
}

/// Who a request authenticated as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The key's `id` (for logs).
    pub key_id: Arc<str>,
    pub tenant: Arc<str>,
}

struct StoredKey {
    digest: [u8; 32],
    expires: Option<SystemTime>,
    principal: Principal,
}

/// The accepted keys, ready to verify presented ones.
pub struct KeyStore {
    keys: Vec<StoredKey>,
    public_reflection: bool,
    certificates: HashMap<String, Principal>,
}

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyStore").field("keys", &self.keys.len()).finish()
    }
}

impl KeyStore {
    /// Builds the store from checked config (see [`check`]).
    pub fn new(config: &AuthConfig) -> Result<Self, String> {
        let keys = config
            .keys
            .iter()
            .enumerate()
            .map(|(i, key)| {
                let at = format!("auth.keys[{i}] (`{}`)", key.id);
                Ok(StoredKey {
                    digest: parse_hash(&key.hash).map_err(|m| format!("{at}.hash: {m}"))?,
                    expires: key
                        .expires
                        .as_deref()
                        .map(parse_expiry)
                        .transpose()
                        .map_err(|m| format!("{at}.expires: {m}"))?,
                    principal: Principal { key_id: key.id.as_str().into(), tenant: key.tenant.as_str().into() },
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let certificates = config
            .certificates
            .iter()
            .map(|c| {
                let principal =
                    Principal { key_id: format!("certificate:{}", c.subject).into(), tenant: c.tenant.as_str().into() };
                (c.subject.clone(), principal)
            })
            .collect();
        Ok(Self { keys, public_reflection: config.public_reflection, certificates })
    }

    /// The principal of a caller whose verified client certificate has subject `subject`.
    pub fn verify_certificate(&self, subject: &str) -> Result<Principal, AuthError> {
        self.certificates.get(subject).cloned().ok_or(AuthError::Invalid)
    }

    /// Whether reflection answers without a key.
    pub fn public_reflection(&self) -> bool {
        self.public_reflection
    }

    /// The principal of a presented key. Every stored hash is compared, in constant time,
    /// whatever matches first; an expired key fails exactly like an unknown one.
    pub fn verify(&self, presented: &[u8]) -> Result<Principal, AuthError> {
        if presented.is_empty() {
            return Err(AuthError::Missing);
        }
        let digest: [u8; 32] = Sha256::digest(presented).into();
        let mut found: Option<&StoredKey> = None;
        for key in &self.keys {
            if bool::from(key.digest[..].ct_eq(&digest[..])) {
                found = Some(key);
            }
        }
        let key = found.ok_or(AuthError::Invalid)?;
        if key.expires.is_some_and(|at| SystemTime::now() >= at) {
            return Err(AuthError::Invalid);
        }
        Ok(key.principal.clone())
    }

    /// The principal of an `authorization` header value (`Bearer <key>`, the scheme in any
    /// case) or of an `x-api-key` value.
    pub fn verify_header(&self, authorization: Option<&[u8]>, api_key: Option<&[u8]>) -> Result<Principal, AuthError> {
        match (authorization, api_key) {
            (Some(value), _) => self.verify(bearer(value).ok_or(AuthError::Invalid)?),
            (None, Some(key)) => self.verify(key),
            (None, None) => Err(AuthError::Missing),
        }
    }
}

/// The token of a `Bearer <token>` header value.
pub fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, token) = split_scheme(value)?;
    scheme.eq_ignore_ascii_case(b"bearer").then_some(token)
}

/// The password of a `Basic base64(user:password)` header value (Flight SQL's handshake).
pub fn basic_password(value: &[u8]) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let (scheme, encoded) = split_scheme(value)?;
    if !scheme.eq_ignore_ascii_case(b"basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded).ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    Some(decoded[colon + 1..].to_vec())
}

fn split_scheme(value: &[u8]) -> Option<(&[u8], &[u8])> {
    let space = value.iter().position(|&b| b == b' ')?;
    let token = value[space + 1..].trim_ascii();
    (!token.is_empty()).then_some((&value[..space], token))
}

fn parse_hash(text: &str) -> Result<[u8; 32], String> {
    let hex_digits = text
        .strip_prefix("sha256:")
        .ok_or_else(|| "expected `sha256:` and 64 hex digits (print one with `strata keygen`)".to_string())?;
    let bytes = hex::decode(hex_digits).map_err(|e| format!("not hex: {e}"))?;
    bytes.try_into().map_err(|_| "a SHA-256 hash has 64 hex digits".to_string())
}

fn parse_expiry(text: &str) -> Result<SystemTime, String> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(SystemTime::from)
        .map_err(|e| format!("`{text}` is not an RFC 3339 time such as `2027-01-31T00:00:00Z` ({e})"))
}

/// A new random key and the hash to store in `auth.keys[].hash`.
pub fn generate_key() -> Result<(String, String), String> {
    use base64::Engine as _;
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| format!("no randomness from the operating system: {e}"))?;
    let key = format!("strata_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret));
    let hash = format!("sha256:{}", hex::encode(Sha256::digest(key.as_bytes())));
    Ok((key, hash))
}

/// Checks `auth:` and `tenants:` together; the message names the field.
pub fn check(auth: Option<&AuthConfig>, tenants: &BTreeMap<String, TenantConfig>) -> Result<(), String> {
    let Some(auth) = auth else {
        if !tenants.is_empty() {
            return Err("tenants: grants need `auth:` (the keys that say who a caller is)".into());
        }
        return Ok(());
    };
    KeyStore::new(auth)?;
    let mut ids = std::collections::HashSet::new();
    for (i, key) in auth.keys.iter().enumerate() {
        if key.id.is_empty() || !ids.insert(key.id.as_str()) {
            return Err(format!("auth.keys[{i}].id: `{}` is empty or used twice", key.id));
        }
        if !tenants.contains_key(&key.tenant) {
            return Err(format!(
                "auth.keys[{i}] (`{}`).tenant: `{}` is not one of tenants: ({})",
                key.id,
                key.tenant,
                tenants.keys().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
    }
    for (i, identity) in auth.certificates.iter().enumerate() {
        if !tenants.contains_key(&identity.tenant) {
            return Err(format!(
                "auth.certificates[{i}] (`{}`).tenant: `{}` is not one of tenants:",
                identity.subject, identity.tenant
            ));
        }
    }
    for (name, tenant) in tenants {
        if tenant.max_concurrent_queries == Some(0) {
            return Err(format!("tenants.{name}.max_concurrent_queries must be at least 1"));
        }
        if tenant.memory_limit.is_some_and(|m| m.0 < MIN_TENANT_MEMORY) {
            return Err(format!(
                "tenants.{name}.memory_limit must be at least 1MiB (a smaller budget fails every query)"
            ));
        }
        for (i, pattern) in tenant.datasets.iter().enumerate() {
            if pattern.is_empty() || !pattern.chars().all(|c| c.is_ascii_alphanumeric() || "_.*".contains(c)) {
                return Err(format!(
                    "tenants.{name}.datasets[{i}]: `{pattern}` is not a dataset name or glob (letters, digits, `_`, `.`, `*`)"
                ));
            }
        }
    }
    Ok(())
}

/// The smallest `tenants.<name>.memory_limit` accepted.
const MIN_TENANT_MEMORY: u64 = 1 << 20;

/// `*` matches any run of characters; anything else itself, ASCII case aside.
fn glob_matches(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            backtrack = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi].eq_ignore_ascii_case(&n[ni]) {
            pi += 1;
            ni += 1;
        } else if let Some((star, matched)) = backtrack {
            pi = star + 1;
            ni = matched + 1;
            backtrack = Some((star, matched + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// A tenant as the engine enforces it.
pub struct TenantPolicy {
    pub name: String,
    grants: Vec<String>,
    pub max_result_rows: Option<u64>,
    pub max_concurrent_queries: Option<usize>,
    pub operator: bool,
    /// One permit per running query of this tenant, when limited.
    pub running: Option<Arc<tokio::sync::Semaphore>>,
    /// The memory its running queries hold, when limited.
    pub memory: Option<Arc<crate::tenant_memory::TenantBudget>>,
}

impl TenantPolicy {
    fn grants(&self, dataset: &str) -> bool {
        self.grants.iter().any(|g| glob_matches(g, dataset))
    }
}

/// The tenants of one process. Without `auth:` there is no policy and every caller may read
/// everything (tenant names are then only labels).
#[derive(Default)]
pub struct Tenancy {
    enforced: bool,
    tenants: HashMap<String, Arc<TenantPolicy>>,
}

impl Tenancy {
    pub fn new(auth: Option<&AuthConfig>, tenants: &BTreeMap<String, TenantConfig>) -> Self {
        let tenants = tenants
            .iter()
            .map(|(name, t)| {
                let policy = TenantPolicy {
                    name: name.clone(),
                    grants: t.datasets.clone(),
                    max_result_rows: t.max_result_rows,
                    max_concurrent_queries: t.max_concurrent_queries,
                    operator: t.operator,
                    running: t.max_concurrent_queries.map(|n| Arc::new(tokio::sync::Semaphore::new(n))),
                    memory: t
                        .memory_limit
                        .map(|m| Arc::new(crate::tenant_memory::TenantBudget::new(name, m.as_usize()))),
                };
                (name.clone(), Arc::new(policy))
            })
            .collect();
        Self { enforced: auth.is_some(), tenants }
    }

    /// Whether grants are enforced (`auth:` is configured).
    pub fn enforced(&self) -> bool {
        self.enforced
    }

    /// What a caller may read. `tenant` is who authenticated (with auth on, set by the
    /// server from the key, never by the client); `on_behalf_of` is the tenant another tier
    /// carried for its own client. A tier is trusted no further than its own key: the
    /// caller gets what *both* tenants are granted. A carried tenant unknown here adds no
    /// restriction of its own (the calling tier's key still bounds it).
    pub fn access(&self, tenant: &str, on_behalf_of: &str) -> Access {
        if !self.enforced {
            return Access::Everything;
        }
        let Some(own) = self.tenants.get(tenant) else {
            // Cannot happen for an authenticated call (keys name configured tenants); a
            // path that forgot to set the tenant sees nothing rather than everything.
            return Access::Granted(Vec::new());
        };
        let mut policies = vec![Arc::clone(own)];
        if !on_behalf_of.is_empty()
            && on_behalf_of != tenant
            && let Some(other) = self.tenants.get(on_behalf_of)
        {
            policies.push(Arc::clone(other));
        }
        Access::Granted(policies)
    }
}

/// What one caller may read.
#[derive(Clone)]
pub enum Access {
    /// No tenancy configured.
    Everything,
    /// Datasets granted to every one of these tenants (none: nothing).
    Granted(Vec<Arc<TenantPolicy>>),
}

impl Access {
    /// Whether the caller may read (and see) dataset `name` (`table` or `schema.table`).
    pub fn allows(&self, name: &str) -> bool {
        match self {
            Access::Everything => true,
            Access::Granted(policies) => !policies.is_empty() && policies.iter().all(|p| p.grants(name)),
        }
    }

    /// Whether the caller may use the operator endpoints (every tenant involved is an operator).
    pub fn is_operator(&self) -> bool {
        match self {
            Access::Everything => true,
            Access::Granted(policies) => !policies.is_empty() && policies.iter().all(|p| p.operator),
        }
    }

    /// The memory budgets a query of this caller is charged to (none: only the shared pool).
    pub fn memory_budgets(&self) -> Vec<Arc<crate::tenant_memory::TenantBudget>> {
        match self {
            Access::Everything => Vec::new(),
            Access::Granted(policies) => policies.iter().filter_map(|p| p.memory.clone()).collect(),
        }
    }

    /// Whether any restriction applies.
    pub fn is_restricted(&self) -> bool {
        matches!(self, Access::Granted(_))
    }

    /// The tenants whose limits apply.
    pub fn policies(&self) -> &[Arc<TenantPolicy>] {
        match self {
            Access::Everything => &[],
            Access::Granted(policies) => policies,
        }
    }

    /// The smallest row limit of the tenants involved, if any.
    pub fn max_result_rows(&self) -> Option<u64> {
        self.policies().iter().filter_map(|p| p.max_result_rows).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(keys: &[(&str, &str, &str, Option<&str>)]) -> KeyStore {
        KeyStore::new(&AuthConfig {
            keys: keys
                .iter()
                .map(|(id, tenant, hash, expires)| ApiKeyConfig {
                    id: id.to_string(),
                    tenant: tenant.to_string(),
                    hash: hash.to_string(),
                    expires: expires.map(str::to_string),
                })
                .collect(),
            public_reflection: false,
            certificates: Vec::new(),
        })
        .expect("valid keys")
    }

    #[test]
    fn a_generated_key_verifies_against_its_hash_and_nothing_else_does() {
        let (key, hash) = generate_key().expect("randomness");
        let (other, other_hash) = generate_key().expect("randomness");
        assert!(key.starts_with("strata_") && key.len() > 40, "{key}");
        assert_ne!(key, other);
        let keys = store(&[("a", "analytics", &hash, None), ("b", "ops", &other_hash, None)]);
        assert_eq!(&*keys.verify(key.as_bytes()).expect("valid").tenant, "analytics");
        assert_eq!(&*keys.verify(other.as_bytes()).expect("valid").tenant, "ops");
        assert_eq!(keys.verify(b""), Err(AuthError::Missing));
        assert_eq!(keys.verify(&key.as_bytes()[1..]), Err(AuthError::Invalid));
        let mut flipped = key.clone().into_bytes();
        flipped[10] ^= 1;
        assert_eq!(keys.verify(&flipped), Err(AuthError::Invalid));
    }

    #[test]
    fn an_expired_key_fails_exactly_like_an_unknown_one() {
        let (key, hash) = generate_key().expect("randomness");
        let keys = store(&[("old", "t", &hash, Some("2001-01-01T00:00:00Z"))]);
        assert_eq!(keys.verify(key.as_bytes()), Err(AuthError::Invalid));
        assert_eq!(
            keys.verify(key.as_bytes()).expect_err("expired").to_string(),
            keys.verify(b"strata_unknown").expect_err("unknown").to_string()
        );
        let keys = store(&[("new", "t", &hash, Some("2999-01-01T00:00:00+02:00"))]);
        assert!(keys.verify(key.as_bytes()).is_ok());
    }

    #[test]
    fn headers_take_bearer_in_any_case_or_x_api_key_and_nothing_malformed() {
        let (key, hash) = generate_key().expect("randomness");
        let keys = store(&[("a", "t", &hash, None)]);
        for header in [format!("Bearer {key}"), format!("bearer  {key} "), format!("BEARER {key}")] {
            assert!(keys.verify_header(Some(header.as_bytes()), None).is_ok(), "{header}");
        }
        assert!(keys.verify_header(None, Some(key.as_bytes())).is_ok());
        for bad in [key.clone(), format!("Basic {key}"), "Bearer".into(), "Bearer ".into(), format!("Bearer{key}")] {
            assert_eq!(keys.verify_header(Some(bad.as_bytes()), None), Err(AuthError::Invalid), "{bad}");
        }
        assert_eq!(keys.verify_header(None, None), Err(AuthError::Missing));
        // Bytes that are not UTF-8 are just a wrong key.
        assert_eq!(keys.verify_header(Some(b"Bearer \xff\xfe"), None), Err(AuthError::Invalid));
    }

    #[test]
    fn basic_credentials_yield_the_password() {
        use base64::Engine as _;
        let encoded = base64::engine::general_purpose::STANDARD.encode("user:pa:ss");
        assert_eq!(basic_password(format!("Basic {encoded}").as_bytes()).as_deref(), Some(&b"pa:ss"[..]));
        assert_eq!(basic_password(b"Basic !!!"), None);
        assert_eq!(basic_password(format!("Bearer {encoded}").as_bytes()), None);
    }

    #[test]
    fn bad_hashes_and_expiries_name_the_field() {
        let config = |hash: &str, expires: Option<&str>| AuthConfig {
            keys: vec![ApiKeyConfig {
                id: "k1".into(),
                tenant: "t".into(),
                hash: hash.into(),
                expires: expires.map(str::to_string),
            }],
            public_reflection: false,
            certificates: Vec::new(),
        };
        let good = format!("sha256:{}", "ab".repeat(32));
        let err = KeyStore::new(&config("md5:abc", None)).expect_err("refused");
        assert!(err.contains("auth.keys[0] (`k1`).hash") && err.contains("sha256:"), "{err}");
        let err = KeyStore::new(&config("sha256:abcd", None)).expect_err("refused");
        assert!(err.contains("64 hex digits"), "{err}");
        let err = KeyStore::new(&config(&good, Some("next week"))).expect_err("refused");
        assert!(err.contains("auth.keys[0] (`k1`).expires") && err.contains("RFC 3339"), "{err}");
    }

    #[test]
    fn globs_grant_by_name_and_an_intersection_grants_less() {
        assert!(glob_matches("orders", "ORDERS"));
        assert!(glob_matches("eu.*", "eu.sensors"));
        assert!(!glob_matches("eu.*", "us.sensors"));
        assert!(!glob_matches("eu.*", "eu"));
        assert!(glob_matches("*", "anything.at_all"));
        assert!(glob_matches("*_daily", "sales_daily"));
        assert!(glob_matches("a*b*c", "axxbyyc"));
        assert!(!glob_matches("a*b*c", "axxbyy"));
        assert!(!glob_matches("orders", "orders2"));
        let tenants = BTreeMap::from([
            ("tier".to_string(), TenantConfig { datasets: vec!["*".into()], ..tenant() }),
            ("eu".to_string(), TenantConfig { datasets: vec!["eu.*".into(), "orders".into()], ..tenant() }),
            ("shop".to_string(), TenantConfig { datasets: vec!["orders".into()], ..tenant() }),
        ]);
        let auth = AuthConfig { keys: Vec::new(), public_reflection: false, certificates: Vec::new() };
        let tenancy = Tenancy::new(Some(&auth), &tenants);
        assert!(tenancy.access("tier", "").allows("secrets"));
        assert!(!tenancy.access("tier", "eu").allows("secrets"));
        assert!(tenancy.access("tier", "eu").allows("eu.sensors"));
        assert!(!tenancy.access("shop", "eu").allows("eu.sensors"), "a tier gets no more than its own key");
        assert!(tenancy.access("tier", "unknown-here").allows("secrets"));
        assert!(!tenancy.access("", "").allows("orders"), "no tenant: nothing");
        assert!(Tenancy::new(None, &BTreeMap::new()).access("", "").allows("orders"));
    }

    fn tenant() -> TenantConfig {
        TenantConfig {
            datasets: Vec::new(),
            max_concurrent_queries: None,
            max_result_rows: None,
            memory_limit: None,
            operator: false,
        }
    }
}
