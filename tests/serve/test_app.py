"""The online API over real HTTP against a local Ray Serve app: answers, errors, images, models."""

from __future__ import annotations

import base64
import io

import pytest
import requests
from PIL import Image

from aigc_dist.engine.text import SamplingParams, TextEngine, TextRequest
from aigc_dist.models.artifact import load_artifact
from aigc_dist.storage import Storage

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def app_url(serve_cluster, serve_kit):
    url = serve_cluster.deploy("api", serve_kit.config(max_new_tokens_cap=150))
    yield url
    serve_cluster.delete("api")


def test_serve_and_engine_give_identical_copy_for_the_same_request_and_seed(app_url, serve_kit):
    engine = TextEngine(load_artifact(serve_kit.lm_v1, Storage()))
    bodies = [serve_kit.request(user=u, item=i, seed=s, max_new_tokens=10, temperature=t)
              for u, i, s, t in [(0, 0, 7, 0.8), (1, 2, 7, 0.8), (2, 5, 123, 1.0), (0, 0, 8, 0.0)]]
    response = serve_kit.post(f"{app_url}/v1/generate", {"requests": bodies})
    assert response.status_code == 200, response.text
    served = response.json()
    direct = engine.generate([TextRequest(user=b["user"], item=b["item"], seed=b["seed"],
                                          sampling=SamplingParams(max_new_tokens=10, temperature=b["temperature"]))
                              for b in bodies])
    assert [r["content"] for r in served["results"]] == [d.text for d in direct]
    assert [r["num_tokens"] for r in served["results"]] == [d.num_tokens for d in direct]
    assert any(r["content"] for r in served["results"])
    assert served["model"]["version"] == "v1" and served["model"]["digest"] == engine.artifact.digest


def test_ids_are_looked_up_in_the_profile_tables_and_unknown_ids_are_404_naming_the_id(app_url, serve_kit):
    by_id = serve_kit.post(f"{app_url}/v1/generate", {"requests": [{"user_id": "u1", "item_id": "i2", "seed": 3}]})
    # The users table holds u1 as a camper in de-DE: the same features sent inline give the same copy.
    by_features = serve_kit.post(f"{app_url}/v1/generate", {"requests": [{
        "user": {"segment": "camper", "locale": "de-DE"},
        "item": {"title": "Item number 2", "category": serve_kit.categories[2]}, "seed": 3}]})
    assert by_id.status_code == 200 and by_features.status_code == 200
    assert by_id.json()["results"][0]["content"] == by_features.json()["results"][0]["content"]
    assert by_id.json()["results"][0]["user_id"] == "u1"

    missing = serve_kit.post(f"{app_url}/v1/generate", {"requests": [{"user_id": "nobody", "item_id": "i1"}]})
    assert missing.status_code == 404
    assert "nobody" in missing.json()["detail"]


@pytest.mark.parametrize("bad, field", [
    ({"max_new_tokens": 151}, "max_new_tokens"),         # over the deployment's cap (150)
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"seed": 2**64}, "seed"),
    ({"colour": "red"}, "colour"),                        # unknown fields are rejected
    ({"user": {"segment": "x" * 2000}}, "segment"),      # over max_value_chars (1024)
    ({"user": {"segment": "\ud800"}}, "segment"),        # a lone surrogate has no UTF-8 form
])
def test_invalid_values_are_422_naming_the_field(app_url, serve_kit, bad, field):
    response = serve_kit.post(f"{app_url}/v1/generate", {"requests": [{**serve_kit.request(), **bad}]})
    assert response.status_code == 422, response.text
    assert any(field in [str(part) for part in problem["loc"]] for problem in response.json()["detail"]), \
        response.json()


def test_limits_on_body_size_and_requests_per_call(app_url, serve_kit):
    too_many = serve_kit.post(f"{app_url}/v1/generate", {"requests": [serve_kit.request()] * 65})
    assert too_many.status_code == 422 and too_many.json()["detail"][0]["loc"] == ["body", "requests"]
    huge = requests.post(f"{app_url}/v1/generate", data=b"{" + b" " * 2_000_000 + b"}",
                         headers={"content-type": "application/json"}, timeout=60)
    assert huge.status_code == 413
    chunked = requests.post(f"{app_url}/v1/generate", data=iter([b"[" * 600_000] * 3),
                            headers={"content-type": "application/json"}, timeout=60)
    assert chunked.status_code == 413


def test_a_request_over_the_models_context_is_422_naming_it(app_url, serve_kit):
    # Within the cap (150) but prompt + 150 new tokens exceed the model's 160-token context.
    response = serve_kit.post(f"{app_url}/v1/generate", {"requests": [serve_kit.request(),
                                                                       serve_kit.request(max_new_tokens=150)]})
    assert response.status_code == 422, response.text
    problem = response.json()["detail"][0]
    assert problem["loc"] == ["body", "requests", 1] and "context" in problem["msg"]


def test_images_are_decodable_pngs_and_labels_by_name_or_id_agree(app_url, serve_kit):
    body = {"requests": [{"label": "tents", "seed": 4}, {"label": 1, "seed": 4}, {"label": 0, "seed": 5}]}
    response = serve_kit.post(f"{app_url}/v1/images", body)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    images = [Image.open(io.BytesIO(base64.b64decode(r["png_base64"]))) for r in results]
    assert all(image.size == (16, 16) for image in images)
    assert results[0]["png_base64"] == results[1]["png_base64"]  # "tents" is class 1
    assert results[0]["png_base64"] != results[2]["png_base64"]
    unknown = serve_kit.post(f"{app_url}/v1/images", {"requests": [{"label": "boats"}]})
    assert unknown.status_code == 422 and "boats" in unknown.text


def test_models_health_and_openapi(app_url):
    models = requests.get(f"{app_url}/v1/models", timeout=30).json()
    assert {m["kind"] for m in models["models"]} == {"lm", "cgan"}
    assert requests.get(f"{app_url}/healthz", timeout=30).json()["status"] == "ok"
    schema = requests.get(f"{app_url}/openapi.json", timeout=30).json()
    assert {"/v1/generate", "/v1/images", "/v1/models", "/healthz"} <= set(schema["paths"])


def test_a_hugging_face_checkpoint_on_s3_serves_the_same_copy(app_url, serve_cluster, serve_kit, s3_server, s3_bucket):
    """The text model as a Hugging Face directory on the S3 server: same copy as the local copy of it."""
    from pathlib import Path

    from aigc_dist.storage import join_uri

    storage, uri = Storage(), join_uri(s3_bucket, "models/copy-test/v1")
    for file in Path(serve_kit.lm_v1).iterdir():
        storage.write_bytes(join_uri(uri, file.name), file.read_bytes())
    config = serve_kit.config(artifact=uri).model_copy(deep=True)
    config.storage.endpoint_url = s3_server.endpoint_url
    config.storage.access_key_id, config.storage.secret_access_key = "aigc-test-key", "aigc-test-secret"
    config.storage.region = "us-east-1"
    s3_url = serve_cluster.deploy("api-s3", config)
    try:
        bodies = [serve_kit.request(user=u, item=i, seed=s, max_new_tokens=10) for u, i, s in [(0, 1, 3), (2, 4, 9)]]
        from_s3 = serve_kit.post(f"{s3_url}/v1/generate", {"requests": bodies})
        local = serve_kit.post(f"{app_url}/v1/generate", {"requests": bodies})
        assert from_s3.status_code == local.status_code == 200, from_s3.text
        assert [r["content"] for r in from_s3.json()["results"]] == [r["content"] for r in local.json()["results"]]
        assert from_s3.json()["model"]["digest"] == local.json()["model"]["digest"]
    finally:
        serve_cluster.delete("api-s3")
