#!/usr/bin/env python3
"""The compose demo's smoke and fault test (run by smoke.sh, which owns bringing the project
up and tearing it down). Every answer is checked against PostgreSQL's own, every fault step's
figure is measured and printed, and any failed expectation exits non-zero.

Talks to the tiers over their published HTTP ports, exactly as a user of the demo would, and
to PostgreSQL through psql inside its container.
"""
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import http.client
import urllib.error
import urllib.request

COMPOSE = os.environ["SMOKE_COMPOSE"].split("\x1f")
PORTS = {
    "platform-eu": int(os.environ["PLATFORM_EU_HTTP_PORT"]),
    "platform-us": int(os.environ["PLATFORM_US_HTTP_PORT"]),
    "sidecar": int(os.environ["SIDECAR_HTTP_PORT"]),
    "edge": int(os.environ["EDGE_HTTP_PORT"]),
}
# The platforms serve TLS from the demo's private CA (up.sh copies its certificate out).
TLS = ssl.create_default_context(cafile=os.environ["SMOKE_CA"])


def base(tier):
    scheme = "https" if tier.startswith("platform") else "http"
    return f"{scheme}://127.0.0.1:{PORTS[tier]}"


def dotenv():
    """The demo's API keys, from .env beside the compose file (the environment wins)."""
    values = {}
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".env")) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                name, _, value = line.partition("=")
                values[name.strip()] = os.environ.get(name.strip(), value.strip())
    return values


KEYS = dotenv()
# The platforms require a key: an app's for queries, an operator's for the full status.
PLATFORM_AUTH = {"sql": KEYS["STRATA_APP_KEY"], "status": KEYS["STRATA_OPS_KEY"]}
CALL_TIMEOUT_S = 3.0  # upstream.call_timeout in config/sidecar.yaml and config/edge.yaml
FIGURES = {}


def log(message):
    print(f"[smoke {time.strftime('%H:%M:%S')}] {message}", flush=True)


def fail(message):
    print(f"SMOKE FAILED: {message}", flush=True)
    sys.exit(1)


def compose(*args, check=True):
    return subprocess.run(COMPOSE + list(args), check=check, capture_output=True, text=True).stdout.strip()


def container(service):
    cid = compose("ps", "-q", service)
    if not cid:
        fail(f"no container for {service}")
    return cid


def docker(*args, check=True):
    out = subprocess.run(["docker", *args], capture_output=True, text=True)
    if check and out.returncode != 0:
        fail(f"docker {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout.strip()


def psql(sql):
    """PostgreSQL's own answer, as CSV lines without a header."""
    out = docker("exec", container("postgres"), "psql", "-U", "postgres", "-d", "shop", "-AtF,", "-c", sql)
    return out.splitlines()


class Answer:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    @property
    def rows(self):
        return self.body.splitlines()[1:]

    def header(self, name):
        return self.headers.get(name, "-")


def auth(tier, use):
    return {"authorization": f"Bearer {PLATFORM_AUTH[use]}"} if tier.startswith("platform") else {}


def sql(tier, text, timeout=30.0, headers=None):
    request = urllib.request.Request(
        f"{base(tier)}/v1/sql", data=text.encode(), method="POST",
        headers={"accept": "text/csv", **auth(tier, "sql"), **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=TLS) as response:
            return Answer(response.status, {k.lower(): v for k, v in response.headers.items()}, response.read().decode())
    except urllib.error.HTTPError as err:
        return Answer(err.code, {k.lower(): v for k, v in err.headers.items()}, err.read().decode())


def get_json(tier, path, timeout=5.0):
    request = urllib.request.Request(f"{base(tier)}{path}", headers=auth(tier, "status"))
    with urllib.request.urlopen(request, timeout=timeout, context=TLS) as response:
        return json.loads(response.read())


def step_auth():
    log("The platforms answer only with a key: none or a wrong one gets 401, /health stays open")
    query = "SELECT count(*) AS n FROM orders"
    for tier in ("platform-eu", "platform-us"):
        for headers, what in (({"authorization": ""}, "no key"), ({"authorization": "Bearer strata_wrong"}, "a wrong key")):
            answer = sql(tier, query, headers=headers)
            if answer.status != 401:
                fail(f"{tier} answered {what} with {answer.status}, not 401: {answer.body.strip()[:200]}")
        with urllib.request.urlopen(f"{base(tier)}/health", timeout=5, context=TLS) as response:
            if response.status != 200:
                fail(f"{tier}'s /health needs no key but answered {response.status}")
    answer = sql("platform-eu", query)
    if answer.status != 200 or answer.rows != psql("SELECT count(*) FROM orders"):
        fail(f"platform-eu with the app's key answered {answer.status}: {answer.body.strip()[:200]}")
    log("  401 without a key and with a wrong one on both platforms; the app's key answers")


def step_tls():
    log("The platforms serve TLS only, and their gRPC port only to holders of a demo certificate")
    for tier in ("platform-eu", "platform-us"):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{PORTS[tier]}/health", timeout=5)
            fail(f"{tier} answered plaintext HTTP")
        except (urllib.error.URLError, ConnectionError, http.client.HTTPException):
            pass
    port = int(os.environ["PLATFORM_EU_FLIGHT_PORT"])
    context = ssl.create_default_context(cafile=os.environ["SMOKE_CA"])
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                # TLS 1.3 sends the refusal of a missing client certificate after the
                # handshake: the first read gets it.
                tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                if tls.recv(1024):
                    fail("platform-eu's gRPC port spoke to a client without a certificate")
    except (ssl.SSLError, ConnectionError):
        pass
    log("  plaintext HTTP refused on both platforms; a TLS client without a certificate refused on gRPC")


def ingest(tier, dataset, csv_text):
    request = urllib.request.Request(
        f"{base(tier)}/v1/ingest/{dataset}", data=csv_text.encode(), method="POST",
        headers={"content-type": "text/csv"})
    with urllib.request.urlopen(request, timeout=10, context=TLS) as response:
        return json.loads(response.read())


def wait_for(what, predicate, timeout):
    started = time.monotonic()
    last = None
    while time.monotonic() - started < timeout:
        try:
            if predicate():
                return time.monotonic() - started
        except Exception as err:  # a tier that is still starting refuses connections
            last = err
        time.sleep(0.2)
    fail(f"{what} did not happen within {timeout:.0f} s (last error: {last})")


def datasets_ready(tier, names):
    listed = {d["name"]: d for d in get_json(tier, "/v1/datasets")["datasets"]}
    return all(listed.get(n, {}).get("state") == "ready" for n in names)


def expect(tier, text, route, pg_sql, reason=None):
    answer = sql(tier, text)
    if answer.status != 200:
        fail(f"{tier}: {text!r} answered {answer.status}: {answer.body.strip()}")
    if answer.header("strata-route") != route:
        fail(f"{tier}: {text!r} ran {answer.header('strata-route')} ({answer.header('strata-route-reason')}), expected {route}")
    if reason and answer.header("strata-route-reason") != reason:
        fail(f"{tier}: {text!r} had reason {answer.header('strata-route-reason')}, expected {reason}")
    expected = psql(pg_sql)
    if answer.rows != expected:
        fail(f"{tier}: {text!r} answered {answer.rows[:5]}..., PostgreSQL {expected[:5]}...")
    log(f"  {tier:<12} {route:<10} {answer.header('strata-route-reason'):<14} {len(answer.rows)} rows = PostgreSQL's  {text[:60]}")
    return answer


ORDERS_BY_STATUS = "SELECT status, count(*) AS n, sum(quantity) AS q FROM orders GROUP BY status ORDER BY status"
EU_CUSTOMERS = "SELECT count(*) FROM customers WHERE region = 'eu'"
SHIPMENTS = "SELECT carrier, count(*) AS n FROM shipments GROUP BY carrier ORDER BY carrier"
READINGS = "SELECT count(*) AS n, count(DISTINCT device) AS devices FROM readings"
REVENUE_BY_CATEGORY = ("SELECT p.category, sum(o.quantity) AS units FROM orders o JOIN products p "
                       "ON o.product_id = p.product_id GROUP BY p.category ORDER BY p.category")
# PostgreSQL has no products table (the file ships in the image): its side of the join.
PG_REVENUE_BY_CATEGORY = ("SELECT (ARRAY['tools','garden','kitchen','toys','books'])[1 + product_id % 5] AS category, "
                          "sum(quantity) FROM orders GROUP BY 1 ORDER BY 1")


def step_routes():
    log("queries at every tier, each compared with PostgreSQL's answer")
    wait_for("the sidecar's replicas", lambda: datasets_ready("sidecar", ["orders", "customers"]), 120)
    wait_for("the edge's replicas", lambda: datasets_ready("edge", ["orders", "readings"]), 120)
    expect("platform-eu", ORDERS_BY_STATUS, "local", ORDERS_BY_STATUS)
    expect("platform-us", SHIPMENTS, "local", SHIPMENTS)
    expect("platform-eu", SHIPMENTS, "forwarded", SHIPMENTS, reason="cross_region")
    expect("sidecar", ORDERS_BY_STATUS, "local", ORDERS_BY_STATUS)
    expect("sidecar", EU_CUSTOMERS, "local", EU_CUSTOMERS)
    expect("sidecar", READINGS, "forwarded", READINGS)
    expect("sidecar", SHIPMENTS, "forwarded", SHIPMENTS, reason="cross_region")
    expect("sidecar", REVENUE_BY_CATEGORY, "mixed", PG_REVENUE_BY_CATEGORY)
    expect("edge", ORDERS_BY_STATUS, "local", ORDERS_BY_STATUS)
    expect("edge", READINGS, "local", READINGS)
    app_log = compose("logs", "--no-color", "app")
    if "route=local" not in app_log or "route=forwarded" not in app_log:
        fail(f"the app's log shows no routed answers: {app_log[-2000:]}")
    log("  the app's log shows its answers' routes")


def step_platform_kill():
    log("docker kill platform-eu (the sidecar's and the edge's platform)")
    docker("kill", container("platform-eu"))
    errors = 0
    local_queries = 0
    for _ in range(10):
        for tier in ("sidecar", "edge"):
            answer = sql(tier, ORDERS_BY_STATUS)
            local_queries += 1
            if answer.status != 200 or answer.header("strata-route") != "local":
                errors += 1
                log(f"  {tier} local query failed during the outage: {answer.status} {answer.body.strip()[:200]}")
    started = time.monotonic()
    answer = sql("sidecar", READINGS)
    fail_fast = time.monotonic() - started
    if answer.status == 200:
        fail("a forwarded query succeeded with the platform killed")
    if "upstream unavailable" not in answer.body:
        fail(f"the forwarded query failed without the upstream-unavailable error: {answer.status} {answer.body.strip()}")
    if fail_fast > CALL_TIMEOUT_S + 1.0:
        fail(f"the forwarded query took {fail_fast:.2f} s to fail, past upstream.call_timeout ({CALL_TIMEOUT_S} s)")
    log(f"  local answers during the outage: {local_queries - errors}/{local_queries}; forwarded query failed in {fail_fast:.2f} s: {answer.body.strip()[:120]}")
    if errors:
        fail(f"{errors} local queries failed while the platform was down")
    FIGURES["outage_local_errors"] = errors
    FIGURES["outage_local_queries"] = local_queries
    FIGURES["forward_fail_seconds"] = round(fail_fast, 2)

    # Rows that arrive at the source during the outage: the replicas must catch up with them.
    psql("INSERT INTO orders SELECT g, 1, 1, 1, 1.0, 'paid', timestamp '2027-01-01' + g * interval '1 second' "
         "FROM generate_series(900001, 900500) AS g")
    log("docker start platform-eu")
    docker("start", container("platform-eu"))
    restarted = time.monotonic()
    wait_for("platform-eu to be ready", lambda: get_json("platform-eu", "/v1/ready").get("ready") is not False, 120)
    ready_after = time.monotonic() - restarted

    def forwarded_ok():
        return sql("sidecar", READINGS, timeout=5).status == 200
    recovered = wait_for("a forwarded query to succeed again", forwarded_ok, 60)
    log(f"  platform-eu ready {ready_after:.1f} s after its start; forwarded queries succeed {recovered:.2f} s after that")
    if recovered > 5.0:
        fail(f"forwarded queries took {recovered:.1f} s to recover after the platform was ready (limit 5 s)")
    FIGURES["platform_ready_seconds"] = round(ready_after, 1)
    FIGURES["forward_recover_seconds"] = round(recovered, 2)

    def caught_up(tier):
        answer = sql(tier, ORDERS_BY_STATUS)
        return answer.status == 200 and answer.header("strata-route") == "local" and answer.rows == psql(ORDERS_BY_STATUS)
    sidecar_catch_up = wait_for("the sidecar's orders replica to catch up", lambda: caught_up("sidecar"), 120)
    edge_catch_up = wait_for("the edge's orders replica to catch up", lambda: caught_up("edge"), 120)
    log(f"  replicas caught up with the rows written during the outage: sidecar {sidecar_catch_up:.1f} s, edge {edge_catch_up:.1f} s")
    FIGURES["replica_catch_up_seconds"] = round(max(sidecar_catch_up, edge_catch_up), 1)


def wan_network():
    networks = json.loads(docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", container("edge")))
    names = [n for n in networks if n.endswith("_wan")]
    return names[0] if names else os.environ["SMOKE_PROJECT"] + "_wan"


def step_partition():
    wan = wan_network()
    log(f"partition: docker network disconnect {wan} edge; writes at the edge meanwhile")
    docker("network", "disconnect", wan, container("edge"))
    acknowledged = 0
    seq = 0
    for batch in range(20):
        lines = ["device,seq,celsius"]
        for _ in range(50):
            seq += 1
            lines.append(f"smoke-partition,{seq},{20 + seq % 10}.5")
        receipt = ingest("edge", "readings", "\n".join(lines) + "\n")
        acknowledged += receipt["rows"]
    local = sql("edge", "SELECT count(*) FROM readings WHERE device = 'smoke-partition'")
    if local.status != 200 or local.rows != [str(acknowledged)]:
        fail(f"the edge does not see its own {acknowledged} writes during the partition: {local.status} {local.body.strip()}")
    if psql("SELECT count(*) FROM readings WHERE device = 'smoke-partition'") != ["0"]:
        fail("rows reached PostgreSQL through a partition")
    log(f"  {acknowledged} rows acknowledged during the partition (the edge answers them locally); reconnecting")
    docker("network", "connect", wan, container("edge"))
    reconnected = time.monotonic()
    wait_for("the edge's writes to arrive in PostgreSQL",
             lambda: psql("SELECT count(*) FROM readings WHERE device = 'smoke-partition'") == [str(acknowledged)], 120)
    arrived_after = time.monotonic() - reconnected
    time.sleep(3)  # anything uploaded twice would show up now
    total, distinct = psql("SELECT count(*), count(DISTINCT seq) FROM readings WHERE device = 'smoke-partition'")[0].split(",")
    if int(total) != acknowledged or int(distinct) != acknowledged:
        fail(f"{acknowledged} rows acknowledged, PostgreSQL has {total} ({distinct} distinct)")
    log(f"  rows written during the partition: {acknowledged}; arrived in PostgreSQL: {total} ({distinct} distinct), {arrived_after:.1f} s after reconnecting")
    FIGURES["partition_rows_written"] = acknowledged
    FIGURES["partition_rows_arrived"] = int(total)
    FIGURES["partition_upload_seconds"] = round(arrived_after, 1)


def step_edge_restart():
    wan = wan_network()
    log("docker restart edge with its uplink cut: it must answer from its volume at once")
    docker("network", "disconnect", wan, container("edge"))
    docker("restart", "-t", "30", container("edge"))
    restarted = time.monotonic()

    def answers():
        return sql("edge", ORDERS_BY_STATUS, timeout=2).status == 200
    first_answer = wait_for("the restarted edge to answer", answers, 60)
    answer = sql("edge", ORDERS_BY_STATUS)
    if answer.header("strata-route") != "local" or answer.rows != psql(ORDERS_BY_STATUS):
        fail(f"the restarted edge answered {answer.header('strata-route')}: {answer.rows[:3]}")
    listed = {d["name"]: d for d in get_json("edge", "/v1/datasets")["datasets"]}
    staleness = listed["orders"].get("staleness_seconds")
    if staleness is None:
        fail(f"the edge reports no staleness for its disk copy: {listed['orders']}")
    log(f"  answered from disk {first_answer:.2f} s after the restart, platform unreachable; versions {answer.header('strata-versions')}, staleness {staleness} s")
    FIGURES["edge_restart_answer_seconds"] = round(first_answer, 2)
    docker("network", "connect", wan, container("edge"))


def step_sigterm_drain():
    slow = ("SELECT count(*) AS n FROM shipments a JOIN shipments b ON a.carrier = b.carrier "
            "WHERE a.shipment_id % 4 = 0")
    started = time.monotonic()
    baseline = sql("platform-us", slow, timeout=120)
    took = time.monotonic() - started
    if baseline.status != 200:
        fail(f"the drain test's query failed: {baseline.body.strip()}")
    log(f"SIGTERM to platform-us with a {took:.1f} s query in flight")
    result = {}

    def run():
        result["answer"] = sql("platform-us", slow, timeout=120)
    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(min(1.0, took / 3))
    cid = container("platform-us")
    docker("kill", "-s", "TERM", cid)
    thread.join()
    answer = result["answer"]
    if answer.status != 200 or answer.rows != baseline.rows:
        fail(f"the in-flight query did not complete across SIGTERM: {answer.status} {answer.body.strip()[:200]}")
    wait_for("platform-us to exit", lambda: docker("inspect", "-f", "{{.State.Running}}", cid) == "false", 40)
    code = docker("inspect", "-f", "{{.State.ExitCode}}", cid)
    if code != "0":
        fail(f"platform-us exited {code} after SIGTERM")
    log(f"  the in-flight query completed ({answer.rows[0]} rows counted); platform-us exited 0")
    FIGURES["drain_query_seconds"] = round(took, 1)


def http_json(url, timeout=5.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def step_observability():
    log("Prometheus scrapes every tier; one query's trace reaches the collector from each tier it crossed")
    prometheus = f"http://127.0.0.1:{os.environ['PROMETHEUS_PORT']}"
    tiers = {"platform-eu:8080", "platform-us:8080", "app:8080", "edge:8080"}

    def scraped():
        targets = http_json(f"{prometheus}/api/v1/targets")["data"]["activeTargets"]
        return {t["labels"]["instance"] for t in targets if t["health"] == "up"} >= tiers
    took = wait_for("Prometheus to scrape every tier", scraped, 90)
    ready = http_json(f"{prometheus}/api/v1/query?query=strata_ready")["data"]["result"]
    if {r["metric"]["instance"] for r in ready} != tiers or any(r["value"][1] != "1" for r in ready):
        fail(f"strata_ready in Prometheus: {ready}")
    routes = http_json(f"{prometheus}/api/v1/query?query=sum%20by%20(route)%20(strata_query_routes_total)")
    log(f"  every tier scraped {took:.1f} s in; queries by route: "
        + ", ".join(f"{r['metric'].get('route')}={r['value'][1]}" for r in routes["data"]["result"]))

    trace_id, parent = os.urandom(16).hex(), os.urandom(8).hex()
    answer = sql("sidecar", SHIPMENTS, headers={"traceparent": f"00-{trace_id}-{parent}-01"})
    if answer.status != 200 or answer.rows != psql(SHIPMENTS):
        fail(f"the traced query answered {answer.status}: {answer.body.strip()[:200]}")
    collector = f"http://127.0.0.1:{os.environ['COLLECTOR_HTTP_PORT']}"
    crossed = {"sidecar", "platform-eu", "platform-us"}

    def traced():
        spans = http_json(f"{collector}/v1/spans?trace_id={trace_id}")
        return {s["service"] for s in spans if s["name"] == "query"} >= crossed
    wait_for("the query's spans from every tier it crossed", traced, 30)
    spans = http_json(f"{collector}/v1/spans?trace_id={trace_id}")
    roots = [s for s in spans if s["name"] == "query" and s["service"] == "sidecar"]
    if len(roots) != 1 or roots[0]["parent_span_id"] != parent:
        fail(f"the sidecar's query span is not the child of the client's span {parent}: {roots}")
    log(f"  trace {trace_id}: {len(spans)} spans from " + ", ".join(sorted({s['service'] for s in spans})))
    FIGURES["prometheus_all_tiers_scraped_seconds"] = round(took, 1)
    FIGURES["trace_spans_one_cross_region_query"] = len(spans)


def main():
    step_tls()
    step_auth()
    step_routes()
    step_observability()
    step_platform_kill()
    step_partition()
    step_edge_restart()
    step_sigterm_drain()
    print("SMOKE FIGURES " + json.dumps(FIGURES), flush=True)


if __name__ == "__main__":
    main()
