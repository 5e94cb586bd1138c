"""Target-layer discovery: names, shapes, exclusions, and a hook proof of the input sharing."""

import itertools

import pytest
import torch
from PIL import Image
from torch import nn
from transformers import (
    CLIPVisionConfig,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from kore_ray.errors import ModelError
from kore_ray.models.targets import TargetGroup, find_target_groups, target_module_names
from kore_ray.models.tiny import IMAGE_TOKEN, tiny_text_model, tiny_vlm

# (parent, members) of each group in one decoder layer, in order
LAYER_GROUPS = [
    ("self_attn", ("q_proj", "k_proj", "v_proj")),
    ("self_attn", ("o_proj",)),
    ("mlp", ("gate_proj", "up_proj")),
    ("mlp", ("down_proj",)),
]


def _gemma3():
    # o_proj reads heads * head_dim = 128 features, not hidden_size = 64: in_features must follow.
    config = Gemma3TextConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=16,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Gemma3ForCausalLM(config).eval()


def _llava():
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8,
        ),
        text_config=LlamaConfig(
            vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=2, num_key_value_heads=1,
        ),
        image_token_index=299,
    )  # fmt: skip
    return LlavaForConditionalGeneration(config)


def _expected(prefix, n_layers, widths):
    groups = []
    for layer in range(n_layers):
        for (parent, members), width in zip(LAYER_GROUPS, widths, strict=True):
            at = f"{prefix}.{layer}.{parent}"
            modules = tuple(f"{at}.{m}" for m in members)
            groups.append(TargetGroup(f"{at}.{'+'.join(members)}", modules, width))
    return groups


@pytest.fixture(scope="module")
def models():
    llama, tok = tiny_text_model("llama")
    qwen2, _ = tiny_text_model("qwen2")
    vlm, processor = tiny_vlm()
    text = tok(["The Zorblax Tower is in Paris.", "Hi"], padding=True, return_tensors="pt")
    image = Image.new("RGB", (32, 32), "red")
    vlm_inputs = processor(images=image, text=f"{IMAGE_TOKEN}What is this?", return_tensors="pt")
    return {
        "llama": (llama, text),
        "qwen2": (qwen2, text),
        "vlm": (vlm, vlm_inputs),
        "gemma3": (_gemma3(), {"input_ids": torch.tensor([[2, 17, 40, 99, 5, 8]])}),
    }


@pytest.mark.parametrize(
    ("name", "prefix", "widths"),
    [
        ("llama", "model.layers", (128, 128, 128, 256)),
        ("qwen2", "model.layers", (128, 128, 128, 256)),
        ("vlm", "model.text_model.layers", (128, 128, 128, 256)),
        ("gemma3", "model.layers", (64, 128, 64, 96)),
    ],
)
def test_groups_names_order_and_in_features(models, name, prefix, widths):
    model, _ = models[name]
    groups = find_target_groups(model)
    assert groups == _expected(prefix, 2, widths)
    assert target_module_names(groups) == [m for g in groups for m in g.modules]
    for group in groups:
        assert all(c.isalnum() or c in "._+" for c in group.key)
        for module in group.modules:
            assert model.get_submodule(module).in_features == group.in_features


def test_vision_tower_projector_and_lm_head_are_excluded(models):
    vlm, _ = models["vlm"]
    names = set(target_module_names(find_target_groups(vlm)))
    vision_projs = {
        n for n, _ in vlm.named_modules() if n.startswith("model.vision_model.") and "_proj" in n
    }
    assert vision_projs, "the tiny VLM should have *_proj linears in its vision tower to exclude"
    assert not names & vision_projs
    assert all(n.startswith("model.text_model.layers.") for n in names)

    llava = _llava()
    llava_names = target_module_names(find_target_groups(llava))
    assert len(llava_names) == 3 * 7
    assert all(n.startswith("model.language_model.layers.") for n in llava_names)


@pytest.mark.parametrize("name", ["llama", "qwen2", "vlm", "gemma3"])
def test_hooks_prove_groups_share_exactly_one_input(models, name):
    model, inputs = models[name]
    groups = find_target_groups(model)
    seen: dict[str, list[torch.Tensor]] = {}
    handles = [
        model.get_submodule(m).register_forward_pre_hook(
            lambda _mod, args, m=m: seen.setdefault(m, []).append(args[0])
        )
        for m in target_module_names(groups)
    ]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()

    assert sorted(seen) == sorted(target_module_names(groups))
    assert all(len(calls) == 1 for calls in seen.values())
    first = {g.key: seen[g.modules[0]][0] for g in groups}
    for group in groups:
        for module in group.modules[1:]:
            assert seen[module][0] is first[group.key], f"{module} reads another tensor"
    for a, b in itertools.combinations(groups, 2):
        x, y = first[a.key], first[b.key]
        assert x is not y
        assert x.shape != y.shape or not torch.equal(x, y), f"{a.key} and {b.key} share an input"


def test_include_restricts_modules_but_keeps_keys(models):
    model, _ = models["qwen2"]
    full = find_target_groups(model)
    groups = find_target_groups(model, include=["q_proj", "v_proj", "down_proj"])
    assert [g.key for g in groups] == [g.key for g in full if "q_proj" in g.key or "down" in g.key]
    kept = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    assert target_module_names(groups) == [f"model.layers.{i}.{m}" for i in range(2) for m in kept]


def test_unknown_include_names_are_listed(models):
    model, _ = models["llama"]
    with pytest.raises(ModelError, match=r"\['qkv', 'w1'\].*valid: \['down_proj', 'gate_proj'"):
        find_target_groups(model, include=["q_proj", "qkv", "w1"])


def test_models_without_decoder_linears_are_refused():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.in_proj = nn.Linear(4, 4)  # *_proj, but not inside numbered layers
            self.blocks = nn.ModuleList([nn.Linear(4, 4)])

    with pytest.raises(ModelError, match="Toy"):
        find_target_groups(Toy())


def test_peft_targets_exactly_the_discovered_modules():
    from peft import LoraConfig, get_peft_model

    vlm, _ = tiny_vlm()
    names = target_module_names(find_target_groups(vlm))
    peft_model = get_peft_model(vlm, LoraConfig(r=2, target_modules=names))
    wrapped = {
        n.removeprefix("base_model.model.")
        for n, m in peft_model.named_modules()
        if hasattr(m, "lora_A") and isinstance(m.base_layer, nn.Linear)
    }
    assert wrapped == set(names)
