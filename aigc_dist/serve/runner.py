"""`aigc-dist serve`: run the application on the Ray cluster at $RAY_ADDRESS, or on a local one."""

from __future__ import annotations

import logging
import math
import os
import signal
import threading

from aigc_dist.config import AigcConfig

log = logging.getLogger(__name__)

APP_NAME = "aigc"


def run_server(cfg: AigcConfig, stop: threading.Event | None = None) -> None:
    """Deploy, print where it answers, and serve until Ctrl-C / SIGTERM (or `stop` is set).

    Serve's HTTP options are cluster-wide and fixed when Serve first starts on a cluster: on a cluster
    already running Serve, `serve.host`/`serve.port`/`serve.request_timeout_s` are not applied (Ray
    says so in the log).
    """
    import ray
    from ray import serve

    from aigc_dist.serve.app import application

    app = application(cfg)  # config errors surface before anything starts
    address = os.environ.get("RAY_ADDRESS")
    if cfg.serve.api_keys_env and not address and not ray.is_initialized():
        from aigc_dist.serve.auth import load_api_keys

        load_api_keys(cfg.serve.api_keys_env)  # a local Ray's replicas get this environment: check it now
    if not ray.is_initialized():
        # A local instance gets at least the CPUs the replicas ask for, or they would wait forever.
        wanted = math.ceil(cfg.serve.cpus_per_replica * cfg.serve.max_replicas)
        ray.init(address=address, **({} if address else {"num_cpus": max(os.cpu_count() or 1, wanted)}))
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port,
                              "request_timeout_s": cfg.serve.request_timeout_s})
    serve.run(app, name=APP_NAME, route_prefix="/")
    print(f"aigc-dist serve: ready at http://{cfg.serve.host}:{cfg.serve.port} "
          f"(POST /v1/generate, POST /v1/images, GET /v1/models, GET /healthz, /docs; OpenAI-compatible POST "
          f"/v1/completions and /v1/chat/completions); Ctrl-C stops", flush=True)
    stop = stop or threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    print("aigc-dist serve: stopping", flush=True)
    serve.delete(APP_NAME)
    serve.shutdown()
