"""Every metric of aigc-dist: names, help texts, units, label sets, and their two export paths.

Names and labels are defined here and nowhere else (docs/metrics.md lists them; a test checks the
rules and the Grafana dashboard against `SPECS`). Each metric has one export path:

- `exporter="ray"`: recorded inside Ray actors, Ray Train workers and Serve replicas through
  `ray.util.metrics`; Ray's metrics agent serves them on each node's metrics export port, where
  Prometheus (a PodMonitor under KubeRay) scrapes them. Prometheus sees them with Ray's `ray_`
  prefix: `aigc_generated_tokens_total` is `ray_aigc_generated_tokens_total` there.
- `exporter="driver"`: recorded by a job driver with prometheus-client into its own registry,
  served on the driver's `/metrics` (`MetricsConfig.host`/`port`) and optionally pushed to a
  Pushgateway when a batch job ends. Prometheus sees them under the name given here.

Usage in an actor or a Serve replica (create in `__init__`; the Ray metrics are made on first use):

    metrics = ActorMetrics("serve", {"run": "aigc", "model": artifact_name})
    metrics.inc("aigc_requests_total", route="/v1/generate", status="200")
    metrics.observe("aigc_request_latency_seconds", 0.042, route="/v1/generate")

and in a driver:

    metrics = DriverMetrics({"run": run_id})
    port = metrics.serve_http("127.0.0.1", 9464)   # None if the port is taken: the job goes on
    metrics.inc("aigc_backfill_rows_total", 100, status="ok")
    metrics.push("http://pushgateway:9091", job="aigc-backfill")
    metrics.close()

Labels are bounded on purpose: a label must be declared in the metric's spec (anything else
raises), label names come from `ALLOWED_LABELS` (never a user, item or request id), and a label
that takes more than `MAX_LABEL_VALUES` distinct values in one process raises, since that is a
per-request value sneaking in. Base labels (`base_tags` / `base_labels`) fill the labels a spec
declares and are ignored by specs that do not declare them.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from typing import Any, Literal

log = logging.getLogger(__name__)

Kind = Literal["counter", "gauge", "histogram"]
Exporter = Literal["ray", "driver"]

# Ray's metrics agent exports application metrics under this namespace.
RAY_PREFIX = "ray_"
# Label names a metric may have. All take a small, fixed set of values per deployment.
ALLOWED_LABELS = frozenset({
    "run",        # backfill run_id, training run name, or the Serve application name
    "component",  # backfill | serve | train: who recorded it
    "status",     # ok | error | quarantined | filtered, or an HTTP status code
    "model",      # the artifact's name
    "route",      # the API route template, e.g. /v1/generate (never a raw path with ids)
    "kind",       # data | errors: the kind of file written
})
# Units (plural, Prometheus style) a name ends with; `ratio` and `loss` are dimensionless.
UNITS = ("seconds", "bytes", "rows", "tokens", "images", "samples", "requests", "ratio", "loss")
MAX_LABEL_VALUES = 100
_NAME_RE = re.compile(r"^aigc_[a-z][a-z0-9_]*[a-z0-9]$")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# A generate call is one @serve.batch batch (ms, a few rows) or one backfill shard (minutes, 100k rows).
BATCH_SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
                         3600.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096, 16384, 65536, 262144)
STEP_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True)
class MetricSpec:
    """One metric: a bad name, label or bucket list fails here, at import time."""

    name: str  # as prometheus-client writes it (counters end in _total); Ray metrics get RAY_PREFIX too
    kind: Kind
    help: str
    labels: tuple[str, ...]
    exporter: Exporter
    buckets: tuple[float, ...] = ()  # histograms only: upper bounds, increasing, > 0

    def __post_init__(self) -> None:
        problems = []
        if not _NAME_RE.match(self.name):
            problems.append("names are aigc_ + lowercase snake_case")
        base = self.name.removesuffix("_total")
        if (self.kind == "counter") != self.name.endswith("_total"):
            problems.append("counters, and only counters, end in _total")
        if not base.endswith(tuple(f"_{unit}" for unit in UNITS)):
            problems.append(f"the name (before _total) ends with a unit: one of {', '.join(UNITS)}")
        if self.kind == "histogram":
            if not self.buckets or list(self.buckets) != sorted(set(self.buckets)) or self.buckets[0] <= 0:
                problems.append("histogram buckets are increasing and > 0")
        elif self.buckets:
            problems.append("only histograms have buckets")
        bad = [label for label in self.labels if label not in ALLOWED_LABELS]
        if bad:
            problems.append(f"labels {bad} are not in ALLOWED_LABELS")
        if len(set(self.labels)) != len(self.labels):
            problems.append("labels repeat")
        if self.exporter == "ray" and "component" not in self.labels:
            problems.append("Ray-exported metrics carry a component label")
        if problems:
            raise ValueError(f"metric {self.name}: {'; '.join(problems)}")

    @property
    def prometheus_name(self) -> str:
        """The name Prometheus stores (histograms add _bucket, _sum and _count to it)."""
        return RAY_PREFIX + self.name if self.exporter == "ray" else self.name


_WORK = ("component", "run", "model")  # who, for which run or app, with which model
SPECS: dict[str, MetricSpec] = {spec.name: spec for spec in (
    # Generation, in backfill generator actors and Serve replicas.
    MetricSpec("aigc_generate_rows_total", "counter", "Rows through the generate stage, by outcome "
               "(ok: content produced; error: the engine refused the row).", (*_WORK, "status"), "ray"),
    MetricSpec("aigc_generated_tokens_total", "counter", "New tokens generated (text).", _WORK, "ray"),
    MetricSpec("aigc_generated_images_total", "counter", "Images generated.", _WORK, "ray"),
    MetricSpec("aigc_generate_batch_seconds", "histogram", "Wall time of one generate call to the engine "
               "(Serve: one @serve.batch batch; backfill: one shard).", _WORK, "ray", BATCH_SECONDS_BUCKETS),
    MetricSpec("aigc_generate_batch_size_rows", "histogram", "Rows in one generate call to the engine "
               "(Serve: one @serve.batch batch; backfill: one shard).", _WORK, "ray", BATCH_SIZE_BUCKETS),
    # Serve requests.
    MetricSpec("aigc_requests_total", "counter", "HTTP requests answered, by route and status code.",
               ("component", "run", "route", "status"), "ray"),
    MetricSpec("aigc_request_latency_seconds", "histogram", "Time from request received to answer sent.",
               ("component", "run", "route"), "ray", LATENCY_BUCKETS),
    # Training, recorded by the rank 0 worker (it holds the all-reduced figures and times every step).
    MetricSpec("aigc_train_step_seconds", "histogram", "Wall time of one optimizer step (rank 0).", _WORK,
               "ray", STEP_SECONDS_BUCKETS),
    MetricSpec("aigc_train_tokens_total", "counter", "Tokens trained on, over all workers.", _WORK, "ray"),
    MetricSpec("aigc_train_samples_total", "counter", "Samples trained on, over all workers.", _WORK, "ray"),
    MetricSpec("aigc_train_loss", "gauge", "Mean training loss over the last log window, all workers.",
               _WORK, "ray"),
    # Backfill driver: committed shards are the source of truth (a shard counts once, however often
    # it was generated); generated rows move between commits, so a stalled run shows as such.
    MetricSpec("aigc_backfill_rows_total", "counter", "Input rows committed by this driver, by status "
               "(ok rows are the generated output; quarantined and filtered rows went to errors/).",
               ("run", "status"), "driver"),
    MetricSpec("aigc_backfill_tokens_total", "counter", "Generated tokens in the rows this driver committed.",
               ("run",), "driver"),
    MetricSpec("aigc_backfill_input_rows", "gauge", "Rows in the run's input (its plan).", ("run",), "driver"),
    MetricSpec("aigc_backfill_generated_rows_total", "counter", "Input rows this driver's generate tasks "
               "accounted for (generated, or failed before or during generation), committed or not yet.",
               ("run",), "driver"),
    MetricSpec("aigc_backfill_progress_ratio", "gauge", "Share of the run's input rows done, 0 to 1: committed "
               "(all sessions of the run) plus generated by this driver in shards not yet committed.",
               ("run",), "driver"),
    MetricSpec("aigc_storage_written_bytes_total", "counter", "Bytes of output files committed, by kind "
               "(data, errors, openai_output or openai_errors).", ("run", "kind"), "driver"),
)}


def spec(name: str) -> MetricSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise KeyError(f"unknown metric {name!r}: define it in aigc_dist/metrics.py SPECS") from None


class _LabelGuard:
    """Checks label names against a spec and caps the distinct values each label takes."""

    def __init__(self, base: dict[str, Any], exporter: Exporter):
        bad = [key for key in base if key not in ALLOWED_LABELS]
        if bad:
            raise ValueError(f"labels {bad} are not allowed (allowed: {sorted(ALLOWED_LABELS)})")
        self.base = {key: str(value) for key, value in base.items()}
        self.exporter = exporter
        self._seen: dict[tuple[str, str], set[str]] = {}
        self._lock = threading.Lock()

    def resolve(self, name: str, labels: dict[str, Any]) -> tuple[MetricSpec, dict[str, str]]:
        metric = spec(name)
        if metric.exporter != self.exporter:
            owner = "ActorMetrics (Ray)" if metric.exporter == "ray" else "DriverMetrics (prometheus-client)"
            raise ValueError(f"{name} is exported through {owner}")
        undeclared = [key for key in labels if key not in metric.labels]
        if undeclared:
            raise ValueError(f"{name} has no label(s) {undeclared}; its labels are {list(metric.labels)}")
        values = {key: self.base[key] for key in metric.labels if key in self.base}
        values.update({key: str(value) for key, value in labels.items()})
        missing = [key for key in metric.labels if key not in values]
        if missing:
            raise ValueError(f"{name} needs a value for label(s) {missing}")
        with self._lock:
            for key, value in values.items():
                seen = self._seen.setdefault((name, key), set())
                if value not in seen and len(seen) >= MAX_LABEL_VALUES:
                    raise ValueError(f"{name}: label {key} took more than {MAX_LABEL_VALUES} distinct values "
                                     f"(now {value!r}); labels must never carry per-request values")
                seen.add(value)
        return metric, values


# One Ray metric object per name and process: actors of one process share them.
_ray_metrics: dict[str, Any] = {}
_ray_lock = threading.Lock()


def _ray_metric(metric: MetricSpec) -> Any:
    with _ray_lock:
        found = _ray_metrics.get(metric.name)
        if found is None:
            from ray.util import metrics as ray_metrics

            # Ray adds _total to counters itself (and the ray_ prefix to every name).
            name = metric.name.removesuffix("_total")
            if metric.kind == "counter":
                found = ray_metrics.Counter(name, metric.help, metric.labels)
            elif metric.kind == "gauge":
                found = ray_metrics.Gauge(name, metric.help, metric.labels)
            else:
                found = ray_metrics.Histogram(name, metric.help, list(metric.buckets), metric.labels)
            _ray_metrics[metric.name] = found
        return found


class ActorMetrics:
    """Records `exporter="ray"` metrics from a Ray actor, Ray Train worker or Serve replica."""

    def __init__(self, component: str, base_tags: dict[str, Any] | None = None):
        self._guard = _LabelGuard({**(base_tags or {}), "component": component}, "ray")

    def inc(self, name: str, value: float = 1, **labels: Any) -> None:
        """Add `value` to a counter; a value <= 0 records nothing (Ray rejects it)."""
        metric, tags = self._guard.resolve(name, labels)
        if metric.kind != "counter":
            raise TypeError(f"{name} is a {metric.kind}, not a counter")
        if value > 0:
            _ray_metric(metric).inc(value, tags)

    def observe(self, name: str, value: float, **labels: Any) -> None:
        metric, tags = self._guard.resolve(name, labels)
        if metric.kind != "histogram":
            raise TypeError(f"{name} is a {metric.kind}, not a histogram")
        _ray_metric(metric).observe(value, tags)

    def set(self, name: str, value: float, **labels: Any) -> None:
        metric, tags = self._guard.resolve(name, labels)
        if metric.kind != "gauge":
            raise TypeError(f"{name} is a {metric.kind}, not a gauge")
        _ray_metric(metric).set(value, tags)

    @staticmethod
    def flush() -> None:
        """Wait one and a half of Ray's export intervals, so what this process recorded has been exported.

        Ray exports a process's metrics on a timer (`metrics_report_interval_ms`, at least 1 s), so a
        worker that exits right after its last step would take that step's figures with it. Ray has
        no call that forces or confirms an export, so this waits past the next timer tick. Call it
        once before a short-lived worker returns.
        """
        import time

        import ray

        interval_s = max(ray._config.metrics_report_interval_ms(), 1000) / 1000
        time.sleep(1.5 * interval_s)  # one full export after the last record, whatever the timer's phase


class DriverMetrics:
    """Records `exporter="driver"` metrics in a job driver; serves them and pushes them."""

    def __init__(self, base_labels: dict[str, Any] | None = None):
        from prometheus_client import CollectorRegistry

        self._guard = _LabelGuard(base_labels or {}, "driver")
        self.registry = CollectorRegistry()
        self._metrics: dict[str, Any] = {}
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def _metric(self, metric: MetricSpec) -> Any:
        found = self._metrics.get(metric.name)
        if found is None:
            import prometheus_client as pc

            common = {"name": metric.name, "documentation": metric.help, "labelnames": metric.labels,
                      "registry": self.registry}
            if metric.kind == "counter":
                found = pc.Counter(**common)
            elif metric.kind == "gauge":
                found = pc.Gauge(**common)
            else:
                found = pc.Histogram(**common, buckets=metric.buckets)
            self._metrics[metric.name] = found
        return found

    def _child(self, name: str, kind: Kind, labels: dict[str, Any]) -> Any:
        metric, values = self._guard.resolve(name, labels)
        if metric.kind != kind:
            raise TypeError(f"{name} is a {metric.kind}, not a {kind}")
        found = self._metric(metric)
        return found.labels(**values) if metric.labels else found

    def inc(self, name: str, value: float = 1, **labels: Any) -> None:
        child = self._child(name, "counter", labels)
        if value > 0:
            child.inc(value)

    def observe(self, name: str, value: float, **labels: Any) -> None:
        self._child(name, "histogram", labels).observe(value)

    def set(self, name: str, value: float, **labels: Any) -> None:
        self._child(name, "gauge", labels).set(value)

    def serve_http(self, host: str, port: int) -> int | None:
        """Serve `/metrics` on host:port (0 = a free port) on a daemon thread; returns the bound port.

        A port that cannot be bound logs a warning and returns None: metrics never fail a job.
        """
        from prometheus_client import start_http_server

        if self._server is not None:
            return self._server.server_address[1]
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            log.warning("metrics: cannot serve /metrics on %s:%d (%s); going on without it", host, port, exc)
            return None
        bound = self._server.server_address[1]
        log.info("metrics: serving /metrics on http://%s:%d/metrics", host, bound)
        return bound

    def push(self, pushgateway_url: str, job: str) -> bool:
        """Push every metric to a Pushgateway, grouped by job and the base labels; False if it failed
        (logged, never raised: a finished job stays finished)."""
        from prometheus_client import push_to_gateway

        try:
            push_to_gateway(pushgateway_url, job=job, registry=self.registry, grouping_key=self._guard.base,
                            timeout=10)
        except Exception as exc:  # any network or HTTP failure of the push
            log.warning("metrics: push to %s failed (%s); the figures stay on /metrics until exit",
                        pushgateway_url, exc)
            return False
        return True

    def close(self) -> None:
        """Stop the HTTP server, if one runs."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._server = self._thread = None
