"""Request validation without a server: the hard ceilings, the deployment's limits, printable errors."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from aigc_dist.config import ServeConfig
from aigc_dist.serve.app import deployment_options
from aigc_dist.serve.schemas import GenerateBody, check_generate_limits, describe_problems

LIMITS = ServeConfig(max_requests_per_call=2, max_new_tokens_cap=32, max_features=2, max_value_chars=10)


def _body(**request: object) -> dict:
    return {"requests": [{"user": {"segment": "runner"}, "item_id": "i1", **request}]}


def test_a_request_needs_a_user_and_an_item_by_id_or_by_features():
    with pytest.raises(ValidationError, match="give item_id or item features"):
        GenerateBody.model_validate({"requests": [{"user_id": "u1"}]})
    GenerateBody.model_validate({"requests": [{"user_id": "u1", "item": {"title": "Tent"}}]})


def test_the_deployments_limits_name_each_offending_field():
    body = GenerateBody.model_validate({"requests": [
        {"user": {"a": "x" * 11, "b": "ok", "c": "ok"}, "item_id": "i" * 11, "max_new_tokens": 33}]})
    locs = [problem["loc"] for problem in check_generate_limits(body, LIMITS)]
    assert ["body", "requests", 0, "max_new_tokens"] in locs
    assert ["body", "requests", 0, "item_id"] in locs
    assert ["body", "requests", 0, "user"] in locs            # three features, two allowed
    assert ["body", "requests", 0, "user", "a"] in locs       # eleven characters, ten allowed
    too_many = GenerateBody.model_validate({"requests": [_body()["requests"][0]] * 3})
    assert [p["loc"] for p in check_generate_limits(too_many, LIMITS)] == [["body", "requests"]]
    assert check_generate_limits(GenerateBody.model_validate(_body(max_new_tokens=32)), LIMITS) == []


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_sampling_values_are_rejected(value):
    with pytest.raises(ValidationError):
        GenerateBody.model_validate(_body(temperature=value))


def test_error_details_are_json_safe_and_short_whatever_the_input():
    with pytest.raises(ValidationError) as caught:
        GenerateBody.model_validate(_body(user={"segment": "\ud800" + "y" * 5000}))
    detail = describe_problems(caught.value.errors())
    encoded = json.dumps(detail, ensure_ascii=False).encode("utf-8")  # must not raise on the surrogate
    assert len(encoded) < 600
    assert [problem["loc"] for problem in detail] == [["requests", 0, "user", "segment"]]
    assert "surrogate" in detail[0]["msg"]


def test_deployment_options_follow_the_config():
    fixed = deployment_options(ServeConfig(min_replicas=2, max_replicas=2, max_queued_requests=5, retry_after_s=3))
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    assert fixed["max_queued_requests"] == 5 and fixed["backpressure_config"] == {"retry_after_s": 3}
    scaled = deployment_options(ServeConfig(min_replicas=0, max_replicas=4, target_ongoing_requests=3))
    assert scaled["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 4, "target_ongoing_requests": 3}
    assert set(scaled["user_config"]) == {"artifact", "image_artifact", "max_batch_size", "batch_wait_timeout_s"}


def test_the_token_budget_counts_each_requests_max_new_tokens_or_the_default():
    limits = ServeConfig(max_new_tokens_cap=32, default_max_new_tokens=10, max_tokens_per_call=50)
    at_budget = GenerateBody.model_validate({"requests": [*_body(max_new_tokens=30)["requests"],
                                                          *_body()["requests"] * 2]})  # 30 + 10 + 10
    assert check_generate_limits(at_budget, limits) == []
    over = GenerateBody.model_validate({"requests": at_budget.model_dump()["requests"] + _body(max_new_tokens=1)[
        "requests"]})
    [problem] = check_generate_limits(over, limits)
    assert problem["loc"] == ["body", "requests"] and problem["input"] == 51
    assert "51 new tokens" in problem["msg"] and "budget is 50" in problem["msg"]
    with pytest.raises(ValidationError, match=r"max_tokens_per_call \(16\) must be >= max_new_tokens_cap \(32\)"):
        ServeConfig(max_new_tokens_cap=32, max_tokens_per_call=16)
