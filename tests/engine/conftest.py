"""Fixtures of the engine's request, stop and streaming tests."""

from __future__ import annotations

import pytest

from aigc_dist.models.artifact import Artifact
from tests.engine.lm_artifacts import lm_artifact


@pytest.fixture(scope="session")
def random_lm() -> Artifact:
    """A random-weight LM on the byte-level tokenizer (see `lm_artifact`)."""
    return lm_artifact()
