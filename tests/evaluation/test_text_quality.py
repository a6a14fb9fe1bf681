"""Quality of the text generator: trained from scratch on CPU, it writes grounded copy for new pairs.

The byte-level Llama-family LM (preset `mini`) is trained with plain PyTorch (`train_lm`) on the synthetic world's
reference copy and judged on held-out (user, item) pairs: pairs it never saw, though their users and
items appear in other training pairs. An untrained model of the same shape is the control that shows
the grounding metric can fail.

The recipe is sized for a 2-core CPU. Width is what lets the model copy titles from the prompt: at
d_model=128 with 4 heads grounding is ~0.98 after 600 steps, while a 64-wide, 2-head model garbled
titles at that step count. The prompt keeps only the fields the copy needs (segment and locale pick
the phrase and language, title and category ground it): ~75 tokens instead of ~125 with the default
template, which makes a step ~30% cheaper at the same grounding.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from aigc_dist.data.prompts import PromptTemplate, encode_example, encode_prompt
from aigc_dist.data.synthetic import WorldConfig, make_world
from aigc_dist.engine.decode import DecodeRequest, decode_stream
from aigc_dist.evaluation.text import evaluate_text, perplexity
from aigc_dist.models.llama import LlamaLM, lm_config_from_preset
from aigc_dist.models.lm_train import collate_examples, lm_loss, train_lm
from aigc_dist.models.tokenizer import byte_level_tokenizer

Record = tuple[dict[str, Any], dict[str, Any], str]  # user features, item features, reference copy

TOK = byte_level_tokenizer()
WORLD = WorldConfig(num_users=400, num_items=120, candidates_per_user=8, seed=0)  # 3,200 pairs
TEMPLATE = PromptTemplate(user_fields=("segment", "locale"), item_fields=("title", "category"))
MODEL = lm_config_from_preset("mini")  # ~436k parameters
HELD_OUT = 200  # pairs kept out of training; the other 3,000 train
MAX_NEW_TOKENS = 120  # the longest reference copy is 106 bytes


@pytest.fixture(scope="module")
def split() -> tuple[list[Record], list[Record]]:
    """(train, held_out) records: a seeded random split of the world's (user, item) pairs."""
    records = make_world(WORLD).training_records()
    random.Random(0).shuffle(records)
    train, held_out = records[HELD_OUT:], records[:HELD_OUT]
    seen = {(u["user_id"], i["item_id"]) for u, i, _ in train}
    assert not any((u["user_id"], i["item_id"]) in seen for u, i, _ in held_out)
    return train, held_out


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


def score(model: LlamaLM, records: list[Record], temperature: float = 0.0) -> dict[str, float]:
    """Text measures of the copy for `records` (greedy unless a temperature is given, then seeded),
    plus the loss and perplexity of their reference copy."""
    users, items = [u for u, _, _ in records], [i for _, i, _ in records]
    prompts = [encode_prompt(u, i, TEMPLATE, TOK) for u, i, _ in records]
    requests = [DecodeRequest(p, MAX_NEW_TOKENS, temperature, seed=s) for s, p in enumerate(prompts)]
    finished = dict(decode_stream(model.eval(), requests, slots=64, eos_ids=[TOK.eos_id]))
    outputs = [finished[i] for i in range(len(requests))]
    scores = evaluate_text([TOK.decode(ids) for ids in outputs], users, items)
    examples = [encode_example(u, i, c, TEMPLATE, TOK, MODEL.max_position_embeddings) for u, i, c in records]
    model.eval()
    with torch.no_grad():
        loss = lm_loss(model, collate_examples(examples, TOK.pad_id)).item()
    return {**scores, "loss": loss, "perplexity": perplexity(loss)}


@pytest.mark.usefixtures("two_threads")
def test_untrained_model_copy_is_not_grounded(split) -> None:
    """The control: without training, the copy names neither title nor category, so the metric can fail."""
    _, held_out = split
    untrained = score(new_model(), held_out)
    assert untrained["grounding_rate"] < 0.2
    assert untrained["personalization_rate"] < 0.2
    assert untrained["loss"] > 4.0  # about ln(264) = 5.6, a uniform guess over the vocabulary
    # Greedy decoding of an untrained model can collapse onto special tokens and decode to nothing,
    # which would pass trivially; sampled copy is real (if random) text and must fail the metric too.
    sampled = score(new_model(), held_out, temperature=1.0)
    assert sampled["empty_rate"] < 0.1
    assert sampled["grounding_rate"] < 0.2 and sampled["personalization_rate"] < 0.2


@pytest.mark.slow
@pytest.mark.timeout(1200)  # ~80 s alone; seen at 423 s on a machine loaded 5x over, so leave headroom
@pytest.mark.usefixtures("two_threads")
def test_trained_model_grounds_copy_for_held_out_pairs(split) -> None:
    # Measured on 2 threads, nearly idle machine: 66-77 s of training (~0.12 s/step), ~78 s for this
    # file. Seed 0: grounding 0.985, personalization 0.415, held-out loss 0.096 (perplexity 1.10).
    # Seeds 0-4 (init, batch order and split): grounding 0.98-0.995 against the 0.9 bar,
    # personalization 0.40-0.85, loss 0.087-0.104, repetition <= 0.07.
    train, held_out = split
    examples = [encode_example(u, i, c, TEMPLATE, TOK, MODEL.max_position_embeddings) for u, i, c in train]
    model = new_model()
    start = time.perf_counter()
    losses = train_lm(model, examples, steps=600, batch_size=32, lr=3e-3, pad_id=TOK.pad_id, seed=0)
    elapsed = time.perf_counter() - start
    trained = score(model, held_out)
    print(f"text LM: trained in {elapsed:.1f}s, last train loss {losses[-1]:.3f}, held out {trained}")

    assert trained["grounding_rate"] >= 0.9
    assert trained["loss"] < 0.25  # perplexity < 1.3 on held-out copy
    assert trained["empty_rate"] == 0.0 and trained["repetition_rate"] < 0.2
