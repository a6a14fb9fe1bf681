"""The shared text engine: same request + seed -> same copy, bad requests fail alone."""

from __future__ import annotations

import pytest
import torch

from aigc_dist.data.prompts import PromptTemplate, encode_prompt
from aigc_dist.demo.world import WorldConfig, make_world
from aigc_dist.engine.decode import DecodeRequest, decode_stream
from aigc_dist.engine.text import SamplingParams, TextEngine, TextRequest, prompt_conditioning
from aigc_dist.models.artifact import Artifact, ArtifactError, load_artifact, save_artifact, save_text_artifact
from aigc_dist.models.llama import LlamaLM, LMConfig
from aigc_dist.models.tokenizer import byte_level_tokenizer
from aigc_dist.storage import Storage, join_uri

TOK = byte_level_tokenizer()
TEMPLATE = PromptTemplate(max_field_chars=24, max_prompt_tokens=128)


@pytest.fixture(scope="module")
def world():
    return make_world(WorldConfig(num_users=20, num_items=15, candidates_per_user=3, seed=3))


@pytest.fixture(scope="module")
def artifact() -> Artifact:
    torch.manual_seed(0)
    model = LlamaLM(LMConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=88,
                             max_position_embeddings=192)).eval()
    meta = {"name": "t", "version": "v1", "digest": "0" * 64}
    return Artifact("lm", model, model.config, TOK, prompt_conditioning(TEMPLATE), meta)


def requests_for(world, n: int, sampling: SamplingParams) -> list[TextRequest]:
    users = {u["user_id"]: u for u in world.users.to_pylist()}
    items = {i["item_id"]: i for i in world.items.to_pylist()}
    rows = world.candidates.slice(0, n).to_pylist()
    return [
        TextRequest(users[r["user_id"]], items[r["item_id"]], seed=k, sampling=sampling) for k, r in enumerate(rows)
    ]


def greedy_reference(model: LlamaLM, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding by full recompute of the sequence per token: no cache, no batching, no layout."""
    ids: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([prompt + ids]))[0][0, -1].argmax())
            if token == TOK.eos_id:
                break
            ids.append(token)
    return ids


def test_engine_equals_direct_decode_of_its_prompts(world, artifact):
    sampling = SamplingParams(max_new_tokens=16, temperature=0.9, top_k=50)
    requests = requests_for(world, 6, sampling)
    results = TextEngine(artifact).generate(requests)
    prompts = [encode_prompt(r.user, r.item, TEMPLATE, TOK) for r in requests]
    decode = [DecodeRequest(p, 16, 0.9, 50, None, r.seed) for p, r in zip(prompts, requests, strict=True)]
    direct = dict(decode_stream(artifact.model, decode, slots=2, eos_ids=[TOK.eos_id]))
    direct = [direct[i] for i in range(len(decode))]
    assert [r.text for r in results] == [TOK.decode(t) for t in direct]
    assert [r.num_tokens for r in results] == [len(t) for t in direct]
    assert all(r.error is None and r.prompt_tokens == len(p) for r, p in zip(results, prompts, strict=True))


def test_a_prompt_encoded_by_the_caller_gives_the_features_copy(world, artifact):
    """The backfill encodes each row's prompt once (to check it fits) and hands the ids to the engine."""
    requests = requests_for(world, 4, SamplingParams(max_new_tokens=12, temperature=0.8))
    encoded = [TextRequest(seed=r.seed, sampling=r.sampling, prompt_ids=encode_prompt(r.user, r.item, TEMPLATE, TOK))
               for r in requests]
    features, ids = TextEngine(artifact).generate(requests), TextEngine(artifact).generate(encoded)
    assert [(r.text, r.prompt_tokens) for r in ids] == [(r.text, r.prompt_tokens) for r in features]
    too_long = TextRequest(prompt_ids=encoded[0].prompt_ids, sampling=SamplingParams(max_new_tokens=190))
    assert "exceeds the model's context" in TextEngine(artifact).generate([too_long])[0].error
    with pytest.raises(ValueError, match="prompt_ids"):
        TextRequest(prompt="hello", prompt_ids=[1, 2])


def test_same_seed_same_copy_and_batch_size_does_not_matter(world, artifact):
    requests = requests_for(world, 8, SamplingParams(max_new_tokens=12, temperature=1.0))
    whole = TextEngine(artifact, max_batch_size=8).generate(requests)
    again = TextEngine(artifact, max_batch_size=8).generate(requests)
    assert [r.text for r in whole] == [r.text for r in again]
    reseeded = [TextRequest(r.user, r.item, seed=r.seed + 100, sampling=r.sampling) for r in requests]
    assert [r.text for r in TextEngine(artifact).generate(reseeded)] != [r.text for r in whole]


def test_mixed_sampling_params_keep_request_order(world, artifact):
    greedy, sampled = SamplingParams(max_new_tokens=8, temperature=0), SamplingParams(max_new_tokens=5)
    mixed = requests_for(world, 6, greedy)
    for k in (1, 3, 5):
        mixed[k].sampling = sampled
    results = TextEngine(artifact, max_batch_size=2).generate(mixed)
    alone = [TextEngine(artifact).generate([r])[0] for r in mixed]
    assert [r.text for r in results] == [r.text for r in alone]
    assert all(r.num_tokens <= r_req.sampling.max_new_tokens for r, r_req in zip(results, mixed, strict=True))


def test_bad_requests_fail_alone(world, artifact):
    good = requests_for(world, 2, SamplingParams(max_new_tokens=8, temperature=0))
    missing_title = TextRequest(good[0].user, {"category": "books"}, sampling=good[0].sampling)
    too_long = TextRequest(good[0].user, good[0].item, sampling=SamplingParams(max_new_tokens=190))
    results = TextEngine(artifact).generate([good[0], missing_title, too_long, good[1]])
    assert results[0].error is None and results[3].error is None
    assert "title" in results[1].error and results[1].text == ""
    assert "exceeds the model's context" in results[2].error


def test_sampling_params_are_validated():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)


def test_engine_from_s3_artifact_matches_in_memory(world, artifact, s3_bucket):
    storage, uri = Storage(), join_uri(s3_bucket, "models", "t", "v1")
    save_text_artifact(uri, artifact.model, storage, conditioning=prompt_conditioning(TEMPLATE))
    requests = requests_for(world, 4, SamplingParams(max_new_tokens=10, temperature=0.7))
    from_s3 = TextEngine.from_uri(uri, storage).generate(requests)
    assert [r.text for r in from_s3] == [r.text for r in TextEngine(artifact).generate(requests)]


def test_engine_refuses_wrong_artifacts(tmp_path, artifact):
    from aigc_dist.models.cgan import CGANConfig, Generator

    storage = Storage()
    save_artifact(str(tmp_path / "gan"), "cgan", Generator(CGANConfig()), storage)
    with pytest.raises(ArtifactError, match="needs an lm artifact"):
        TextEngine(load_artifact(str(tmp_path / "gan"), storage))
    save_text_artifact(str(tmp_path / "lm"), artifact.model, storage)  # no template
    with pytest.raises(ArtifactError, match="prompt_template"):
        TextEngine(load_artifact(str(tmp_path / "lm"), storage))


def test_a_request_gets_the_same_copy_alone_static_and_continuous(world, artifact):
    """Same request + seed -> same copy whatever the schedule and the neighbours; greedy copy equals the
    model's full-recompute reference."""
    many = requests_for(world, 12, SamplingParams(max_new_tokens=6, temperature=1.0))
    for k, length in enumerate([3, 40, 1, 25, 8, 2, 30, 5, 12, 4, 20, 9]):  # uneven, so slots refill
        many[k].sampling = SamplingParams(max_new_tokens=length, temperature=0 if k % 3 else 0.9, top_k=50)
    target = TextRequest(many[0].user, many[0].item, seed=42, sampling=SamplingParams(max_new_tokens=30))
    alone = TextEngine(artifact).generate([target])[0]
    static = TextEngine(artifact, max_batch_size=4, scheduling="static").generate([*many[:5], target])[-1]
    continuous = TextEngine(artifact, max_batch_size=3).generate([*many[5:], target, *many[:5]])[7]
    assert alone.text == static.text == continuous.text and alone.num_tokens == continuous.num_tokens

    greedy = [r for r in many if r.sampling.temperature == 0]
    results = TextEngine(artifact, max_batch_size=3).generate(greedy)
    for request, result in zip(greedy, results, strict=True):
        prompt = encode_prompt(request.user, request.item, TEMPLATE, TOK)
        expected = greedy_reference(artifact.model, prompt, request.sampling.max_new_tokens)
        assert result.text == TOK.decode(expected)
        assert result.finished == (len(expected) < request.sampling.max_new_tokens)


def test_scheduling_is_validated(artifact):
    with pytest.raises(ValueError, match="scheduling must be 'continuous' or 'static'.*'dynamic'"):
        TextEngine(artifact, scheduling="dynamic")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_on_cuda(world, artifact, dtype):
    model = LlamaLM(artifact.model_config).to("cuda", dtype).eval()
    model.load_state_dict(artifact.model.state_dict())
    on_gpu = Artifact("lm", model, model.config, TOK, artifact.conditioning, artifact.metadata)
    requests = requests_for(world, 10, SamplingParams(max_new_tokens=24, temperature=0.8))
    for k, request in enumerate(requests):
        request.sampling = SamplingParams(max_new_tokens=4 + 5 * k, temperature=0.8 if k % 2 else 0)
    engine = TextEngine(on_gpu, max_batch_size=4)
    first, again = engine.generate(requests), engine.generate(requests)
    assert [r.text for r in first] == [r.text for r in again]
    assert all(r.error is None and r.num_tokens <= q.sampling.max_new_tokens for r, q in zip(first, requests,
                                                                                             strict=True))
