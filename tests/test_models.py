"""Model loading: the embedded Gemma, local directories, object stores, and every bad path."""

import json
from pathlib import Path

import pytest

from kore_ray.errors import ModelError
from kore_ray.models import load_model, resolve_model_path
from kore_ray.models.gemma import convert_gguf

# (prompt, expected substring): facts the base model knows (STACK.md).
KNOWN_FACTS = [
    ("The Eiffel Tower is located in the city of", "Paris"),
    ("The chemical symbol for gold is", "Au"),
    ("Albert Einstein was born in the year", "1879"),
]


@pytest.mark.slow
def test_embedded_gemma_knows_facts(gemma):
    from kore_ray.models.generate import greedy_continuations

    model, tok = gemma
    assert tok("Paris").input_ids[0] == tok.bos_token_id == 2, "tokenizer must prepend <bos>"
    outs = greedy_continuations(model, tok, [p for p, _ in KNOWN_FACTS], max_new_tokens=6)
    for (prompt, want), got in zip(KNOWN_FACTS, outs):
        assert want in got, f"{prompt!r} -> {got!r}, expected {want!r}"


@pytest.mark.slow
def test_embedded_gemma_directory_is_plain_hf(gemma_dir):
    config = json.loads((gemma_dir / "config.json").read_text())
    assert "quantization_config" not in config  # loads in vLLM/transformers as plain fp32
    assert config["model_type"] == "gemma3_text" and config["num_hidden_layers"] == 18
    assert resolve_model_path("gemma-3-270m") == gemma_dir


def test_missing_model_path(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="no config.json"):
        load_model(tmp_path)


def test_unreadable_model_directory(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": "oops"')
    with pytest.raises(ModelError, match="could not load model"):
        load_model(tmp_path)


def test_bad_dtype(tmp_path):
    with pytest.raises(ModelError, match="dtype"):
        load_model(tmp_path, dtype="int3")


@pytest.mark.parametrize("content", [b"not a gguf at all", b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 64])
def test_corrupt_gguf_is_refused_and_leaves_nothing(tmp_path, content):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(content)
    out = tmp_path / "converted"
    with pytest.raises(ModelError, match=str(bad.name)):
        convert_gguf(bad, out)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]  # no temp dirs left behind


def test_missing_gguf(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        convert_gguf(tmp_path / "absent.gguf", tmp_path / "out")


def test_model_from_object_store(s3, tmp_path, monkeypatch):
    s3, query, _ = s3
    monkeypatch.setenv("KORE_CACHE", str(tmp_path / "cache"))
    s3.create_bucket(Bucket="models")
    s3.put_object(Bucket="models", Key="tiny/config.json", Body=b'{"model_type": "llama"}')
    s3.put_object(Bucket="models", Key="tiny/model.safetensors", Body=b"weights")
    s3.put_object(Bucket="models", Key="empty/readme.txt", Body=b"no model here")

    local = resolve_model_path(f"s3://models/tiny{query}")
    assert (local / "config.json").read_text() == '{"model_type": "llama"}'
    assert (local / "model.safetensors").read_bytes() == b"weights"
    assert resolve_model_path(f"s3://models/tiny{query}") == local  # cached, not fetched twice
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model_path(f"s3://models/empty{query}")
    leftovers = [p.name for p in Path(tmp_path / "cache" / "remote").iterdir()]
    assert leftovers == [local.name]  # the failed fetch left nothing behind
