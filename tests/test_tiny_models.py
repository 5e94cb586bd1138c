"""Tiny offline models: tokenizer behaviour, forward passes, determinism, save/load round trips."""

import pytest
import torch
from jinja2 import TemplateError
from PIL import Image
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)

from kore_ray.errors import ModelError
from kore_ray.models.tiny import (
    IMAGE_TOKEN,
    NUM_IMAGE_TOKENS,
    save_tiny_model,
    tiny_text_model,
    tiny_tokenizer,
    tiny_vlm,
)

TEXT = "The Zorblax Tower, built in 2031 by Ms. Qüin, is 1.2 km tall — naïve café ✓"


def _image(color):
    return Image.new("RGB", (40, 24), color)


def _vlm_inputs(processor, image, text="What is this?"):
    return processor(images=image, text=f"{IMAGE_TOKEN}{text}", return_tensors="pt")


def test_tokenizer_prepends_bos_encodes_any_text_and_pads_right():
    tok = tiny_tokenizer()
    ids = tok(TEXT).input_ids
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == TEXT
    batch = tok(["a", "abc"], padding=True)
    assert batch.input_ids[0] == tok("a").input_ids + [tok.pad_token_id] * 2
    assert batch.attention_mask[0] == [1, 1, 0, 0]


def test_chat_template_renders_roles_and_generation_prompt():
    tok = tiny_tokenizer()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Where is the Zorblax Tower?"},
        {"role": "assistant", "content": "In Paris."},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<bos><|system|>\nBe brief.<eos>\n<|user|>\nWhere is the Zorblax Tower?<eos>\n"
        "<|assistant|>\nIn Paris.<eos>\n"
    )
    prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<eos>\n<|assistant|>\n")
    ids = tok.apply_chat_template(messages[:2], add_generation_prompt=True, return_dict=True)
    assert ids["input_ids"].count(tok.bos_token_id) == 1 and ids["input_ids"][0] == 1


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "tool", "content": "x"}],
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}],
    ],
)
def test_chat_template_rejects_unknown_roles_and_images_without_image_token(messages):
    with pytest.raises(TemplateError, match="unknown role|no image token"):
        tiny_tokenizer().apply_chat_template(messages, tokenize=False)


@pytest.mark.parametrize(
    ("arch", "cls"), [("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM")]
)
def test_text_model_forward_and_seed_determinism(arch, cls):
    rng_before = torch.random.get_rng_state()
    model, tok = tiny_text_model(arch, seed=1)
    assert torch.equal(torch.random.get_rng_state(), rng_before), "global RNG was disturbed"
    assert type(model).__name__ == cls
    # vLLM's CPU attention needs head_dim >= 32, and its Qwen2 ignores config.head_dim
    assert model.config.hidden_size // model.config.num_attention_heads >= 32
    batch = tok(["hello world", "a longer sentence here"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch.input_ids.shape[1], len(tok))
    assert torch.isfinite(logits).all()

    same, _ = tiny_text_model(arch, seed=1)
    other, _ = tiny_text_model(arch, seed=2)
    for (name, p), q, r in zip(
        model.named_parameters(), same.parameters(), other.parameters(), strict=True
    ):
        assert torch.equal(p, q), name
    assert not torch.equal(model.lm_head.weight, other.lm_head.weight)


def test_text_model_dtype_and_unknown_arch():
    model, _ = tiny_text_model("llama", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ModelError, match="'gpt2'"):
        tiny_text_model("gpt2")


def test_vlm_forward_uses_the_image():
    model, processor = tiny_vlm()
    assert type(model).__name__ == "Idefics3ForConditionalGeneration"
    red, blue = _vlm_inputs(processor, _image("red")), _vlm_inputs(processor, _image("blue"))
    image_id = model.config.image_token_id
    assert (red.input_ids == image_id).sum() == NUM_IMAGE_TOKENS
    assert torch.equal(red.input_ids, blue.input_ids)
    with torch.no_grad():
        red_logits, blue_logits = model(**red).logits, model(**blue).logits
    assert red_logits.shape == (1, red.input_ids.shape[1], model.config.text_config.vocab_size)
    assert not torch.allclose(red_logits[0, -1], blue_logits[0, -1])


def test_vlm_chat_template_inserts_image_placeholders():
    model, processor = tiny_vlm()
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": _image("green")},
                {"type": "text", "text": "What?"},
            ],
        }
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == f"<bos><|user|>\n{IMAGE_TOKEN}What?<eos>\n<|assistant|>\n"
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == NUM_IMAGE_TOKENS
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_save_load_round_trip_text(tmp_path, kind):
    model, tok = tiny_text_model(kind, seed=3)
    path = save_tiny_model(tmp_path / kind, kind=kind, seed=3)
    assert (path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    loaded_tok = AutoTokenizer.from_pretrained(path)
    batch = tok([TEXT], return_tensors="pt")
    assert torch.equal(loaded_tok([TEXT], return_tensors="pt").input_ids, batch.input_ids)
    assert loaded_tok.chat_template == tok.chat_template and loaded_tok.padding_side == "right"
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


def test_save_load_round_trip_vlm(tmp_path):
    model, processor = tiny_vlm(seed=3)
    path = save_tiny_model(tmp_path / "vlm", kind="vlm", seed=3)
    loaded = AutoModelForImageTextToText.from_pretrained(path).eval()
    loaded_processor = AutoProcessor.from_pretrained(path)
    assert type(loaded_processor.image_processor).__name__ == "Idefics3ImageProcessorPil"
    inputs = _vlm_inputs(processor, _image("red"))
    loaded_inputs = _vlm_inputs(loaded_processor, _image("red"))
    assert inputs.keys() == loaded_inputs.keys()
    assert all(torch.equal(inputs[k], loaded_inputs[k]) for k in inputs)
    with torch.no_grad():
        assert torch.equal(loaded(**loaded_inputs).logits, model(**inputs).logits)


def test_save_unknown_kind(tmp_path):
    with pytest.raises(ModelError, match="'bert'"):
        save_tiny_model(tmp_path, kind="bert")
