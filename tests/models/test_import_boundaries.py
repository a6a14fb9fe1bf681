"""Layering: models know nothing of Ray, DeepSpeed, S3 or Prometheus; the engine knows no Ray."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import pytest

import aigc_dist.engine
import aigc_dist.models

INFRASTRUCTURE = ["ray", "deepspeed", "boto3", "botocore", "prometheus_client", "pyarrow", "pydantic"]


def modules_of(package) -> list[str]:
    return [f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)]


def imported_after(modules: list[str]) -> set[str]:
    """Top-level packages in sys.modules after importing `modules` in a fresh interpreter."""
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted({n.split('.')[0] for n in sys.modules})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out))


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [(aigc_dist.models, INFRASTRUCTURE), (aigc_dist.engine, ["ray", "deepspeed", "prometheus_client"])],
    ids=["models", "engine"],
)
def test_package_does_not_import_infrastructure(package, forbidden):
    modules = modules_of(package)
    assert modules, f"{package.__name__} has no modules to check"
    leaked = imported_after(modules) & set(forbidden)
    assert not leaked, f"{package.__name__} imports {sorted(leaked)}"
