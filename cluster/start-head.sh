#!/usr/bin/env bash
# Start a Ray head on this machine, with the Prometheus metrics export port set.
#
#   cluster/start-head.sh                                   # dashboard on 127.0.0.1:8265
#   RAY_AUTH_MODE=token AIGC_DASHBOARD_HOST=10.0.0.5 cluster/start-head.sh --num-cpus=8 --num-gpus=1
#
# The dashboard runs the Jobs API, which runs any command for whoever reaches it (ShadowRay,
# CVE-2023-48022): on any address but loopback the script refuses to start it without Ray token
# authentication (RAY_AUTH_MODE=token and RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token).
#
# Every Ray process of the node (raylet, workers, actors) exports its metrics on
# $AIGC_METRICS_EXPORT_PORT (/metrics, Prometheus text); Prometheus scrapes it there.
# Jobs are then submitted to http://<host>:$AIGC_DASHBOARD_PORT (`aigc-dist submit ...` or
# `ray job submit ...`); workers join with cluster/start-worker.sh <host>:$AIGC_GCS_PORT.
# Extra arguments go to `ray start` as they are. Stop with `ray stop` (it stops every Ray node of
# this machine).
set -euo pipefail
dashboard_host=${AIGC_DASHBOARD_HOST:-127.0.0.1}
previous=
for arg in "$@"; do  # a --dashboard-host among the extra arguments is the one `ray start` takes
    case "$arg" in --dashboard-host=*) dashboard_host=${arg#*=} ;; esac
    if [ "$previous" = --dashboard-host ]; then dashboard_host=$arg; fi
    previous=$arg
done
case "$dashboard_host" in
    127.*|localhost|::1) ;;
    *) if [ "${RAY_AUTH_MODE:-}" != token ]; then
           echo "$0: refusing a dashboard on $dashboard_host without token auth: set RAY_AUTH_MODE=token" \
                "and a token, or leave AIGC_DASHBOARD_HOST unset (127.0.0.1)" >&2
           exit 2
       fi ;;
esac
exec "${RAY:-ray}" start --head \
    --port="${AIGC_GCS_PORT:-6379}" \
    --dashboard-host="$dashboard_host" \
    --dashboard-port="${AIGC_DASHBOARD_PORT:-8265}" \
    --metrics-export-port="${AIGC_METRICS_EXPORT_PORT:-8080}" \
    --disable-usage-stats \
    "$@"
