"""The serving core without an engine: requests, auth, adapter checks and registry, chat prompts."""

import asyncio
import base64
import copy
import io
import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from kore_ray.config import load_config
from kore_ray.data.tokenize import render
from kore_ray.errors import InputError
from kore_ray.models.tiny import save_tiny_model, tiny_text_model
from kore_ray.serve.adapters import (
    AdapterError,
    AdapterRegistry,
    adapter_path,
    base_linear_shapes,
    check_adapter,
    check_name,
    sync_prefix,
)
from kore_ray.serve.prompts import chat_prompt
from kore_ray.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    check_auth,
    completion_response,
    parse_request,
    sampling_kwargs,
    token_digest,
)

Q, V = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"
P = "base_model.model."  # PEFT's prefix of saved LoRA weights


def _parse(model, body):
    return parse_request(model, json.dumps(body).encode() if not isinstance(body, bytes) else body)


# --- requests ---------------------------------------------------------------------------------

@pytest.mark.parametrize("body, where", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    ({"prompt": "x"}, "model: Field required"),
    ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "m", "prompt": "x", "temperature": 5}, "temperature"),
    ({"model": "m", "prompt": []}, "prompt must not be empty"),
    ({"model": "m", "prompt": "x", "stream": True}, "stream"),
    ({"model": "m", "prompt": "x", "logprobs": 3}, "logprobs: Extra inputs are not permitted"),
])
def test_malformed_completion_requests_are_400_naming_the_problem(body, where):
    with pytest.raises(APIError) as e:
        _parse(CompletionRequest, body)
    assert e.value.status == 400 and where in e.value.message
    assert e.value.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("body, where", [
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": [{"role": "tool", "content": "x"}]}, "role"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "needs `image_url`"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}],
      "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "schema"),
])
def test_malformed_chat_requests_are_400(body, where):
    with pytest.raises(APIError, match=where) as e:
        _parse(ChatCompletionRequest, body)
    assert e.value.status == 400


def test_completion_prompts_map_to_engine_prompts():
    def prompts(p):
        return _parse(CompletionRequest, {"model": "m", "prompt": p}).prompts()

    assert prompts("hi") == [{"prompt": "hi"}]
    assert prompts(["a", "b"]) == [{"prompt": "a"}, {"prompt": "b"}]
    assert prompts([5, 6]) == [{"prompt_token_ids": [5, 6]}]
    assert prompts([[5], [6, 7]]) == [{"prompt_token_ids": [5]}, {"prompt_token_ids": [6, 7]}]


def test_sampling_settings():
    req = _parse(CompletionRequest, {"model": "m", "prompt": "x", "temperature": 0, "stop": "\n"})
    kw = sampling_kwargs(req)
    assert kw["temperature"] == 0 and kw["max_tokens"] == 16 and kw["stop"] == "\n"
    assert "structured_outputs" not in kw
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    # chat's default: up to the end of the context
    assert sampling_kwargs(_parse(ChatCompletionRequest, chat))["max_tokens"] is None
    kw = sampling_kwargs(_parse(ChatCompletionRequest, {
        **chat, "max_tokens": 5, "max_completion_tokens": 7,
        "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}}))
    assert kw["max_tokens"] == 7 and kw["structured_outputs"] == {"json": {"type": "object"}}
    kw = sampling_kwargs(_parse(ChatCompletionRequest,
                                {**chat, "response_format": {"type": "json_object"}}))
    assert kw["structured_outputs"] == {"json_object": True}


def test_completion_choices_are_numbered_prompt_major():
    def out(*texts):
        return SimpleNamespace(prompt_token_ids=[1, 2], outputs=[
            SimpleNamespace(text=t, token_ids=[9] * len(t), finish_reason="length") for t in texts])

    body = completion_response("m", [out("a", "bb"), out("c", "d")])
    numbered = [(c["index"], c["text"]) for c in body["choices"]]
    assert numbered == [(0, "a"), (1, "bb"), (2, "c"), (3, "d")]
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}
    assert "token_ids" not in body["choices"][0]
    body = completion_response("m", [out("a", "bb")], token_ids=True)
    assert [c["token_ids"] for c in body["choices"]] == [[9], [9, 9]]


def test_bearer_auth():
    digest = token_digest("s3cret")
    check_auth("Bearer s3cret", digest)
    check_auth(None, None)  # no token configured: open
    for header in (None, "", "Bearer wrong", "Basic s3cret", "s3cret"):
        with pytest.raises(APIError) as e:
            check_auth(header, digest)
        assert e.value.status == 401 and e.value.body()["error"]["type"] == "authentication_error"


def test_replica_args_resolve_paths_and_read_the_token_here(tmp_path, monkeypatch):
    from kore_ray.serve.serve_stage import base_url, replica_args

    monkeypatch.chdir(tmp_path)
    cfg = load_config(overrides=["run_dir=runs/x", "serve.auth_token_env=KORE_TEST_TOKEN",
                                 "serve.host=0.0.0.0"])
    monkeypatch.delenv("KORE_TEST_TOKEN", raising=False)
    with pytest.raises(InputError, match="KORE_TEST_TOKEN"):
        replica_args(cfg)  # auth was asked for: never serve open by accident
    monkeypatch.setenv("KORE_TEST_TOKEN", "s3cret-value")
    args = replica_args(cfg)
    assert args.token_sha256 == token_digest("s3cret-value") and "s3cret" not in repr(args)
    assert args.adapters == str(tmp_path / "runs" / "x" / "adapter")
    assert args.model == args.name == "gemma-3-270m"
    assert base_url(cfg) == "http://127.0.0.1:8000/v1"
    s3 = load_config(overrides=["serve.adapters=s3://bucket/adapters", "model.name_or_path=./m"])
    assert replica_args(s3).adapters == "s3://bucket/adapters"
    assert replica_args(s3).model == str(tmp_path / "m") and replica_args(s3).name == "./m"


def test_serve_config_refuses_ranks_vllm_cannot_allocate():
    with pytest.raises(InputError, match="max_lora_rank"):
        load_config(overrides=["serve.max_lora_rank=48"])
    with pytest.raises(InputError, match="min_replicas"):
        load_config(overrides=["serve.min_replicas=3", "serve.max_replicas=2"])


# --- adapter names and checks -----------------------------------------------------------------

@pytest.mark.parametrize("name", ["../x", "..", "a/b", ".hidden", "", "a b", "x" * 200, "/etc"])
def test_adapter_names_cannot_leave_the_directory(tmp_path, name):
    with pytest.raises(AdapterError, match="invalid model name"):
        adapter_path(tmp_path, name)


def test_symlinks_out_of_the_adapter_directory_are_refused(tmp_path):
    (tmp_path / "outside").mkdir()
    (tmp_path / "adapters").mkdir()
    os.symlink(tmp_path / "outside", tmp_path / "adapters" / "evil")
    with pytest.raises(AdapterError, match="outside"):
        adapter_path(tmp_path / "adapters", "evil")
    assert check_name("kore-v1.2_b") == "kore-v1.2_b"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return base_linear_shapes(save_tiny_model(tmp_path_factory.mktemp("m") / "llama", kind="llama"))


def test_base_shapes_are_the_models_linear_layers(shapes):
    model, _ = tiny_text_model("llama")
    assert shapes == {n: tuple(m.weight.shape) for n, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear)}


def write_adapter(path, shapes, rank=4, modules=(Q, V), config=None, tensors=None):
    """A PEFT-format LoRA for the tiny Llama (the layout export_lora writes)."""
    path.mkdir(parents=True, exist_ok=True)
    if tensors is None:
        tensors = {}
        for m in modules:
            d_out, d_in = shapes[m]
            tensors[f"{P}{m}.lora_A.weight"] = torch.randn(rank, d_in)
            tensors[f"{P}{m}.lora_B.weight"] = torch.randn(d_out, rank)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": list(modules),
           "bias": "none", **(config or {})}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


def test_a_good_adapter_passes(shapes, tmp_path):
    assert check_adapter(write_adapter(tmp_path / "a", shapes), shapes, max_rank=8) == 4


@pytest.mark.parametrize("case, message", [
    ("rank", "rank 16 exceeds the server's max_lora_rank 8"),
    ("pattern", "rank 16 exceeds"),
    ("shape", "do not fit the base layer"),
    ("module", "not a linear layer of the base model"),
    ("half", "has lora_A only"),
    ("tensor", "unsupported tensor"),
    ("dora", "DoRA"),
    ("no_config", "not a LoRA adapter"),
    ("bin", "only safetensors"),
    ("corrupt", "unreadable adapter_model.safetensors"),
])
def test_bad_adapters_are_refused_with_the_reason(shapes, tmp_path, case, message):
    d_out, d_in = shapes[Q]
    path = tmp_path / case
    if case == "rank":
        write_adapter(path, shapes, rank=16)
    elif case == "pattern":  # a config rank within bounds, the tensors' rank above them
        write_adapter(path, shapes, rank=16, config={"r": 4, "lora_alpha": 4})
    elif case == "shape":
        write_adapter(path, shapes, tensors={f"{P}{Q}.lora_A.weight": torch.zeros(4, d_in + 1),
                                             f"{P}{Q}.lora_B.weight": torch.zeros(d_out, 4)})
    elif case == "module":
        nine = "model.layers.9.self_attn.q_proj"  # the tiny model has 2 layers
        write_adapter(path, shapes, tensors={f"{P}{nine}.lora_A.weight": torch.zeros(4, 8),
                                             f"{P}{nine}.lora_B.weight": torch.zeros(8, 4)})
    elif case == "half":
        write_adapter(path, shapes, tensors={f"{P}{Q}.lora_A.weight": torch.zeros(4, d_in)})
    elif case == "tensor":
        write_adapter(path, shapes, tensors={f"{P}lm_head.weight": torch.zeros(2, 2)})
    elif case == "dora":
        write_adapter(path, shapes, config={"use_dora": True})
    elif case == "no_config":
        write_adapter(path, shapes)
        (path / "adapter_config.json").unlink()
    elif case == "bin":
        write_adapter(path, shapes)
        (path / "adapter_model.safetensors").rename(path / "adapter_model.bin")
    elif case == "corrupt":
        write_adapter(path, shapes)
        data = (path / "adapter_model.safetensors").read_bytes()
        (path / "adapter_model.safetensors").write_bytes(data[:20])
    with pytest.raises(AdapterError, match=message):
        check_adapter(path, shapes, max_rank=8)


# --- the registry -----------------------------------------------------------------------------

class FakeEngine:
    """Stands in for vLLM's add_lora; `refuse` makes it fail as vLLM does."""

    def __init__(self):
        self.loaded, self.refuse = {}, set()

    async def load(self, adapter):
        if adapter.name in self.refuse:
            raise RuntimeError("Call to add_lora method failed: unsupported module")
        self.loaded[adapter.lora_id] = adapter.name


def _refresh(registry, engine):
    asyncio.run(registry.refresh(engine.load))


def test_registry_follows_the_directory(shapes, tmp_path):
    root, engine = tmp_path / "adapters", FakeEngine()
    registry = AdapterRegistry(str(root), shapes, max_rank=8, reserved=("base",))
    _refresh(registry, engine)  # no directory yet: nothing, no error
    assert registry.served() == []

    write_adapter(root / "a", shapes)
    write_adapter(root / "big", shapes, rank=16)
    write_adapter(root / "base", shapes)
    write_adapter(root / ".a.tmp.123", shapes)  # export's temporary directory: invisible
    _refresh(registry, engine)
    assert [a.name for a in registry.served()] == ["a"] and list(engine.loaded.values()) == ["a"]
    assert "max_lora_rank" in registry.get("big").error
    assert "base model's" in registry.get("base").error
    assert registry.get(".a.tmp.123") is None

    first = registry.get("a").lora_id
    _refresh(registry, engine)
    assert registry.get("a").lora_id == first  # unchanged: not reloaded

    shutil.rmtree(root / "a")
    write_adapter(root / "a", shapes, rank=2)  # rewritten: a new vLLM id, so vLLM loads it anew
    shutil.rmtree(root / "big")
    write_adapter(root / "big", shapes, rank=8)  # fixed: now served
    _refresh(registry, engine)
    second = registry.get("a").lora_id
    assert second != first and engine.loaded[second] == "a"
    assert engine.loaded[registry.get("big").lora_id] == "big"

    shutil.rmtree(root / "a")
    _refresh(registry, engine)
    assert registry.get("a") is None and [a.name for a in registry.served()] == ["big"]


def test_an_adapter_the_engine_refuses_is_refused_not_fatal(shapes, tmp_path):
    root, engine = tmp_path / "adapters", FakeEngine()
    write_adapter(root / "odd", shapes)
    write_adapter(root / "fine", shapes)
    engine.refuse.add("odd")
    registry = AdapterRegistry(str(root), shapes, max_rank=8)
    _refresh(registry, engine)
    assert "vLLM refused it: Call to add_lora method failed" in registry.get("odd").error
    assert [a.name for a in registry.served()] == ["fine"]


# --- adapters in an object store (a real S3 API: moto on loopback) ------------------------------

@pytest.fixture
def s3(s3):
    client, query, proc = s3
    client.create_bucket(Bucket="runs")
    return client, query, proc


def _upload(client, local, prefix):
    for f in local.iterdir():
        client.put_object(Bucket="runs", Key=f"{prefix}/{local.name}/{f.name}", Body=f.read_bytes())


def test_adapters_under_an_object_store_prefix(s3, shapes, tmp_path):
    client, query, server = s3
    _upload(client, write_adapter(tmp_path / "src" / "a", shapes), "exp/adapter")
    _upload(client, write_adapter(tmp_path / "src" / "b", shapes, rank=16), "exp/adapter")
    client.put_object(Bucket="runs", Key="exp/adapter/notes/readme.txt", Body=b"not an adapter")
    cache, engine = tmp_path / "cache", FakeEngine()
    registry = AdapterRegistry(f"s3://runs/exp/adapter{query}", shapes, max_rank=8, cache_dir=cache)
    _refresh(registry, engine)
    assert [a.name for a in registry.served()] == ["a"]
    assert "max_lora_rank" in registry.get("b").error
    assert sorted(p.name for p in cache.iterdir()) == ["a", "b"]

    _upload(client, write_adapter(tmp_path / "src2" / "b", shapes, rank=2), "exp/adapter")
    client.delete_object(Bucket="runs", Key="exp/adapter/a/adapter_config.json")
    client.delete_object(Bucket="runs", Key="exp/adapter/a/adapter_model.safetensors")
    _refresh(registry, engine)
    assert [a.name for a in registry.served()] == ["b"]
    assert engine.loaded[registry.get("b").lora_id] == "b"
    assert sorted(p.name for p in cache.iterdir()) == ["b"]
    before = (cache / "b" / "adapter_model.safetensors").stat().st_mtime_ns
    sync_prefix(f"s3://runs/exp/adapter{query}", cache)  # unchanged: not copied again
    assert (cache / "b" / "adapter_model.safetensors").stat().st_mtime_ns == before

    server.terminate()
    server.wait(timeout=10)
    _refresh(registry, engine)  # the store is gone: the last synced copies are still served
    assert [a.name for a in registry.served()] == ["b"]


# --- chat prompts -----------------------------------------------------------------------------

def _png_url(color=(255, 0, 0)):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _messages(*contents):
    body = {"model": "m", "messages": [{"role": "user", "content": c} for c in contents]}
    return _parse(ChatCompletionRequest, body).messages


def test_chat_on_a_base_model_renders_the_training_template():
    _, tok = tiny_text_model("llama")
    tok = copy.deepcopy(tok)
    tok.chat_template = None  # a base model like the embedded Gemma
    prompt = chat_prompt(tok, _messages([{"type": "text", "text": "Who wrote it?"}]), False)
    expected = render(copy.deepcopy(tok), [{"role": "user", "content": "Who wrote it?"}],
                      add_generation_prompt=True)
    assert prompt == {"prompt": expected} and expected.endswith("Question: Who wrote it?\nAnswer:")
    with pytest.raises(APIError, match="does not accept images") as e:
        chat_prompt(tok, _messages([{"type": "image_url", "image_url": {"url": _png_url()}}]),
                    accepts_images=False)
    assert e.value.status == 400


def test_image_parts_reach_the_engine_as_multi_modal_data(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(save_tiny_model(tmp_path / "vlm", kind="vlm"))
    prompt = chat_prompt(tok, _messages([
        {"type": "image_url", "image_url": {"url": _png_url((255, 0, 0))}},
        {"type": "text", "text": "and"},
        {"type": "image_url", "image_url": {"url": _png_url((0, 0, 255))}},
    ]), accepts_images=True)
    assert prompt["prompt"].count("<image>") == 2
    images = prompt["multi_modal_data"]["image"]
    assert [im.getpixel((0, 0)) for im in images] == [(255, 0, 0), (0, 0, 255)]  # message order


@pytest.mark.parametrize("url, message", [
    ("https://example.com/cat.png", "does not fetch remote images"),
    ("data:image/png;base64,!!!", "not a readable image"),
    ("data:image/png;base64," + base64.b64encode(b"not a png").decode(), "not a readable image"),
])
def test_unusable_images_are_400(url, message):
    _, tok = tiny_text_model("llama")
    with pytest.raises(APIError, match=message) as e:
        chat_prompt(tok, _messages([{"type": "image_url", "image_url": {"url": url}}]), True)
    assert e.value.status == 400
