"""The covariance stage on Ray Data: exact against one process, fault tolerant, incremental.

Each distributed run is compared with the core's `collect_covariance` run in this process on the
same micro-batches (retention.plan_batches): the float32 forward passes are then identical and
only the float64 reduction order differs.
"""

import json
import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from PIL import Image

from kore_ray.config import load_config
from kore_ray.constraint import covariance_stage as distributed
from kore_ray.constraint import partials
from kore_ray.constraint.covariance import collect_covariance
from kore_ray.constraint.covariance_stage import run_covariance
from kore_ray.constraint.retention import (
    plan_batches,
    read_retention,
    text_inputs,
    tokenize_texts,
    vlm_inputs,
)
from kore_ray.constraint.store import load_store, save_store
from kore_ray.data.io import read_records
from kore_ray.data.schemas import RetentionProbe
from kore_ray.data.tokenize import encode_retention
from kore_ray.errors import InputError
from kore_ray.models.loading import load_model
from kore_ray.models.targets import find_target_groups
from kore_ray.models.tiny import save_tiny_model, tiny_text_model

pytestmark = pytest.mark.ray

WORDS = ["the", "a", "river", "old", "stone", "bright", "winter", "city", "music", "paper",
         "quiet", "lamp", "north", "garden"]


def _probes(n: int, seed: int) -> list[dict]:
    """Probes of varied lengths (so micro-batches pad), half completions, half questions."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        words = [WORDS[j] for j in torch.randint(len(WORDS), (3 + 5 * (i % 4),), generator=g)]
        field = "prompt" if i % 2 else "question"
        rows.append({"id": f"s{seed}-{i}", field: " ".join(words), "answer": WORDS[i % len(WORDS)]})
    return rows


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cov")
    model_dir = save_tiny_model(root / "llama", "llama")
    retention = _write_jsonl(root / "retention.jsonl", _probes(24, seed=0))
    return root, model_dir, retention


def _config(model_dir, retention, run_dir, **covariance):
    # 24 sequences in micro-batches of 4, 2 micro-batches per task: 3 tasks.
    settings = {"batch_size": 4, "sequences_per_task": 8, "max_length": 64, **covariance}
    return load_config(overrides=[
        f"run_dir={run_dir}", f"model.name_or_path={model_dir}", f"data.retention={retention}",
        *(f"covariance.{k}={v}" for k, v in settings.items()),
    ])


@contextmanager
def _one_thread():
    """Like each 1-CPU actor (Ray sets OMP_NUM_THREADS=1): other thread counts may round the
    float32 forward differently (~1e-7), a kernel effect that is not the one under test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _reference(cfg):
    """The single-process store of cfg's data: the core on the same micro-batches."""
    model, tokenizer = load_model(cfg.model.name_or_path)
    cov = cfg.covariance
    batches = plan_batches(read_retention(cfg.data.retention, tokenizer), cov.batch_size)
    inputs = (
        text_inputs(tokenize_texts(tokenizer, [i.text for i in b], cov.max_length), tokenizer.pad_token_id)
        for b in batches
    )
    with _one_thread():
        return collect_covariance(model, inputs, find_target_groups(model), cov.normalize)


def _relative_error(a, b):
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max()).item() for k in b)


def _assert_same(store, reference):
    assert store.tokens == reference.tokens and store.samples == reference.samples
    assert store.modules == reference.modules
    assert store.model_fingerprint == reference.model_fingerprint
    assert _relative_error(store.sums, reference.sums) < 1e-10


@pytest.fixture(scope="module")
def reference(setup):
    root, model_dir, retention = setup
    return _reference(_config(model_dir, retention, root / "unused"))


@pytest.fixture(scope="module")
def one_actor_run(setup, ray_local):
    root, model_dir, retention = setup
    cfg = _config(model_dir, retention, root / "run1", num_actors=1)
    return cfg, run_covariance(cfg, progress=False)


def test_one_and_two_actors_give_the_single_process_result(setup, reference, one_actor_run, ray_local):
    root, model_dir, retention = setup
    _, one = one_actor_run
    # Two actors, the groups split over two passes and three reducers: the same store.
    two = run_covariance(_config(model_dir, retention, root / "run2", num_actors=2, passes=2,
                                 num_reducers=3), progress=False)
    _assert_same(one, reference)
    _assert_same(two, reference)
    # Every non-padding token of the input, tokenised as every other stage does, once.
    _, tokenizer = load_model(model_dir)
    records = read_records(retention, RetentionProbe)
    n_tokens = sum(len(encode_retention(tokenizer, r, 64)) for r in records)
    assert set(two.tokens.values()) == {n_tokens} and two.samples == len(records)
    # What was returned is what was written.
    loaded = load_store(root / "run2" / "covariance", expected_fingerprint=two.model_fingerprint)
    _assert_same(loaded, reference)
    assert len(loaded.data_fingerprints) == 1


@pytest.mark.parametrize("flush_interval_s, redone", [(600, 1), (0, 0)])
def test_a_killed_actor_neither_loses_nor_double_counts(setup, reference, ray_local, tmp_path,
                                                        monkeypatch, capsys, flush_interval_s, redone):
    """An actor dies in its second task. 600 s: it had saved nothing, so its first task is
    redone; 0: it saved after every task, so its first task's partial counts as it is."""
    _, model_dir, retention = setup
    marker = tmp_path / "killed"

    class DiesOnce(partials.CovarianceActor):
        """Kills its own process at the start of its second task, once in the whole run."""

        def add(self, task, table):
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == 2 and not marker.exists():
                marker.touch()
                os._exit(1)
            return super().add(task, table)

    monkeypatch.setattr(distributed, "CovarianceActor", DiesOnce)
    cfg = _config(model_dir, retention, tmp_path / "run", num_actors=2, sequences_per_task=4,
                  flush_interval_s=flush_interval_s)  # 6 tasks
    store = run_covariance(cfg, progress=False)
    assert marker.exists()  # an actor did die mid-run
    assert f"restarted; redoing {redone} unsaved task(s)" in capsys.readouterr().err
    _assert_same(store, reference)
    assert not (tmp_path / "run" / "covariance.partials").exists()


def test_rerun_on_the_same_data_is_skipped(setup, one_actor_run, capsys):
    cfg, first = one_actor_run
    manifest = cfg.run_dir + "/covariance/manifest.json"
    before = os.stat(manifest).st_mtime_ns
    again = run_covariance(cfg, progress=False)
    assert "skipping" in capsys.readouterr().err
    assert os.stat(manifest).st_mtime_ns == before
    assert again.tokens == first.tokens and again.data_fingerprints == first.data_fingerprints


def test_new_data_adds_to_an_existing_store(setup, one_actor_run, ray_local, tmp_path):
    _, model_dir, _ = setup
    cfg_a, store_a = one_actor_run
    old_dir = Path(cfg_a.run_dir) / "covariance"
    old_manifest = (old_dir / "manifest.json").read_text()
    more = tmp_path / "more.txt"  # plain text: one document per line
    more.write_text("Rivers run to the sea.\n\nThe old lamp stands in the garden.\nwinter\n")
    cfg_b = _config(model_dir, more, tmp_path / "run", num_actors=2)

    store = run_covariance(cfg_b, add_to=str(old_dir), progress=False)

    _assert_same(store, store_a + _reference(cfg_b))
    assert store.samples == store_a.samples + 3
    assert store.data_fingerprints[0] == store_a.data_fingerprints[0] and len(store.data_fingerprints) == 2
    assert (old_dir / "manifest.json").read_text() == old_manifest  # the old store is untouched
    with pytest.raises(InputError, match="already holds this retention data"):
        run_covariance(cfg_b, add_to=str(tmp_path / "run" / "covariance"), progress=False)


def test_a_store_for_another_model_is_refused(setup, ray_local, tmp_path):
    _, model_dir, retention = setup
    other, tokenizer = tiny_text_model("llama", seed=1)
    foreign = collect_covariance(other, [dict(tokenizer("hello", return_tensors="pt"))], find_target_groups(other))
    save_store(tmp_path / "foreign", foreign)
    with pytest.raises(InputError, match=f"made for model {foreign.model_fingerprint}"):
        run_covariance(_config(model_dir, retention, tmp_path / "run"), add_to=str(tmp_path / "foreign"))
    assert not (tmp_path / "run").exists()


def test_unusable_rows_are_named_before_any_work(setup, tmp_path):
    _, model_dir, _ = setup
    bad = _write_jsonl(tmp_path / "bad.jsonl", [
        {"id": "ok", "prompt": "The sky is", "answer": "blue"},
        {"id": "both", "prompt": "x", "question": "y", "answer": "z"},
    ])
    with pytest.raises(InputError, match=r"bad\.jsonl:2: .*exactly one of prompt or question"):
        run_covariance(_config(model_dir, bad, tmp_path / "run"))
    from PIL import Image

    Image.new("RGB", (4, 4), "red").save(tmp_path / "red.png")
    pictured = _write_jsonl(tmp_path / "pictured.jsonl", [{
        "id": "pic", "task": "retention", "image": "red.png",
        "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
                     {"role": "assistant", "content": "Red."}],
    }])
    with pytest.raises(InputError, match="id 'pic': has an image, but the model is text-only"):
        run_covariance(_config(model_dir, pictured, tmp_path / "run"))


def test_vlm_conversations_with_images(ray_local, tmp_path):
    model_dir = save_tiny_model(tmp_path / "vlm", "vlm")
    colors = ["red", "blue", "green", "yellow", "purple"]
    for c in colors:
        Image.new("RGB", (40 + 8 * len(c), 32), c).save(tmp_path / f"{c}.png")
    rows = [{
        "id": c, "task": "retention", "image": f"{c}.png",
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Which colour{'?' * i}"}]},
            {"role": "assistant", "content": f"It is {c}."},
        ],
    } for i, c in enumerate(colors)]
    rows.append({"id": "plain", "task": "retention", "messages": [
        {"role": "user", "content": "No picture here."}, {"role": "assistant", "content": "Fine."}]})
    retention = _write_jsonl(tmp_path / "conversations.jsonl", rows)
    cfg = _config(model_dir, retention, tmp_path / "run", num_actors=2, batch_size=2,
                  sequences_per_task=2, max_length=128)

    store = run_covariance(cfg, progress=False)

    model, processor = load_model(model_dir)
    batches = [
        vlm_inputs(processor, [i.text for i in b], [i.image for i in b], [i.id for i in b], 128,
                   model.config.image_token_id)
        for b in plan_batches(read_retention(retention, processor, vision=True), 2)
    ]
    assert all("pixel_values" in b for b in batches)
    with _one_thread():
        reference = collect_covariance(model, batches, find_target_groups(model))
    _assert_same(store, reference)
    assert set(store.tokens.values()) == {sum(int(b["attention_mask"].sum()) for b in batches)}
