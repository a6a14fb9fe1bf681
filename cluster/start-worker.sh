#!/usr/bin/env bash
# Join this machine to a Ray cluster as a worker node, with the metrics export port set.
#
#   cluster/start-worker.sh HEAD_HOST:6379                  # every CPU (and GPU) of this machine
#   cluster/start-worker.sh 10.0.0.5:6379 --num-gpus=4
#
# Like the head, the node exports its metrics on $AIGC_METRICS_EXPORT_PORT (/metrics). Extra
# arguments go to `ray start` as they are. Stop with `ray stop`.
set -euo pipefail
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: $0 HEAD_HOST:GCS_PORT [ray start options...]" >&2
    exit 2
fi
address=$1
shift
exec "${RAY:-ray}" start \
    --address="$address" \
    --metrics-export-port="${AIGC_METRICS_EXPORT_PORT:-8080}" \
    --disable-usage-stats \
    "$@"
