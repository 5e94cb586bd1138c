"""Stacking versions' LoRAs for the unmodified base, re-compressing past the rank limit, and
merging a version into the model the next one trains on."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from kore_ray.continual.stack import compress, merge_lora, read_lora, stack_loras
from kore_ray.errors import InputError
from kore_ray.models.tiny import tiny_text_model

IDS = torch.tensor([[1, 40, 50, 60, 70, 80, 90, 100]])


def _random_lora(model, directory, rank, seed, alpha=None):
    """A LoRA of `model` with random A and B (B is zero at PEFT's init: nothing to stack)."""
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=["q_proj", "v_proj",
                        "down_proj"], lora_dropout=0.0)
    peft = get_peft_model(model, config)
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    peft.save_pretrained(directory)
    return peft.unload()  # the model itself again, without the LoRA layers


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_the_stacked_export_equals_the_sequentially_merged_model(tmp_path):
    base, _ = tiny_text_model("llama", seed=0)
    model = tiny_text_model("llama", seed=0)[0]
    dirs = []
    for k, (rank, alpha) in enumerate([(4, 4), (2, 8), (3, 3)]):  # scaling 2 on version 2
        d = tmp_path / f"v{k + 1}"
        model = _random_lora(model, d, rank, seed=k, alpha=alpha)
        merge_lora(model, d)  # version k+1 trains on this
        dirs.append(d)
    record = stack_loras(dirs, tmp_path / "stack", "tiny")
    assert record["exported_rank"] == {"min": 9, "max": 9} and record["recompressed_modules"] == 0
    served = PeftModel.from_pretrained(base, tmp_path / "stack")
    want, got = _logits(model), _logits(served)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (want - _logits(tiny_text_model("llama", seed=0)[0])).abs().max() > 1e-3  # it moved


def test_past_the_rank_limit_each_module_is_recompressed_with_its_measured_error(tmp_path):
    model = tiny_text_model("llama", seed=0)[0]
    for k in range(2):
        model = _random_lora(model, tmp_path / f"v{k}", 6, seed=k)
        merge_lora(model, tmp_path / f"v{k}")
    record = stack_loras([tmp_path / "v0", tmp_path / "v1"], tmp_path / "stack", "tiny", max_rank=8)
    assert record["exported_rank"]["max"] == 8 and record["recompressed_modules"] > 0
    exact = {m: b @ a for m, (a, b) in _stacked(tmp_path).items()}
    cut = read_lora(tmp_path / "stack")
    worst = max(((b @ a - exact[m]).norm() / exact[m].norm()).item() for m, (a, b) in cut.items())
    assert worst == pytest.approx(record["recompression_max_rel_error"], rel=1e-3)
    assert 0 < worst < 1


def _stacked(tmp_path):
    record = stack_loras([tmp_path / "v0", tmp_path / "v1"], tmp_path / "exact", "tiny")
    assert record["exported_rank"]["max"] == 12
    return read_lora(tmp_path / "exact")


def test_compress_keeps_the_best_low_rank_part_and_is_exact_within_rank():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 40, generator=g, dtype=torch.float64), torch.randn(30, 5, generator=g,
                                                                             dtype=torch.float64)
    a2, b2, error = compress(a, b, 5)
    assert error < 1e-12 and torch.allclose(b2 @ a2, b @ a, atol=1e-10)
    a3, b3, error = compress(a, b, 3)
    s = torch.linalg.svdvals(b @ a)
    assert error == pytest.approx((s[3:].square().sum() / s.square().sum()).sqrt().item(), rel=1e-9)
    assert ((b3 @ a3 - b @ a).norm() / (b @ a).norm()).item() == pytest.approx(error, rel=1e-9)


def test_a_directory_that_is_not_a_lora_is_refused(tmp_path):
    with pytest.raises(InputError, match="not a LoRA adapter directory"):
        read_lora(tmp_path)
