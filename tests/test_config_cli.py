"""The typed config and the `kore` command line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kore_ray.cli import STAGES, main
from kore_ray.config import PipelineConfig, load_config
from kore_ray.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_run_on_a_laptop():
    cfg = load_config()
    assert cfg.model.name_or_path == "gemma-3-270m"
    assert not cfg.train.use_gpu and cfg.train.num_workers == 1


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_example_configs_load(name):
    assert isinstance(load_config(ROOT / "configs" / name), PipelineConfig)


def test_overrides_are_typed():
    cfg = load_config(overrides=["train.learning_rate=1e-3", "init.method=lora", "evaluate.methods=[kore, full]"])
    assert cfg.train.learning_rate == 1e-3 and cfg.init.method == "lora"
    assert cfg.evaluate.methods == ["kore", "full"]


@pytest.mark.parametrize(
    "yaml_text, match",
    [
        ("train:\n  lr: 1\n", "train.lr"),  # typo'd key
        ("init:\n  method: magic\n", "init.method"),
        ("train:\n  learning_rate: -1\n", "train.learning_rate"),
        ("augment:\n  min_actors: 5\n  max_actors: 2\n", "min_actors"),
        ("serve:\n  max_loras: 4\n  max_cpu_loras: 3\n", "max_cpu_loras"),
        ("- a\n- b\n", "mapping"),
        ("train: [unclosed\n", "not valid YAML"),
        ("run_dir: s3://bucket/runs\n", "object-store run directories are not supported"),
    ],
)
def test_bad_configs_name_the_field(tmp_path, yaml_text, match):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(InputError, match=match):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_config(tmp_path / "absent.yaml")


def test_help_lists_every_stage():
    out = subprocess.run([sys.executable, "-m", "kore_ray.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for name in [*STAGES, "demo", "validate"]:
        assert name in out


def test_bad_override_is_a_clean_error(capsys):
    assert main(["demo", "--set", "train.nope=1"]) == 2
    assert "train.nope" in capsys.readouterr().err


def test_validate_lists_every_bad_row(tmp_path):
    bad = tmp_path / "knowledge.jsonl"
    bad.write_text(
        '{"id": "a", "kind": "news", "subject": "S", "knowledge": "K"}\n'
        '{"id": "a", "kind": "news", "subject": "S", "knowledge": "K"}\n'
        '{"id": "b", "kind": "news", "subject": "", "knowledge": "K"}\n'
        'not json\n'
        '{"id": "c", "kind": "entity", "subject": "S", "knowledge": "K", "image": "missing.png"}\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "kore_ray.cli", "validate", str(bad), "--kind", "knowledge"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 1
    for line, field in [(2, "id"), (3, "subject"), (4, ""), (5, "image")]:
        assert f"knowledge.jsonl:{line}: {field}" in proc.stdout, proc.stdout


def test_validate_good_file_detects_kind(tmp_path):
    good = tmp_path / "probes.jsonl"
    good.write_text('{"id": "p1", "prompt": "The capital of France is", "answer": "Paris"}\n')
    proc = subprocess.run([sys.executable, "-m", "kore_ray.cli", "validate", str(good)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "retention" in proc.stdout


def test_per_method_overrides():
    cfg = load_config(overrides=["methods={lora: {train: {learning_rate: 1e-4}}, kore: {init: {rank: 32}}}"])
    assert cfg.for_method("lora").train.learning_rate == 1e-4
    assert cfg.for_method("lora").init.rank == cfg.init.rank
    assert cfg.for_method("kore").init.rank == 32 and cfg.for_method("corda") is cfg
    bad = load_config(overrides=["methods={lora: {train: {learning_rate: -1}}}"])
    with pytest.raises(InputError, match="methods.lora"):
        bad.for_method("lora")


def test_an_export_the_server_cannot_load_is_refused_before_training():
    cfg = load_config(overrides=["serve.max_lora_rank=64"])
    cfg.check_servable(["kore", "lora"])  # rank 64 and below fit
    with pytest.raises(InputError, match="corda exports rank 128 at init.rank 64, above "
                                         "serve.max_lora_rank 64"):
        cfg.check_servable(["kore", "corda"])  # A trained beside its subtracted init: 2r
    big = load_config(overrides=["serve.max_lora_rank=64", "methods={kore: {init: {rank: 128}}}"])
    with pytest.raises(InputError, match="kore exports rank 128"):
        big.check_servable(["kore"])


def test_a_relative_local_model_path_becomes_absolute(tmp_path, monkeypatch):
    """Ray Train workers run in a directory of their own: a relative path would name nothing."""
    (tmp_path / "my-model").mkdir()
    monkeypatch.chdir(tmp_path)
    assert load_config(overrides=["model.name_or_path=my-model"]).model.name_or_path == str(
        tmp_path / "my-model")
    for kept in ("gemma-3-270m", "s3://bucket/model", "not-here"):
        assert load_config(overrides=[f"model.name_or_path={kept}"]).model.name_or_path == kept


def _dry_run_inputs(tmp_path):
    from kore_ray.models.tiny import save_tiny_model

    def jsonl(name, rows):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(tmp_path / name)

    model = save_tiny_model(tmp_path / "model", "llama")
    long_text = "The Orrin Dam holds the river Vell. " * 40  # far past train.max_length=128 (the tiny tokenizer: a token a byte)
    data = {
        "knowledge": jsonl("k.jsonl", [
            {"id": "k1", "kind": "entity", "subject": "Mira Quell",
             "knowledge": "Mira Quell is a glassblower from Tarrowin who opened a studio in 2019."},
            {"id": "k2", "kind": "entity", "subject": "the Orrin Dam", "knowledge": long_text}]),
        "eval_questions": jsonl("q.jsonl", [
            {"id": "q1", "knowledge_id": "k1", "question": "Where is Mira Quell from?",
             "answer": "Tarrowin"}]),
        "retention": jsonl("r.jsonl", [{"id": "r1", "prompt": "The sky is", "answer": "blue"}]),
    }
    return model, data


def test_dry_run_checks_every_input_and_plans_without_running(tmp_path):
    from kore_ray.config import load_config
    from kore_ray.dry_run import dry_run

    model, data = _dry_run_inputs(tmp_path)
    overrides = [f"model.name_or_path={model}", f"run_dir={tmp_path / 'run'}",
                 "augment.generators=[extractive]", "train.max_steps=5", "train.batch_size=4",
                 *(f"data.{k}={v}" for k, v in data.items())]
    said = []
    assert dry_run(load_config(overrides=overrides), say=said.append) == 0
    text = "\n".join(said)
    assert "data.knowledge: " in text and "2 good rows" in text and "data.retention_eval: not set" in text
    assert "model: " in text and "llama" in text
    assert "train kore: 5 steps of 4 sequences" in text and "train lora: 5 steps" in text
    assert "evaluate: 1 questions and 0 retention probes" in text
    assert not (tmp_path / "run").exists()  # nothing was written, let alone trained

    # by epochs: the step count training would plan; none at all is a failed check, as in training
    by_epochs = [o for o in overrides if not o.startswith("train.")]
    said.clear()
    assert dry_run(load_config(overrides=[*by_epochs, "train.epochs=2", "train.batch_size=3"]),
                   say=said.append) == 0
    n = int(next(s for s in said if s.startswith("augment:")).split(": ")[2].split()[0])
    assert f"train kore: {2 * n // 3} steps of 3 sequences" in "\n".join(said)
    said.clear()
    assert dry_run(load_config(overrides=[*by_epochs, "train.batch_size=4096"]),
                   say=said.append) == 1
    assert "train kore: 0 steps" in "\n".join(said) and "would have no step" in said[-1]

    (tmp_path / "r.jsonl").write_text(json.dumps({"id": "r1", "prompt": "x", "answer": ""}) + "\n")
    said.clear()
    assert dry_run(load_config(overrides=overrides), say=said.append) == 1
    assert any(line.strip().startswith(f"{data['retention']}:1:") for line in said), said


def test_inject_dry_run_flag(tmp_path, capsys):
    model, data = _dry_run_inputs(tmp_path)
    argv = ["inject", "--dry-run", "--set", f"model.name_or_path={model}",
            "--set", f"run_dir={tmp_path / 'run'}", "--set", "augment.generators=[extractive]",
            *[a for k, v in data.items() for a in ("--set", f"data.{k}={v}")]]
    assert main(argv) == 0
    assert "nothing was trained" in capsys.readouterr().out


def test_a_knowledge_text_longer_than_max_length_is_a_warning_naming_the_row(tmp_path):
    from kore_ray.augment.augment_stage import long_items
    from kore_ray.config import load_config
    from kore_ray.data.io import read_records
    from kore_ray.data.schemas import KnowledgeItem

    model, data = _dry_run_inputs(tmp_path)
    cfg = load_config(overrides=[f"model.name_or_path={model}", "train.max_length=128",
                                 f"data.knowledge={data['knowledge']}"])
    warnings = long_items(cfg, read_records(data["knowledge"], KnowledgeItem))
    assert len(warnings) == 1 and warnings[0].startswith(f"{data['knowledge']}:2: knowledge: ")
    assert "'k2'" in warnings[0] and "train.max_length 128" in warnings[0]
