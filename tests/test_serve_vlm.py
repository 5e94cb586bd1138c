"""Images through the served API: a tiny Idefics3 and a LoRA on its decoder, on the real engine,
equal to transformers (+ PEFT) on the same image chats. One app start (~1 min here)."""

import base64
import io
import socket

import httpx
import pytest
import torch
from PIL import Image

from kore_ray.config import load_config
from kore_ray.constraint import build_method, export_lora
from kore_ray.data.tokenize import render
from kore_ray.models import load_model
from kore_ray.models.targets import find_target_groups
from kore_ray.models.tiny import save_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.ray]

COLORS = [(255, 0, 0), (0, 0, 255)]
TEXT = "What colour is this?"
NEW_TOKENS = 8


def _url(color) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _reference(model, processor, color) -> list[int]:
    """transformers' greedy answer to the chat, rendered and tokenised as the server does.

    Compared as token ids: the random tiny model emits bytes that are not whole UTF-8 characters,
    and vLLM's incremental detokeniser holds those back where transformers' decode does not."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": TEXT}]}]
    text = render(processor, messages, add_generation_prompt=True)
    enc = processor(text=text, images=[Image.new("RGB", (32, 32), color)], return_tensors="pt",
                    add_special_tokens=False)
    with torch.no_grad():
        ids = model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False)
    return ids[0, enc.input_ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def served(ray_local, tmp_path_factory):
    from peft import PeftModel

    from kore_ray.serve import serving

    root = tmp_path_factory.mktemp("vlm")
    model_dir = save_tiny_model(root / "model", kind="vlm")
    model, processor = load_model(model_dir)
    groups = find_target_groups(model, include=["q_proj", "v_proj"])
    lora = build_method(model, "lora", groups, rank=8)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)  # trained-looking: the adapter changes the answers
    export_lora(lora, root / "adapters" / "colors", str(model_dir))
    base, processor = load_model(model_dir)
    refs = {"tiny-vlm": [_reference(base, processor, c) for c in COLORS]}
    adapted = PeftModel.from_pretrained(base, root / "adapters" / "colors")
    refs["colors"] = [_reference(adapted, processor, c) for c in COLORS]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_config(overrides=[
        f"model.name_or_path={model_dir}", "serve.served_model_name=tiny-vlm",
        f"serve.adapters={root / 'adapters'}", f"serve.port={port}", "serve.max_lora_rank=8",
        "serve.max_model_len=512", "serve.kv_cache_gib=1",
    ])
    with serving(cfg) as url, httpx.Client(base_url=url, timeout=600) as client:
        yield client, refs


def _ask(client, model, color) -> list[int]:
    r = client.post("/chat/completions", json={
        "model": model, "max_tokens": NEW_TOKENS, "temperature": 0, "return_token_ids": True,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _url(color)}},
            {"type": "text", "text": TEXT}]}]})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def test_image_chats_equal_transformers_for_the_base_and_an_adapter(served):
    client, refs = served
    for model in ("tiny-vlm", "colors"):
        assert [_ask(client, model, c) for c in COLORS] == refs[model]
    assert refs["tiny-vlm"][0] != refs["tiny-vlm"][1]  # the answer depends on the image
    assert refs["colors"] != refs["tiny-vlm"]
