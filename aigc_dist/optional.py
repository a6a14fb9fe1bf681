"""Dependencies aigc-dist installs only with an extra: an import that names the extra when it is missing.

A cluster image installs the package's core (`pip install aigc-dist`: train, backfill, serve); the
demo's report (matplotlib) and scikit-learn's digits (demo data, and the image quality measure) come
with `aigc-dist[demo]`, so a missing one is an error that says which extra, not a bare ModuleNotFoundError.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def optional_import(name: str, extra: str, purpose: str) -> ModuleType:
    """`importlib.import_module(name)`, or an ImportError naming the extra that installs it."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        package = name.split(".")[0]
        raise ImportError(f"{purpose} needs {package}, which aigc-dist installs with its {extra!r} extra: "
                          f"pip install 'aigc-dist[{extra}]'") from exc
