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

    Serve's HTTP address is cluster-wide and fixed when Serve first starts on a cluster: on a
    cluster already running Serve, `serve.host`/`serve.port` are not applied (Ray says so in the log).
    """
    import ray
    from ray import serve

    from aigc_dist.serve.app import application

    app = application(cfg)  # config errors surface before anything starts
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        # A local instance gets at least the CPUs the replicas ask for, or they would wait forever.
        wanted = math.ceil(cfg.serve.cpus_per_replica * cfg.serve.max_replicas)
        ray.init(address=address, **({} if address else {"num_cpus": max(os.cpu_count() or 1, wanted)}))
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(app, name=APP_NAME, route_prefix="/")
    print(f"aigc-dist serve: ready at http://{cfg.serve.host}:{cfg.serve.port} "
          f"(POST /v1/generate, POST /v1/images, GET /v1/models, GET /healthz, /docs); Ctrl-C stops", flush=True)
    stop = stop or threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    print("aigc-dist serve: stopping", flush=True)
    serve.delete(APP_NAME)
    serve.shutdown()
