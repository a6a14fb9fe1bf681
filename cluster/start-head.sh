#!/usr/bin/env bash
# Start a Ray head on this machine, with the Prometheus metrics export port set.
#
#   cluster/start-head.sh                                   # dashboard on 127.0.0.1:8265
#   AIGC_DASHBOARD_HOST=0.0.0.0 cluster/start-head.sh --num-cpus=8 --num-gpus=1
#
# Every Ray process of the node (raylet, workers, actors) exports its metrics on
# $AIGC_METRICS_EXPORT_PORT (/metrics, Prometheus text); Prometheus scrapes it there.
# Jobs are then submitted to http://<host>:$AIGC_DASHBOARD_PORT (`aigc-dist submit ...` or
# `ray job submit ...`); workers join with cluster/start-worker.sh <host>:$AIGC_GCS_PORT.
# Extra arguments go to `ray start` as they are. Stop with `ray stop` (it stops every Ray node of
# this machine).
set -euo pipefail
exec "${RAY:-ray}" start --head \
    --port="${AIGC_GCS_PORT:-6379}" \
    --dashboard-host="${AIGC_DASHBOARD_HOST:-127.0.0.1}" \
    --dashboard-port="${AIGC_DASHBOARD_PORT:-8265}" \
    --metrics-export-port="${AIGC_METRICS_EXPORT_PORT:-8080}" \
    --disable-usage-stats \
    "$@"
