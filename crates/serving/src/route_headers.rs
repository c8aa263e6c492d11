//! How an answer reports where it ran and how fresh it is, the same on every interface:
//! `strata-route` (local | forwarded | mixed), `strata-route-reason`, `strata-route-detail`
//! and `strata-versions` (`dataset=version@age`), plus the request header that asks for the
//! authoritative copy (`strata-consistency: strong`); `strata-cache` (HIT | MISS | BYPASS)
//! on answers the results cache may hold (and `STALE` ones say how stale in
//! `strata-warning`); `strata-trace-id` on answers that were traced. A request's
//! `Cache-Control` tells the results cache what it accepts (see [`CacheControl::parse`]).

use std::borrow::Cow;

use axum::http::{HeaderMap, HeaderName};
use strata_core::results_cache::CacheControl;
use strata_core::routing::{QueryOptions, RouteInfo};
use strata_core::trace_context::TraceParent;
use strata_upstream::wire::{CONSISTENCY_HEADER, ROUTE_HEADER, ROUTE_REASON_HEADER, VERSIONS_HEADER};

pub const ROUTE_DETAIL_HEADER: &str = "strata-route-detail";
pub const TENANT_HEADER: &str = "strata-tenant";

/// Header values must be visible ASCII (and spaces); anything else becomes `?`. Borrowed when
/// it already is (nearly always: a copy per header per answer showed in a lookup's profile),
/// which is checked byte by byte: a byte of a multi-byte character is never ASCII.
fn ascii(s: &str) -> Cow<'_, str> {
    let visible = |c: char| c.is_ascii_graphic() || c == ' ';
    match s.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        true => Cow::Borrowed(s),
        false => Cow::Owned(s.chars().map(|c| if visible(c) { c } else { '?' }).collect()),
    }
}

/// [`ascii`] of a value made for the header, kept when it already is.
fn ascii_owned(s: String) -> String {
    match ascii(&s) {
        Cow::Borrowed(_) => s,
        Cow::Owned(replaced) => replaced,
    }
}

pub const WARNING_HEADER: &str = "strata-warning";
/// HIT, MISS or BYPASS, on answers the results cache may hold.
pub const CACHE_HEADER: &str = "strata-cache";

/// On a STALE answer: how long ago the oldest version it read was replaced (`2100ms`).
pub const STALENESS_HEADER: &str = "strata-staleness";

/// The trace id of the answer (32 hex digits), when it was traced: what to look up.
pub const TRACE_ID_HEADER: &str = "strata-trace-id";

/// Writes `route`'s headers into `headers`: an HTTP answer's, or a gRPC answer's metadata
/// (`MetadataMap::as_mut`; gRPC metadata values follow the same rules).
pub fn insert(headers: &mut HeaderMap, route: &RouteInfo) {
    use axum::http::HeaderValue;
    // Names are typed constants: a `&str` name is parsed and validated on every insert.
    if let Some(Ok(value)) = route.trace_id.as_deref().map(HeaderValue::from_str) {
        headers.insert(HTTP_TRACE_ID, value);
    }
    if let Some(Ok(value)) = route.warning.as_deref().map(|w| HeaderValue::from_str(&ascii(w))) {
        headers.insert(HTTP_WARNING, value);
    }
    if let Some(status) = route.cache {
        headers.insert(HTTP_CACHE, HeaderValue::from_static(status.as_str()));
    }
    if let Some(Ok(value)) = route.stale_ms.map(|ms| HeaderValue::from_str(&format!("{ms}ms"))) {
        headers.insert(HTTP_STALENESS, value);
    }
    // The route's own words are static: nothing parsed or copied for them.
    headers.insert(HTTP_ROUTE, HeaderValue::from_static(route.route.as_str()));
    headers.insert(HTTP_ROUTE_REASON, HeaderValue::from_static(route.reason.as_str()));
    if let Ok(value) = HeaderValue::from_str(&ascii(&route.detail)) {
        headers.insert(HTTP_ROUTE_DETAIL, value);
    }
    if let Ok(value) = HeaderValue::try_from(ascii_owned(route.versions_header())) {
        headers.insert(HTTP_VERSIONS, value);
    }
}

const HTTP_ROUTE: HeaderName = HeaderName::from_static(ROUTE_HEADER);
const HTTP_ROUTE_REASON: HeaderName = HeaderName::from_static(ROUTE_REASON_HEADER);
const HTTP_ROUTE_DETAIL: HeaderName = HeaderName::from_static(ROUTE_DETAIL_HEADER);
const HTTP_VERSIONS: HeaderName = HeaderName::from_static(VERSIONS_HEADER);
const HTTP_TRACE_ID: HeaderName = HeaderName::from_static(TRACE_ID_HEADER);
const HTTP_WARNING: HeaderName = HeaderName::from_static(WARNING_HEADER);
const HTTP_CACHE: HeaderName = HeaderName::from_static(CACHE_HEADER);
const HTTP_STALENESS: HeaderName = HeaderName::from_static(STALENESS_HEADER);
const HTTP_CONSISTENCY: HeaderName = HeaderName::from_static(CONSISTENCY_HEADER);
const HTTP_TENANT: HeaderName = HeaderName::from_static(TENANT_HEADER);
const HTTP_TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const HTTP_TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
const HTTP_DISTRIBUTE: HeaderName = HeaderName::from_static(DISTRIBUTE_HEADER);

/// Query options from request headers (HTTP and gRPC alike).
pub fn options(headers: &HeaderMap) -> QueryOptions {
    // Typed names: looked up by their hash, not parsed from text on every request.
    let get = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    QueryOptions {
        strong_consistency: get(&HTTP_CONSISTENCY).eq_ignore_ascii_case("strong"),
        tenant: get(&HTTP_TENANT),
        trace: TraceParent::new(get(&HTTP_TRACEPARENT), get(&HTTP_TRACESTATE)),
        cache_control: CacheControl::parse(&get(&axum::http::header::CACHE_CONTROL)),
        distribute: distribute_hint(&get(&HTTP_DISTRIBUTE)),
        ..QueryOptions::default()
    }
}

/// `strata-distribute: on|off` on a request to a platform with `cluster:`: run this query
/// over the replicas, or only on the one that received it, whatever its size.
pub const DISTRIBUTE_HEADER: &str = "strata-distribute";

/// `on`/`off` (also `true`/`false`, in any case); anything else leaves the decision to the
/// platform's `cluster.distribute_above`.
fn distribute_hint(value: &str) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "on" | "true" => Some(true),
        "off" | "false" => Some(false),
        _ => None,
    }
}

/// The JSON `app_metadata` of the first Flight message: the route, for clients that cannot read headers.
pub fn app_metadata(route: &RouteInfo) -> bytes::Bytes {
    serde_json::to_vec(route).map(bytes::Bytes::from).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_keep_visible_ascii_and_replace_each_other_character() {
        assert!(matches!(ascii("orders: key index (id = 7)"), Cow::Borrowed(_)));
        // One `?` per character, not per byte of a multi-byte one; controls too.
        assert_eq!(ascii("café\tau lait €"), "caf??au lait ?");
        assert_eq!(ascii_owned("ünï".to_string()), "?n?");
        assert_eq!(ascii_owned("plain".to_string()), "plain");
    }

    #[test]
    fn a_routes_headers_are_the_same_in_http_headers_and_grpc_metadata() {
        let mut route = RouteInfo::local("orders: café");
        route.warning = Some("stale\ncopy".into());
        route.stale_ms = Some(2100);
        let mut http = HeaderMap::new();
        insert(&mut http, &route);
        let mut grpc = tonic::metadata::MetadataMap::new();
        insert(grpc.as_mut(), &route);
        for (name, expected) in [
            (ROUTE_HEADER, "local"),
            (ROUTE_DETAIL_HEADER, "orders: caf?"),
            (WARNING_HEADER, "stale?copy"),
            (STALENESS_HEADER, "2100ms"),
        ] {
            assert_eq!(http.get(name).and_then(|v| v.to_str().ok()), Some(expected), "{name} over HTTP");
            assert_eq!(grpc.get(name).and_then(|v| v.to_str().ok()), Some(expected), "{name} over gRPC");
        }
    }

    #[test]
    fn distribute_hint_is_on_or_off() {
        assert_eq!(distribute_hint("on"), Some(true));
        assert_eq!(distribute_hint(" OFF "), Some(false));
        assert_eq!(distribute_hint(""), None);
        assert_eq!(distribute_hint("maybe"), None);
    }
}
