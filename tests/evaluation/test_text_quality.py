"""Quality of the text generator: trained from scratch on CPU, it writes grounded copy for new users.

The byte-level Llama-family LM (preset `mini`) is the session's `trained_copy_model` (tests/conftest.py,
shared with the S3 backfill test): trained with plain PyTorch (`train_lm`) on the synthetic world's
reference copy of its first 400 users, and judged here on 200 pairs of the last 100 users, whom it never
saw (their segments, locales and items appear in other users' pairs). An untrained model of the same
shape is the control that shows the grounding metric can fail.

The recipe is sized for a 2-core CPU. Width is what lets the model copy titles from the prompt: at
d_model=128 with 4 heads grounding is ~0.98 after 600 steps, while a 64-wide, 2-head model garbled
titles at that step count.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from aigc_dist.data.prompts import encode_example, encode_prompt
from aigc_dist.demo.world import make_world, world_quality
from aigc_dist.engine.decode import DecodeRequest, decode_stream
from aigc_dist.evaluation.text import evaluate_text, perplexity
from aigc_dist.models.artifact import load_artifact
from aigc_dist.models.llama import LlamaLM, lm_config_from_preset
from aigc_dist.models.losses import collate_examples, lm_loss
from aigc_dist.models.tokenizer import byte_level_tokenizer
from aigc_dist.storage import Storage

Record = tuple[dict[str, Any], dict[str, Any], str]  # user features, item features, reference copy

TOK = byte_level_tokenizer()
MODEL = lm_config_from_preset("mini")  # ~436k parameters
HELD_OUT = 200  # pairs judged, drawn from the 1,000 pairs of users the model never saw
MAX_NEW_TOKENS = 120  # the longest reference copy is 106 bytes


@pytest.fixture(scope="module")
def held_out(copy_world) -> list[Record]:
    """200 (user, item, copy) records of users the trained model never saw, drawn with a fixed seed."""
    records = [r for r in make_world(copy_world.world).training_records()
               if r[0]["user_id"] in copy_world.held_out_users]
    assert len(records) == 1000
    return random.Random(0).sample(records, HELD_OUT)


@pytest.fixture
def two_threads() -> Iterator[None]:
    """The timing budget assumes 2 intra-op threads (this machine's cores), whatever the default."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def new_model() -> LlamaLM:
    """The model under test, freshly initialised: the same weights for the trained and the control run."""
    torch.manual_seed(0)
    return LlamaLM(MODEL)


def score(model: LlamaLM, records: list[Record], template, temperature: float = 0.0) -> dict[str, float]:
    """Text measures of the copy for `records` (greedy unless a temperature is given, then seeded),
    plus the loss and perplexity of their reference copy."""
    users, items = [u for u, _, _ in records], [i for _, i, _ in records]
    prompts = [encode_prompt(u, i, template, TOK) for u, i, _ in records]
    requests = [DecodeRequest(p, MAX_NEW_TOKENS, temperature, seed=s) for s, p in enumerate(prompts)]
    finished = dict(decode_stream(model.eval(), requests, slots=64, eos_ids=[TOK.eos_id]))
    outputs = [finished[i] for i in range(len(requests))]
    scores = evaluate_text([TOK.decode(ids) for ids in outputs], users, items, world_quality())
    examples = [encode_example(u, i, c, template, TOK, MODEL.max_position_embeddings) for u, i, c in records]
    model.eval()
    with torch.no_grad():
        loss = lm_loss(model, collate_examples(examples, TOK.pad_id)).item()
    return {**scores, "loss": loss, "perplexity": perplexity(loss)}


@pytest.mark.usefixtures("two_threads")
def test_untrained_model_copy_is_not_grounded(held_out, copy_world) -> None:
    """The control: without training, the copy names neither title nor category, so the metric can fail."""
    template = copy_world.template
    untrained = score(new_model(), held_out, template)
    assert untrained["grounding_rate"] < 0.2
    assert untrained["personalization_rate"] < 0.2
    assert untrained["loss"] > 4.0  # about ln(264) = 5.6, a uniform guess over the vocabulary
    # Greedy decoding of an untrained model can collapse onto special tokens and decode to nothing,
    # which would pass trivially; sampled copy is real (if random) text and must fail the metric too.
    sampled = score(new_model(), held_out, template, temperature=1.0)
    assert sampled["empty_rate"] < 0.1
    assert sampled["grounding_rate"] < 0.2 and sampled["personalization_rate"] < 0.2


@pytest.mark.slow
@pytest.mark.timeout(1200)  # the shared model's ~80 s of training on a quiet machine; minutes more under load
@pytest.mark.usefixtures("two_threads")
def test_trained_model_grounds_copy_for_users_it_never_saw(held_out, trained_copy_model) -> None:
    # Measured on 2 threads, nearly idle machine (random held-out pairs, 3,000 trained): 66-77 s of training
    # (~0.12 s/step). Seeds 0-4 (init, batch order and split): grounding 0.98-0.995 against the 0.9 bar,
    # personalization 0.40-0.85, held-out loss 0.087-0.104 (perplexity ~1.1), repetition <= 0.07.
    model = load_artifact(trained_copy_model.artifact, Storage()).model  # what was saved, not the object trained
    trained = score(model, held_out, trained_copy_model.template)
    losses = trained_copy_model.losses
    print(f"text LM: trained in {trained_copy_model.train_seconds:.1f}s, last train loss {losses[-1]:.3f}, "
          f"held out {trained}")

    assert len(losses) == 600 and sum(losses[-10:]) / 10 < 0.25
    assert trained["grounding_rate"] >= 0.9
    assert trained["loss"] < 0.25  # perplexity < 1.3 on held-out copy
    assert trained["empty_rate"] == 0.0 and trained["repetition_rate"] < 0.2
