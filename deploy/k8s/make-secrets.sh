#!/usr/bin/env bash
# The Secrets the manifests mount, for a test cluster, printed as YAML:
#   strata-keys          tier-key (sidecars' and edges' own key), cluster-key (the platform
#                        replicas' key for each other's worker port) and the hashes the
#                        platforms accept: tier-key-hash, app-key-hash, ops-key-hash,
#                        cluster-key-hash;
#   strata-platform-tls, strata-sidecar-tls, strata-edge-tls
#                        tls.crt, tls.key and ca.crt, from a private CA made by `strata certs`
#                        (its key is not kept).
# The app and ops keys themselves are printed once, to stderr: give them to their users.
#
#   deploy/k8s/make-secrets.sh NAMESPACE [STRATA_BINARY] | kubectl apply -f -
#
# In production, certificates come from your PKI (cert-manager writes the same three files into
# a Secret) and keys from `strata keygen`; see docs/deploy.md.
set -euo pipefail
namespace="${1:?usage: make-secrets.sh NAMESPACE [STRATA_BINARY]}"
strata="${2:-strata}"
command -v kubectl >/dev/null || { echo "error: kubectl is needed to write the Secrets" >&2; exit 1; }
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT

service="strata-platform"
"$strata" certs --out "$dir" --ca-name "strata $namespace CA" \
  --cert "platform=$service,$service.$namespace.svc,$service.$namespace.svc.cluster.local,localhost,127.0.0.1" \
  --cert "sidecar=strata-sidecar" --cert "edge=strata-edge" 2>/dev/null

# `strata keygen` prints "key:  <key>" and "hash: <hash>".
for who in tier app ops cluster; do
  "$strata" keygen 2>/dev/null > "$dir/$who.keygen"
  awk '$1 == "key:" { printf "%s", $2 }' "$dir/$who.keygen" > "$dir/$who-key"
  awk '$1 == "hash:" { printf "%s", $2 }' "$dir/$who.keygen" > "$dir/$who-key-hash"
done
echo "app key (tenant apps): $(cat "$dir/app-key")" >&2
echo "ops key (tenant ops, operator): $(cat "$dir/ops-key")" >&2

kubectl create secret generic strata-keys --namespace "$namespace" --dry-run=client -o yaml \
  --from-file=tier-key="$dir/tier-key" --from-file=tier-key-hash="$dir/tier-key-hash" \
  --from-file=app-key-hash="$dir/app-key-hash" --from-file=ops-key-hash="$dir/ops-key-hash" \
  --from-file=cluster-key="$dir/cluster-key" --from-file=cluster-key-hash="$dir/cluster-key-hash"
for tier in platform sidecar edge; do
  echo "---"
  kubectl create secret generic "strata-$tier-tls" --namespace "$namespace" --type kubernetes.io/tls \
    --dry-run=client -o yaml --from-file=tls.crt="$dir/$tier.pem" --from-file=tls.key="$dir/$tier.key" \
    --from-file=ca.crt="$dir/ca.pem"
done
