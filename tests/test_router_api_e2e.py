"""The router's API contract through a real cluster (`LocalCluster`, processes on
127.0.0.1) and the official `openai` client: a model directory's generation_config.json
sampling defaults reach the engine through cluster.yaml, the launcher and the router;
the routing layer's own errors and GET /v1/models/{id} as uvicorn serves them."""

from __future__ import annotations

import json
import shutil

import httpx
import openai
import pytest

from cluster.config import ClusterConfig
from cluster.launcher import LocalCluster
from engine.builtin_models import resolve_builtin

MAX_NEW_TOKENS = 6


@pytest.fixture(scope="module")
def greedy_model(tmp_path_factory):
    """builtin:tiny whose generation_config.json makes greedy decoding of 6 tokens the default."""
    path = tmp_path_factory.mktemp("models") / "greedy-tiny"
    shutil.copytree(resolve_builtin("tiny"), path)
    config = json.loads((path / "generation_config.json").read_text())
    config.update(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    (path / "generation_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def cluster(greedy_model, tmp_path_factory):
    config = ClusterConfig.model_validate({
        "model": {"path": str(greedy_model), "dtype": "float32"},
        "router": {"port": 0},
        "kv_transfer": {"connector": "tcp", "abort_timeout_s": 30, "transfer_timeout_s": 10},
        "engine": {"num_blocks": 128, "block_size": 16, "max_num_seqs": 8, "max_model_len": 256},
        "prefill": {"replicas": 0, "devices": ["cpu"]},
        "decode": {"replicas": 0, "devices": ["cpu"]},
        "colocated": {"replicas": 1, "devices": ["cpu"]},
    })
    c = LocalCluster(config, run_dir=tmp_path_factory.mktemp("run"))
    c.start(timeout_s=180)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_the_models_generation_config_sets_the_defaults_a_request_leaves_out(client, greedy_model):
    prompt = "The quick brown fox jumps over"
    unset = [client.completions.create(model=str(greedy_model), prompt=prompt, max_tokens=None,
                                       extra_body={"ignore_eos": True}) for _ in range(2)]
    explicit = client.completions.create(model=str(greedy_model), prompt=prompt, max_tokens=MAX_NEW_TOKENS,
                                         temperature=0.0, extra_body={"ignore_eos": True})
    assert [u.usage.completion_tokens for u in unset] == [MAX_NEW_TOKENS, MAX_NEW_TOKENS]
    assert unset[0].choices[0].text == unset[1].choices[0].text == explicit.choices[0].text   # greedy
    chat = client.chat.completions.create(model=str(greedy_model), messages=[{"role": "user", "content": prompt}],
                                          extra_body={"ignore_eos": True})
    assert chat.usage.completion_tokens == MAX_NEW_TOKENS
    sampled = {client.completions.create(model=str(greedy_model), prompt=prompt, temperature=1.0, seed=seed,
                                         extra_body={"ignore_eos": True}).choices[0].text for seed in range(4)}
    assert len(sampled) > 1   # what the request sends still wins


def test_the_served_model_is_retrieved_by_its_directory_path_and_unknown_routes_are_openai_errors(
        client, cluster, greedy_model):
    assert client.models.retrieve(str(greedy_model)).id == str(greedy_model)   # a path with '/' in it
    with pytest.raises(openai.NotFoundError, match="is not served here"):
        client.models.retrieve("tiny")
    response = httpx.post(cluster.url + "/v1/responses", json={"model": str(greedy_model), "input": "hi"})
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"
    response = httpx.delete(cluster.url + "/v1/models")
    assert response.status_code == 405 and response.json()["error"]["code"] == 405
