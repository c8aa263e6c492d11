#!/usr/bin/env python3
"""Checks that the deployment files agree with the binary they deploy (run by validate.sh).

For every Strata container of every rendered Kubernetes overlay, and every compose service:
  - the tier's strata.yaml (the generated ConfigMap, or the compose config file) loads with the
    real config loader (`strata check <tier>`), with the container's environment (secrets get a
    placeholder), so a misspelt field or an unset ${VAR} fails here;
  - the config listens on all interfaces, on the ports the container (and the Services'
    target ports) name `flight` and `http`;
  - every probe path exists: the tier is started on that config and each path must answer
    something other than 404 (200 or 503);
  - each pod's terminationGracePeriodSeconds covers its server.shutdown_grace and the 5 s
    background tasks then get to stop.

usage: validate.py STRATA_BINARY RENDERED_DIR COMPOSE_FILE
"""
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import yaml

STRATA, RENDERED, COMPOSE_FILE = sys.argv[1], sys.argv[2], sys.argv[3]
TIERS = {"platform", "sidecar", "edge"}
DEFAULT_PORTS = {"flight": 50051, "http": 8080}
failures = []
checked = []
# The containers' TLS files (mounted at /etc/strata/tls), made here by `strata certs` with the
# names the deployments give them, so a tier with TLS starts on its own config.
TLS_DIR = tempfile.mkdtemp(prefix="strata-validate-tls-")
subprocess.run([STRATA, "certs", "--out", TLS_DIR] + [
    arg for name in ("platform", "platform-eu", "platform-us", "sidecar", "edge")
    for arg in ("--cert", f"{name}=localhost,127.0.0.1")], check=True, capture_output=True)
# The Kubernetes layout of the same (Secrets of type kubernetes.io/tls with ca.crt), and the
# tier key file a sidecar's credential_file names (/var/run/secrets/strata/key).
for name, source in (("tls.crt", "platform.pem"), ("tls.key", "platform.key"), ("ca.crt", "ca.pem")):
    shutil.copy(os.path.join(TLS_DIR, source), os.path.join(TLS_DIR, name))
with open(os.path.join(TLS_DIR, "key"), "w") as f:
    f.write("strata_placeholder_key_for_validation_0000000000000")
TLS_CONTEXT = ssl.create_default_context(cafile=os.path.join(TLS_DIR, "ca.pem"))
SECRET_PATHS = ("/etc/strata/tls/", "/var/run/secrets/strata/")


def local_paths(config_text):
    """The config with the containers' secret mounts pointing at this run's files."""
    for path in SECRET_PATHS:
        config_text = config_text.replace(path, f"{TLS_DIR}/")
    return config_text


def fail(where, message):
    failures.append(f"{where}: {message}")


def duration_seconds(text):
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    match = re.fullmatch(r"(\d+)(ms|s|m|h)", str(text).strip())
    return int(match.group(1)) * units[match.group(2)] if match else None


def strata_check(where, tier, config_text, env):
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(local_paths(config_text))
    try:
        out = subprocess.run([STRATA, "check", tier, "--config", f.name], env=env, capture_output=True, text=True)
        if out.returncode != 0:
            fail(where, f"strata check {tier} refused the config: {out.stderr.strip()}")
    finally:
        os.unlink(f.name)


def probe_paths_exist(where, tier, config_text, env, paths):
    """Starts the tier on its config (listening on loopback, data in a temp dir) and asks each path."""
    with tempfile.TemporaryDirectory() as tmp:
        text = local_paths(re.sub(r"data_dir: .*", f"data_dir: {tmp}/data", config_text))
        scheme = "https" if server_tls(text) else "http"
        path = os.path.join(tmp, "strata.yaml")
        with open(path, "w") as f:
            f.write(text)
        proc = subprocess.Popen(
            [STRATA, tier, "--config", path, "--flight-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"],
            env={**env, "STRATA_LOG_FORMAT": "json", "RUST_LOG": "error"}, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True)
        try:
            line = proc.stdout.readline()
            match = re.search(r"http=(\S+)", line)
            if not match:
                fail(where, f"the {tier} did not start on its config (stdout: {line!r})")
                return
            for probe_path in sorted(paths):
                try:
                    url = f"{scheme}://{match.group(1)}{probe_path}"
                    with urllib.request.urlopen(url, timeout=5, context=TLS_CONTEXT) as r:
                        status = r.status
                except urllib.error.HTTPError as err:
                    status = err.code
                if status == 404:
                    fail(where, f"probe path {probe_path} does not exist on the {tier} (404)")
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def server_tls(config_text):
    return (yaml.safe_load(config_text).get("server") or {}).get("tls")


def listen_ports(where, config):
    server = config.get("server") or {}
    ports = {}
    for name, key in (("flight", "flight_addr"), ("http", "http_addr")):
        addr = server.get(key)
        if addr is None:
            fail(where, f"server.{key} is not set: the default listens on 127.0.0.1, unreachable from outside the container")
            continue
        host, _, port = str(addr).rpartition(":")
        if host not in ("0.0.0.0", "[::]", "::"):
            fail(where, f"server.{key} listens on {host}: probes and other pods cannot reach it")
        ports[name] = int(port)
    return ports


def container_env(container):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
        elif "fieldRef" in var.get("valueFrom", {}):
            env[var["name"]] = "node-1"
        elif var["name"].endswith("_HASH"):  # an API key hash from a Secret: any well-formed one
            env[var["name"]] = "sha256:" + "0" * 64
        else:  # a Secret or ConfigMap key: its value is not here
            env[var["name"]] = "placeholder"
    return env


def check_overlay(path):
    overlay = os.path.basename(path).removesuffix(".yaml")
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    config_maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    pod_ports = {}
    for doc in docs:
        if doc["kind"] not in ("Deployment", "DaemonSet", "StatefulSet"):
            continue
        spec = doc["spec"]["template"]["spec"]
        labels = doc["spec"]["template"]["metadata"].get("labels", {})
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec.get("initContainers", []) + spec.get("containers", []):
            args = container.get("args") or []
            where = f"{overlay}: {doc['kind']}/{doc['metadata']['name']} container {container['name']}"
            named = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
            pod_ports.setdefault(doc["metadata"]["name"], (labels, {}))[1].update(named)
            if not args or args[0] not in TIERS:
                continue
            mount = next((m for m in container.get("volumeMounts", []) if m["mountPath"] == "/etc/strata"), None)
            volume = volumes.get(mount["name"]) if mount else None
            cm = config_maps.get((volume or {}).get("configMap", {}).get("name"))
            if cm is None:
                fail(where, "no ConfigMap mounted at /etc/strata")
                continue
            config_path = args[args.index("--config") + 1] if "--config" in args else "strata.yaml"
            text = cm["data"].get(os.path.basename(config_path))
            if text is None:
                fail(where, f"ConfigMap {cm['metadata']['name']} has no {os.path.basename(config_path)}")
                continue
            env = container_env(container)
            strata_check(where, args[0], text, env)
            config = yaml.safe_load(text)
            ports = listen_ports(where, config)
            for name, port in ports.items():
                if named.get(name) != port:
                    fail(where, f"container port {name} is {named.get(name)}, the config listens on {port}")
            probe_paths = set()
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                http = (container.get(probe) or {}).get("httpGet")
                if http:
                    probe_paths.add(http["path"])
                    serves_tls = bool(server_tls(text))
                    if serves_tls != (http.get("scheme", "HTTP") == "HTTPS"):
                        fail(where, f"{probe} asks with scheme {http.get('scheme', 'HTTP')}, but the config "
                                    f"{'serves' if serves_tls else 'does not serve'} TLS")
                    if named.get(http["port"], http["port"]) != ports.get("http"):
                        fail(where, f"{probe} asks port {http['port']}, not the http port {ports.get('http')}")
            probe_paths_exist(where, args[0], text, env, probe_paths)
            # SIGTERM -> shutdown_delay (still accepting) -> shutdown_grace (drain) -> up to 5 s
            # for background tasks to stop (serving's BACKGROUND_STOP).
            server = config.get("server") or {}
            grace = duration_seconds(server.get("shutdown_grace", "30s"))
            delay = duration_seconds(server.get("shutdown_delay", "0s")) or 0
            if grace is not None and spec.get("terminationGracePeriodSeconds", 30) < delay + grace + 5:
                fail(where, f"terminationGracePeriodSeconds {spec.get('terminationGracePeriodSeconds', 30)} "
                            f"is shorter than server.shutdown_delay ({delay} s) + shutdown_grace ({grace} s) "
                            f"+ 5 s to stop background tasks")
            checked.append(where)
    for doc in docs:
        if doc["kind"] != "Service":
            continue
        selector = doc["spec"].get("selector", {})
        targets = [ports for labels, ports in pod_ports.values() if selector and selector.items() <= labels.items()]
        if not targets:
            fail(f"{overlay}: Service/{doc['metadata']['name']}", f"selects no pod ({selector})")
        for port in doc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if isinstance(target, str) and not any(target in ports for ports in targets):
                fail(f"{overlay}: Service/{doc['metadata']['name']}", f"targetPort {target} is no container port")


def dotenv(directory):
    """The variables compose reads from the project directory's .env (the demo's API keys)."""
    values = {}
    path = os.path.join(directory, ".env")
    if os.path.exists(path):
        for line in open(path):
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                name, _, value = line.partition("=")
                values[name.strip()] = value.strip()
    return values


def check_compose():
    here = os.path.dirname(os.path.abspath(COMPOSE_FILE))
    compose = yaml.safe_load(open(COMPOSE_FILE))
    for name, service in compose["services"].items():
        command = service.get("command") or []
        if not command or command[0] not in TIERS:
            continue
        where = f"compose: service {name}"
        config_path = command[command.index("--config") + 1]
        source = next((v.split(":")[0] for v in service.get("volumes", []) if v.split(":")[1] == config_path), None)
        if source is None:
            fail(where, f"nothing is mounted at {config_path}")
            continue
        text = open(os.path.join(here, source)).read()
        env = {"PATH": os.environ.get("PATH", ""), "STRATA_DB_PASSWORD": "placeholder", **dotenv(here)}
        strata_check(where, command[0], text, env)
        ports = listen_ports(where, yaml.safe_load(text))
        published = service.get("ports", [])
        owner = service.get("network_mode", "").removeprefix("service:")
        if owner:
            published = compose["services"][owner].get("ports", [])
        container_ports = {int(str(p).rsplit(":", 1)[1]) for p in published}
        for port_name, port in ports.items():
            if port not in container_ports:
                fail(where, f"the config's {port_name} port {port} is not published")
        probe_paths_exist(where, command[0], text, env, {"/health", "/v1/ready"})
        checked.append(where)


for rendered in sorted(os.listdir(RENDERED)):
    check_overlay(os.path.join(RENDERED, rendered))
check_compose()
shutil.rmtree(TLS_DIR, ignore_errors=True)
for where in checked:
    print(f"  agrees with the binary: {where}")
if failures:
    print("\n".join(["deployment files disagree with the binary:"] + failures), file=sys.stderr)
    sys.exit(1)
print(f"{len(checked)} containers and services agree with the binary")
