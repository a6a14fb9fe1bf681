"""Shared pieces of the Serve tests: tiny artifacts, profile tables, configs, an HTTP client."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
import torch

from aigc_dist.config import AigcConfig
from aigc_dist.data.prompts import PromptTemplate
from aigc_dist.engine.text import prompt_conditioning
from aigc_dist.models.artifact import save_artifact, save_text_artifact
from aigc_dist.models.cgan import CGANConfig, Generator
from aigc_dist.models.llama import LlamaLM, LMConfig
from aigc_dist.models.tokenizer import byte_level_tokenizer
from aigc_dist.storage import Storage

TEMPLATE = PromptTemplate(user_fields=("segment", "locale"), item_fields=("title", "category"),
                          max_field_chars=24, max_prompt_tokens=96)
CATEGORIES = ["shoes", "tents", "jackets"]
# Replicas get half a logical CPU: the session's Ray has 8, and backfill tests need theirs.
SERVE_DEFAULTS: dict[str, Any] = {"cpus_per_replica": 0.5, "default_max_new_tokens": 12, "max_new_tokens_cap": 64}


# A chat template (Qwen2's shape, plain-text turns) for the OpenAI routes' chat path; the model keeps its
# "markers" prompt layout for features, so one artifact serves messages and the aigc extension.
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def save_lm(uri: str, version: str, seed: int = 0, name: str = "copy-test", context: int = 160,
            chat_template: str | None = None, width: int = 32, layers: int = 2) -> str:
    """An untrained LM (2 layers, 32 wide): its copy is noise, but noise that a seed makes exactly reproducible."""
    torch.manual_seed(seed)
    model = LlamaLM(LMConfig(num_hidden_layers=layers, hidden_size=width, intermediate_size=width * 11 // 4,
                             max_position_embeddings=context))
    tokenizer = byte_level_tokenizer(context)
    if chat_template:
        tokenizer.config["chat_template"] = chat_template
    save_text_artifact(uri, model, Storage(), tokenizer=tokenizer, conditioning=prompt_conditioning(TEMPLATE),
                       metadata={"name": name, "version": version})
    return uri


def save_cgan(uri: str) -> str:
    torch.manual_seed(0)
    model = Generator(CGANConfig(image_size=16, num_classes=len(CATEGORIES)))
    save_artifact(uri, "cgan", model, Storage(), conditioning={"labels": CATEGORIES},
                  metadata={"name": "banner-test", "version": "v1"})
    return uri


class ServeKit:
    """Configs and calls of the Serve tests (a fixture, since test modules cannot import conftest)."""

    template = TEMPLATE
    categories = CATEGORIES

    def __init__(self, root: Path):
        self.root = root
        self.lm_v1 = save_lm(str(root / "lm-v1"), "v1", seed=0)
        self.lm_v2 = save_lm(str(root / "lm-v2"), "v2", seed=1)
        self.cgan = save_cgan(str(root / "cgan"))
        self.lm_chat = save_lm(str(root / "lm-chat"), "v1", seed=2, name="copy-chat", chat_template=CHAT_TEMPLATE)
        # Long and slow enough (4,096 positions, ~3 ms a token on one core) that its greedy stream of "x", which
        # never reaches EOS, outlasts by far a client that reads one chunk and hangs up.
        self.lm_long = save_lm(str(root / "lm-long"), "v1", seed=3, name="copy-long", context=4096, width=256,
                               layers=4)
        self.users = str(root / "users.parquet")
        self.items = str(root / "items.parquet")
        pq.write_table(pa.table({"user_id": [f"u{i}" for i in range(20)],
                                 "segment": [["runner", "camper", "commuter"][i % 3] for i in range(20)],
                                 "locale": [["en-US", "de-DE"][i % 2] for i in range(20)]}), self.users)
        pq.write_table(pa.table({"item_id": [f"i{i}" for i in range(10)],
                                 "title": [f"Item number {i}" for i in range(10)],
                                 "category": [CATEGORIES[i % 3] for i in range(10)]}), self.items)

    def config(self, **serve: Any) -> AigcConfig:
        return AigcConfig.model_validate({
            "serve": {"artifact": self.lm_v1, "image_artifact": self.cgan, **SERVE_DEFAULTS, **serve},
            "data": {"users": self.users, "items": self.items},
        })

    @staticmethod
    def request(user: int = 0, item: int = 0, seed: int = 0, **extra: Any) -> dict[str, Any]:
        return {"user": {"segment": ["runner", "camper", "commuter"][user % 3], "locale": "en-US"},
                "item": {"title": f"Item number {item}", "category": CATEGORIES[item % 3]}, "seed": seed, **extra}

    @staticmethod
    def post(url: str, body: Any, timeout: float = 60) -> requests.Response:
        return requests.post(url, json=body, timeout=timeout)

    def check_sheds_load(self, url: str, body: Any, retry_after: str = "2") -> None:
        """24 concurrent calls to an app admitting 1 + 1 queued: some are served, the rest get 503 with
        Retry-After (never another code), and the next call after the burst is served."""
        with ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(lambda _: self.post(f"{url}/v1/generate", body, timeout=120), range(24)))
        codes = [a.status_code for a in answers]
        assert set(codes) <= {200, 503}, codes
        assert codes.count(503) >= 1 and codes.count(200) >= 1, codes
        assert all(a.headers.get("retry-after") == retry_after for a in answers if a.status_code == 503)
        assert self.post(f"{url}/v1/generate", body).status_code == 200


@pytest.fixture(scope="session")
def serve_kit(tmp_path_factory: pytest.TempPathFactory) -> ServeKit:
    return ServeKit(tmp_path_factory.mktemp("serve"))
