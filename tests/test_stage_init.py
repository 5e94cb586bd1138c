"""`kore init` on a run directory: every method saves, reloads on the unmodified base, skips when done."""

import json

import pytest
import torch

from kore_ray.config import load_config
from kore_ray.constraint import collect_covariance, save_store
from kore_ray.constraint.init_stage import load_trainable, run_init
from kore_ray.errors import InputError
from kore_ray.models import load_model
from kore_ray.models.targets import find_target_groups
from kore_ray.models.tiny import save_tiny_model
from kore_ray.run_dir import RunDir
from kore_ray.train.export_stage import export_trained


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    model_dir = save_tiny_model(root / "model", kind="llama")
    cfg = load_config(overrides=[f"run_dir={root / 'run'}", f"model.name_or_path={model_dir}", "init.rank=8"])
    model, _ = load_model(model_dir)
    gen = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(4, 200, (4, 64), generator=gen)} for _ in range(4)]
    save_store(RunDir(cfg.run_dir).covariance, collect_covariance(model, batches, find_target_groups(model)))
    probe = torch.randint(4, 200, (2, 16), generator=gen)
    with torch.no_grad():
        ref = model(input_ids=probe).logits
    return cfg, probe, ref


@pytest.mark.parametrize("method", ["kore", "kore-v1", "lora", "corda", "pissa", "full"])
def test_init_reloads_to_the_base_model(run, method, capsys):
    cfg, probe, ref = run
    out = run_init(cfg, method)
    base, _ = load_model(cfg.model.name_or_path)
    model = load_trainable(base, out)
    with torch.no_grad():
        logits = model(input_ids=probe).logits
    assert (logits - ref).abs().max() < 1e-5  # every method starts from the base model's function
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if method == "kore":
        assert trainable and all("lora_B" in n for n in trainable)
    elif method in ("kore-v1", "corda", "pissa", "lora"):
        assert any("lora_A" in n for n in trainable) and any("lora_B" in n for n in trainable)
    else:
        assert len(trainable) == len(list(model.parameters()))
    run_init(cfg, method)
    assert "up to date" in capsys.readouterr().out


def test_exported_lora_of_an_untrained_kore_model_is_zero(run, tmp_path):
    from safetensors.torch import load_file

    cfg, _, _ = run
    base, _ = load_model(cfg.model.name_or_path)
    model = load_trainable(base, run_init(cfg, "kore"))
    tensors = load_file(str(export_trained(model, tmp_path / "a", "tiny") / "adapter_model.safetensors"))
    assert all(t.abs().max() == 0 for k, t in tensors.items() if "lora_B" in k)  # B - B0 = 0


def test_init_without_a_store_is_refused(run, tmp_path):
    cfg, _, _ = run
    cfg = cfg.model_copy(update={"run_dir": str(tmp_path / "empty")})
    with pytest.raises(InputError, match="not a covariance store"):
        run_init(cfg, "kore")


def test_unknown_rank_group_is_refused(run):
    cfg, _, _ = run
    bad = cfg.model_copy(update={"init": cfg.init.model_copy(update={"ranks": {"nope": 4}})})
    with pytest.raises(InputError, match="nope"):
        run_init(bad, "kore", force=True)


@pytest.mark.parametrize("method,rank", [("kore", 8), ("corda", 16), ("pissa", 16), ("lora", None)])
def test_trained_model_exports_to_the_unmodified_base(run, method, rank, tmp_path):
    """After training moves A and B, base + exported LoRA computes what the trained model does."""
    from peft import PeftModel

    cfg, probe, _ = run
    base, _ = load_model(cfg.model.name_or_path)
    model = load_trainable(base, run_init(cfg, method))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # stand-in for training: move every trainable factor
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        trained = model(input_ids=probe).logits
    out = export_trained(model, tmp_path / method, cfg.model.name_or_path)
    fresh, _ = load_model(cfg.model.name_or_path)
    with torch.no_grad():
        served = PeftModel.from_pretrained(fresh, out)(input_ids=probe).logits
    assert (served - trained).abs().max() < 1e-4
    # The manifest says what the server must allow: A trained beside a subtracted A0 is 2r.
    manifest = json.loads((out / "manifest.json").read_text())
    if rank is None:  # LoRA at KORE's trainable count: below KORE's rank, per group
        assert 1 <= manifest["exported_rank"]["min"] <= manifest["exported_rank"]["max"] < 8
    else:
        assert manifest["exported_rank"] == {"min": rank, "max": rank}
