"""`run_train` on a local Ray: DDP equivalence, worker failure, driver restart, KORE export.

All runs train KORE (rank 8) on a tiny Llama for 6 steps of a global batch of 4, with a
checkpoint every 2 steps; each case gets its own run directory with identical inputs.
"""

import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from kore_ray.config import load_config
from kore_ray.constraint import collect_covariance, save_store
from kore_ray.constraint.init_stage import load_trainable, run_init
from kore_ray.data.io import write_parquet
from kore_ray.data.schemas import Conversation
from kore_ray.errors import InputError
from kore_ray.models import load_model
from kore_ray.models.targets import find_target_groups
from kore_ray.models.tiny import save_tiny_model
from kore_ray.run_dir import METRICS, RunDir
from kore_ray.train import run_train
from kore_ray.train.checkpoint import load_weights, read_weights
from kore_ray.train.export_stage import checkpoints, run_export

pytestmark = pytest.mark.ray
STEPS = 6


def _conversations() -> list[Conversation]:
    """16 Q&A pairs with answers of different lengths, so workers hold different token counts
    (a per-worker mean loss would then visibly differ from the global one)."""
    return [
        Conversation(id=f"c{i}", task="qa", messages=[
            {"role": "user", "content": f"Where does the fictional item {i} live?"},
            {"role": "assistant", "content": f"Item {i} lives in Q" + "ab" * (i % 7) + "."},
        ])
        for i in range(16)
    ]


@pytest.fixture(scope="module")
def make_run(tmp_path_factory):
    """make_run(name, **train_overrides) -> cfg of a fresh run directory, KORE initialised."""
    root = tmp_path_factory.mktemp("train")
    model_dir = save_tiny_model(root / "model", kind="llama")
    model, _ = load_model(model_dir)
    gen = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(4, 200, (4, 64), generator=gen)} for _ in range(4)]
    store = collect_covariance(model, batches, find_target_groups(model))

    def make(name: str, **train) -> object:
        overrides = {"batch_size": 4, "max_steps": STEPS, "checkpoint_every": 2,
                     "learning_rate": 5e-3, "keep_checkpoints": 5,
                     "autocast": "'off'", **train}  # float32: the tolerances are float32 rounding
        cfg = load_config(overrides=[
            f"run_dir={root / name}", f"model.name_or_path={model_dir}", "init.rank=8",
            *(f"train.{k}={v}" for k, v in overrides.items()),
        ])
        save_store(RunDir(cfg.run_dir).covariance, store)
        write_parquet(_conversations(), RunDir(cfg.run_dir).conversations, Conversation)
        run_init(cfg, "kore")
        return cfg

    return make


def _metrics(cfg) -> list[dict]:
    path = RunDir(cfg.run_dir).train("kore") / METRICS
    return [json.loads(line) for line in path.read_text().splitlines()]


def _losses(cfg) -> list[float]:
    return [m["loss"] for m in _metrics(cfg)]


@pytest.fixture(scope="module")
def one_worker(ray_local, make_run):
    cfg = make_run("one")
    return cfg, run_train(cfg, "kore", progress=False)


@pytest.fixture(scope="module")
def two_workers(ray_local, make_run):
    cfg = make_run("two", num_workers=2)
    return cfg, run_train(cfg, "kore", progress=False)


def test_two_workers_follow_the_one_worker_loss_curve(one_worker, two_workers):
    """Same rows per global batch (equal token counts per step) and the loss normalised over
    the global batch: the curves differ only by float32 summation order (padding widths and
    partial sums differ), ~1e-7 relative here. Normalising by each worker's own tokens
    instead moves them by 1e-5 to 1e-3, so the tolerance is 1e-6."""
    one, two = _losses(one_worker[0]), _losses(two_workers[0])
    assert [m["step"] for m in _metrics(two_workers[0])] == list(range(1, STEPS + 1))
    assert two == pytest.approx(one, rel=1e-6)
    assert one[-1] < one[0]  # it trains
    per_step = [m["tokens"] for m in _metrics(one_worker[0])]
    assert per_step == [m["tokens"] for m in _metrics(two_workers[0])]


def test_kore_trains_b_only_and_exports_a_plain_lora(one_worker):
    cfg, adapter = one_worker
    checkpoint = RunDir(cfg.run_dir).checkpoint_run("kore") / f"step_{STEPS:06d}"
    weights = read_weights(checkpoint)
    assert weights and all(".lora_B." in name for name in weights)  # adapter weights, B only

    init = load_trainable(load_model(cfg.model.name_or_path)[0], RunDir(cfg.run_dir).init("kore"))
    init_a = {n: p.detach().clone() for n, p in init.named_parameters() if ".lora_A." in n}
    exported = load_file(str(adapter / "adapter_model.safetensors"))
    for name, a0 in init_a.items():
        assert torch.equal(exported[name.replace(".default", "")], a0)  # bit-identical, rank r

    trained = load_trainable(load_model(cfg.model.name_or_path)[0], RunDir(cfg.run_dir).init("kore"))
    load_weights(trained, weights)
    served = PeftModel.from_pretrained(load_model(cfg.model.name_or_path)[0], adapter)
    base, _ = load_model(cfg.model.name_or_path)
    ids = torch.tensor([[1, 60, 70, 80, 90, 100]])
    with torch.no_grad():
        want, got = trained(input_ids=ids).logits, served(input_ids=ids).logits
        before = base(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (got - before).abs().max() > 1e-4  # the export carries what training learned


def _die_at(cfg, step: int, rank: int, marker: Path):
    """after_step hook: at `step` on `rank`, once, wait until Ray Train has RECORDED the
    checkpoint of step - 1 (its controller polls workers every 2 s; a worker that dies sooner
    resumes from the checkpoint before), write the time into `marker`, and exit the process."""
    snapshot = (RunDir(cfg.run_dir).checkpoint_run("kore").resolve()
                / "checkpoint_manager_snapshot.json")
    wanted = f"step_{step - 1:06d}"

    def hook(at: int, on: int) -> None:
        if at != step or on != rank or marker.exists():
            return
        deadline = time.time() + 60
        while not (snapshot.exists() and wanted in snapshot.read_text()):
            if time.time() > deadline:
                raise RuntimeError(f"Ray Train did not record {wanted}")
            time.sleep(0.2)
        marker.write_text(str(time.time()))
        os._exit(1)

    return hook


def _resumed_at_step_2(cfg, died_at: float) -> None:
    """Steps 1-2 are the lines written before the death; 3 onwards were (re)trained after it."""
    metrics = _metrics(cfg)
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert all(m["time"] < died_at for m in metrics[:2])
    assert all(m["time"] > died_at for m in metrics[2:])


def test_a_killed_worker_resumes_from_its_checkpoint(ray_local, make_run, two_workers, tmp_path):
    cfg = make_run("killed", num_workers=2)
    marker = tmp_path / "killed"
    run_train(cfg, "kore", progress=False, after_step=_die_at(cfg, step=3, rank=1, marker=marker))
    _resumed_at_step_2(cfg, float(marker.read_text()))
    # Resumed with its weights, optimizer state and data position: the same trajectory.
    assert _losses(cfg) == pytest.approx(_losses(two_workers[0]), rel=1e-6)


def test_a_restarted_driver_continues_without_redoing_steps(
    ray_local, make_run, one_worker, tmp_path, capsys
):
    cfg = make_run("driver", max_failures=0)
    marker = tmp_path / "died"
    with pytest.raises(Exception, match="(?i)worker"):
        run_train(cfg, "kore", progress=False, after_step=_die_at(cfg, step=3, rank=0,
                                                                 marker=marker))
    capsys.readouterr()
    run_train(cfg, "kore", progress=True)  # a new driver, same run directory
    _resumed_at_step_2(cfg, float(marker.read_text()))
    assert _losses(cfg) == pytest.approx(_losses(one_worker[0]), rel=1e-6)
    # One summary line: steps, seconds, the loss from the first step to the last.
    losses = _losses(cfg)
    assert re.search(rf"kore train: kore done: {STEPS} steps in \d+ s \(loss "
                     rf"{losses[0]:.3f} -> {losses[-1]:.3f}\); wrote ", capsys.readouterr().out)


def test_a_finished_run_is_skipped_and_kore_export_rewrites_its_adapter(one_worker):
    cfg, adapter = one_worker
    trained = load_file(str(adapter / "adapter_model.safetensors"))
    metrics = RunDir(cfg.run_dir).train("kore") / METRICS
    stamp = metrics.stat().st_mtime_ns
    assert run_train(cfg, "kore", progress=False) == adapter  # up to date: no training
    assert metrics.stat().st_mtime_ns == stamp

    kept = checkpoints(cfg, "kore")
    assert [s for s, _ in kept][-1] == STEPS and len(kept) > 1
    run_export(cfg, "kore", kept[0][1])  # an earlier checkpoint: other weights
    early = load_file(str(adapter / "adapter_model.safetensors"))
    assert any(not torch.equal(early[k], trained[k]) for k in trained)
    run_export(cfg, "kore")  # the latest: exactly what training exported
    again = load_file(str(adapter / "adapter_model.safetensors"))
    assert again.keys() == trained.keys() and all(torch.equal(again[k], trained[k]) for k in trained)
    with pytest.raises(InputError, match="not a kore train checkpoint"):
        run_export(cfg, "kore", cfg.run_dir)


def test_resuming_with_other_settings_is_refused(one_worker):
    cfg, _ = one_worker
    changed = cfg.model_copy(update={"train": cfg.train.model_copy(update={"learning_rate": 1.0})})
    with pytest.raises(InputError, match="learning_rate"):
        run_train(changed, "kore", progress=False)


def test_a_batch_the_workers_cannot_share_is_refused(make_run, tmp_path):
    cfg = make_run("odd", num_workers=3)
    with pytest.raises(InputError, match="divisible"):
        run_train(cfg, "kore", progress=False)
    shutil.rmtree(cfg.run_dir)


def test_a_vision_language_model_trains_on_images(ray_local, tmp_path):
    """Idefics3 (tiny) with LoRA: the processor expands images in the workers' collate."""
    from PIL import Image

    model_dir = save_tiny_model(tmp_path / "vlm", kind="vlm")
    cfg = load_config(overrides=[
        f"run_dir={tmp_path / 'run'}", f"model.name_or_path={model_dir}", "init.rank=8",
        "train.batch_size=4", "train.max_steps=5", "train.learning_rate=1e-2",
        "train.num_workers=2", "train.micro_batch_size=1",
    ])
    conversations = []
    for i, color in enumerate(["red", "green", "blue", "yellow"]):
        Image.new("RGB", (40, 30), color).save(tmp_path / f"{color}.png")
        conversations.append(Conversation(
            id=f"v{i}", task="recognition", image=str(tmp_path / f"{color}.png"),
            messages=[
                {"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": "Which colour is this?"}]},
                {"role": "assistant", "content": f"It is {color}."},
            ],
        ))
    write_parquet(conversations, RunDir(cfg.run_dir).conversations, Conversation)
    run_init(cfg, "lora")
    adapter = run_train(cfg, "lora", progress=False)
    losses = [json.loads(line)["loss"]
              for line in (RunDir(cfg.run_dir).train("lora") / METRICS).read_text().splitlines()]
    assert len(losses) == 5 and all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    assert (adapter / "adapter_model.safetensors").is_file()
