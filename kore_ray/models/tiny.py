"""Tiny randomly initialised models, built from configs in code, for tests and demos offline.

Nothing is downloaded: the tokenizer is a byte-level BPE with no merges (every byte is a token,
so any text encodes without unknown tokens) and the models are seeded random initialisations.

Sizes are chosen so that vLLM's CPU backend runs these models too: its attention kernels need a
head dimension of at least 32 (hidden 128 / 4 heads here), and vLLM's Qwen2 ignores `head_dim`.

The vision-language model is Idefics3 (`Idefics3ForConditionalGeneration`: SigLIP-style vision
tower, pixel-shuffle connector, Llama decoder; the architecture of SmolVLM), because it is the one
chat VLM that works here end to end without torchvision: transformers has a PIL image processor
for it and no video processor, and vLLM 0.32's `idefics3` module imports and serves it (checked
with an image chat request; the class declares LoRA support). LLaVA (KORE's own model family) and Qwen2-VL run in transformers, but vLLM's `llava`,
`qwen2_vl`, `qwen2_5_vl` and `gemma3_mm` modules import torchvision, and Qwen2-VL's processor
always builds a torchvision video processor. On GPU nodes, where torchvision works, real LLaVA or
Qwen2-VL checkpoints are fine: nothing in kore_ray depends on the tiny VLM's architecture.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    Idefics3VisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

from kore_ray.errors import ModelError

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
IMAGE_TOKEN = "<image>"
# Idefics3Processor writes each image as <fake_token_around_image><global-img><image>*N<fake...>;
# these are in the vocabulary from the start so the model's vocab size never changes afterwards.
_VLM_TOKENS = ("<fake_token_around_image>", IMAGE_TOKEN, "<end_of_utterance>", "<global-img>")
IMAGE_SIZE, PATCH_SIZE, SCALE_FACTOR = 32, 8, 2
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2  # pixel shuffle: 16 -> 4

_TEXT_ARCHS = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


def _chat_template(image_token: str | None) -> str:
    """Roles as `<|role|>` headers, each turn closed by EOS so generation learns to stop."""
    no_image = "{{ raise_exception('this tokenizer has no image token; use tiny_vlm') }}"
    image = image_token or no_image
    return (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
        "{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}"
        "{{ '<|' + message['role'] + '|>\\n' }}"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'text' %}{{ part['text'] }}"
        "{% elif part['type'] == 'image' %}" + image + "{% endif %}"
        "{% endfor %}{% endif %}{{ eos_token + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    )


def _tokenizer(extra_special: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    specials = [PAD, BOS, EOS, UNK, *extra_special]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    # Written into tokenizer.json, so BOS survives a save/load (the Gemma 3 lesson in STACK.md).
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="right",
        chat_template=_chat_template(IMAGE_TOKEN if IMAGE_TOKEN in extra_special else None),
    )


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer (260 tokens) that prepends BOS, pads right and has a chat template."""
    return _tokenizer()


def _seeded(seed: int, build):
    """Build under a private RNG state so the result depends on `seed` only, not on callers."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _text_config(arch: str, tokenizer: PreTrainedTokenizerFast):
    if arch not in _TEXT_ARCHS:
        raise ModelError(f"unknown tiny text arch {arch!r}; valid: {sorted(_TEXT_ARCHS)}")
    return _TEXT_ARCHS[arch][0](
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_text_model(
    arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A 2-layer Llama or Qwen2 causal LM (hidden 128, 4 heads, 2 KV heads) and its tokenizer."""
    tokenizer = tiny_tokenizer()
    config = _text_config(arch, tokenizer)
    model = _seeded(seed, lambda: _TEXT_ARCHS[arch][1](config))
    return model.to(dtype).eval(), tokenizer


def tiny_vlm(
    seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[Idefics3ForConditionalGeneration, Idefics3Processor]:
    """A tiny Idefics3 (images resized to 32x32, 4 image tokens each) and its processor."""
    tokenizer = _tokenizer(_VLM_TOKENS)
    config = Idefics3Config(
        vision_config=Idefics3VisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=IMAGE_SIZE,
            patch_size=PATCH_SIZE,
        ),
        text_config=_text_config("llama", tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        scale_factor=SCALE_FACTOR,
        pad_token_id=tokenizer.pad_token_id,
    )
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessorPil(
            size={"longest_edge": IMAGE_SIZE},
            max_image_size={"longest_edge": IMAGE_SIZE},
            do_image_splitting=False,  # one 32x32 view per image, no tiles
        ),
        tokenizer=tokenizer,
        image_seq_len=NUM_IMAGE_TOKENS,
        chat_template=tokenizer.chat_template,
    )
    model = _seeded(seed, lambda: Idefics3ForConditionalGeneration(config))
    return model.to(dtype).eval(), processor


def save_tiny_model(path: str | Path, kind: str = "llama", seed: int = 0) -> Path:
    """Write a loadable HF directory: config, safetensors weights, tokenizer or processor files."""
    if kind == "vlm":
        model, preprocessor = tiny_vlm(seed)
    elif kind in _TEXT_ARCHS:
        model, preprocessor = tiny_text_model(kind, seed)
    else:
        raise ModelError(f"unknown tiny model kind {kind!r}; valid: {sorted(_TEXT_ARCHS)} or 'vlm'")
    path = Path(path)
    model.save_pretrained(path)
    preprocessor.save_pretrained(path)
    return path
