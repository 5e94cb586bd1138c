#!/usr/bin/env bash
# A local autoscaling Ray cluster: `up` starts a head that runs no work and lets Ray's
# autoscaler add and remove worker nodes (scripts/local_cluster.yaml, fake multi-node
# provider: real raylets on this machine); `down` stops every node. Token authentication is
# on, as Ray 2.60 does by default; clients need RAY_AUTH_MODE=token (printed below).
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  up)
    ray stop --force >/dev/null 2>&1 || true
    ray get-auth-token --generate >/dev/null
    RAY_FAKE_CLUSTER=1 AUTOSCALER_UPDATE_INTERVAL_S=1 RAY_AUTH_MODE=token \
      ray start --head --num-cpus=0 --disable-usage-stats \
      --autoscaling-config="$PWD/scripts/local_cluster.yaml" >/dev/null
    echo "local cluster up: dashboard and job server at http://127.0.0.1:8265"
    echo "  export RAY_AUTH_MODE=token RAY_ADDRESS=http://127.0.0.1:8265"
    echo "  ray status    # worker nodes appear as the autoscaler adds them"
    ;;
  down)
    ray stop --force >/dev/null
    echo "local cluster down"
    ;;
  *)
    echo "usage: $0 up|down" >&2
    exit 2
    ;;
esac
