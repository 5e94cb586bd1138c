"""The serving core without an engine: requests, auth, adapter checks and registry, chat prompts."""

import asyncio
import base64
import io
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from kore_ray.config import load_config
from kore_ray.errors import InputError
from kore_ray.models.tiny import save_tiny_model, tiny_text_model
from kore_ray.serve import openai_api
from kore_ray.serve.adapters import (
    AdapterError,
    AdapterRegistry,
    adapter_path,
    base_linear_shapes,
    check_adapter,
    check_name,
    sync_prefix,
)
from kore_ray.serve.protocol import APIError, check_auth, parse_json, token_digest

Q, V = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"
P = "base_model.model."  # PEFT's prefix of saved LoRA weights


# --- requests: vLLM's schemas behind our JSON and image checks --------------------------------

@pytest.mark.parametrize("raw, where", [(b"{not json", "not valid JSON"),
                                        (b"[1, 2]", "JSON object"), (b"\xff", "not valid JSON")])
def test_bodies_that_are_not_json_objects_are_400(raw, where):
    with pytest.raises(APIError, match=where) as e:
        parse_json(raw)
    assert e.value.status == 400 and e.value.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("kind, body, param", [
    ("completion", {"model": "m"}, "prompt"),
    ("chat", {"model": "m", "messages": "hi"}, "messages"),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "n": "two"}, "n"),
])
def test_invalid_requests_are_400_naming_the_field(kind, body, param):
    with pytest.raises(APIError) as e:
        openai_api.request(kind, body)
    assert e.value.status == 400 and e.value.param == param


def test_the_full_request_surface_parses():
    chat = openai_api.request("chat", {
        "model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True,
        "stream_options": {"include_usage": True}, "logprobs": True, "top_logprobs": 3, "n": 2,
        "stop": ["\n"], "seed": 7,
        "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": {}}}})
    assert chat.stream and chat.stream_options.include_usage and chat.top_logprobs == 3
    done = openai_api.request("completion", {"model": "m", "prompt": [[1, 2], [3]], "logprobs": 2})
    assert done.logprobs == 2 and done.prompt == [[1, 2], [3]]


@pytest.mark.parametrize("part", [
    {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
    {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}},
    {"type": "video_url", "video_url": {"url": "http://10.0.0.1/v.mp4"}},
])
def test_remote_media_is_refused_before_vllm_could_fetch_it(part):
    body = {"model": "m", "messages": [{"role": "user", "content": [part]}]}
    with pytest.raises(APIError, match="does not fetch remote media") as e:
        openai_api.refuse_remote_images(body)
    assert e.value.status == 400
    inline = {"type": "image_url", "image_url": {"url": _png_url()}}
    openai_api.refuse_remote_images({"messages": [{"role": "user", "content": [inline]}]})


def test_frontend_args_are_vllm_serves_own():
    from kore_ray.data.tokenize import PLAIN_CHAT_TEMPLATE

    s = load_config(overrides=["serve.max_lora_rank=64", "serve.max_model_len=512",
                               "serve.kv_cache_gib=1",
                               "serve.vllm_args=[--enable-prefix-caching]"]).serve
    args = openai_api.frontend_args("/m", "base", s, "float32", PLAIN_CHAT_TEMPLATE)
    assert (args.model, args.served_model_name, args.max_lora_rank, args.max_model_len) == (
        "/m", ["base"], 64, 512)
    assert args.enable_lora and args.kv_cache_memory_bytes == 2**30
    assert args.chat_template == PLAIN_CHAT_TEMPLATE and args.enable_prefix_caching
    with pytest.raises(SystemExit):  # a flag vLLM does not know stops the start-up
        openai_api.frontend_args("/m", "base", s.model_copy(update={"vllm_args": ["--nope"]}),
                                 "float32", None)


def test_responses_keep_vllms_status_and_stream():
    from vllm.entrypoints.serve.engine.protocol import ErrorInfo, ErrorResponse

    error = ErrorResponse(error=ErrorInfo(message="too long", type="BadRequestError", code=400))
    r = openai_api.to_response(error)
    assert r.status_code == 400 and json.loads(r.body)["error"]["message"] == "too long"
    seen = []

    async def chunks():
        yield 'data: {"choices": [], "usage": null}\n\n'
        yield 'data: {"choices": [], "usage": {"completion_tokens": 3}}\n\n'
        yield "data: [DONE]\n\n"

    r = openai_api.to_response(chunks(), seen.append)
    assert r.media_type == "text/event-stream"

    async def drain():
        return [c async for c in r.body_iterator]

    assert len(asyncio.run(drain())) == 3 and seen == [{"completion_tokens": 3}]


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


def test_an_adapter_is_in_vllms_layer_before_a_request_can_find_it(shapes, tmp_path):
    """A scan loads adapters one by one; a request for one already loaded must reach vLLM's
    layer with it listed there, while the scan still loads the next (vLLM answered 404)."""
    from types import SimpleNamespace

    from kore_ray.config import ServeConfig
    from kore_ray.serve.serve_stage import KoreLLM

    root = tmp_path / "adapters"
    write_adapter(root / "a", shapes)
    write_adapter(root / "b", shapes)

    async def scenario():
        second, release = asyncio.Event(), asyncio.Event()

        async def add_lora(request):
            if request.lora_name == "b":
                second.set()
                await release.wait()  # the scan is still loading b
            return True

        replica = object.__new__(KoreLLM.func_or_class)
        replica.name, replica.settings = "base", ServeConfig()
        replica.registry = AdapterRegistry(str(root), shapes, max_rank=8, reserved=("base",))
        replica.engine, replica.models = SimpleNamespace(add_lora=add_lora), SimpleNamespace(
            lora_requests={})
        replica._lock, replica._scanned = asyncio.Lock(), float("-inf")
        scan = asyncio.create_task(replica._refresh())
        await second.wait()
        await replica._lora("a")  # found in the registry: it goes on to vLLM's layer
        assert "a" in replica.models.lora_requests
        release.set()
        await scan
        assert set(replica.models.lora_requests) == {"a", "b"}

    asyncio.run(scenario())


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
