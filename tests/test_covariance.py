"""Covariance accumulation (hooks, masking, batching) and the on-disk covariance store."""

import json

import pytest
import torch
from PIL import Image
from torch import nn

from kore_ray.constraint import store as store_mod
from kore_ray.constraint.covariance import CovarianceAccumulator, collect_covariance
from kore_ray.constraint.store import load_store, merge_stores, save_store
from kore_ray.errors import InputError
from kore_ray.models.targets import TargetGroup, find_target_groups
from kore_ray.models.tiny import IMAGE_TOKEN, tiny_text_model, tiny_vlm
from kore_ray.run_dir import model_fingerprint

TEXTS = [
    "The capital of France is Paris.",
    "a",
    "Water boils at 100 degrees Celsius at sea level.",
    "zzz",
    "one two three four five six seven eight nine ten",
    "Gold: Au",
    "kore ray",
    "The Moon orbits the Earth.",
]


@pytest.fixture(scope="module")
def llama64():
    model, tokenizer = tiny_text_model("llama", seed=0, dtype=torch.float64)
    return model, tokenizer, find_target_groups(model)


def _relative_error(a, b):
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max()).item() for k in b)


def test_batching_and_padding_do_not_change_the_sums(llama64):
    model, tokenizer, groups = llama64
    one_by_one = collect_covariance(
        model, [dict(tokenizer(t, return_tensors="pt")) for t in TEXTS], groups
    )
    n_tokens = sum(len(tokenizer(t).input_ids) for t in TEXTS)
    assert set(one_by_one.tokens.values()) == {n_tokens}
    assert one_by_one.samples == len(TEXTS)

    tokenizer.padding_side = "right"
    right = collect_covariance(
        model, [dict(tokenizer(TEXTS, return_tensors="pt", padding=True))], groups
    )
    assert right.tokens == one_by_one.tokens and right.samples == len(TEXTS)
    assert _relative_error(right.sums, one_by_one.sums) < 1e-12

    tokenizer.padding_side = "left"
    try:
        left = collect_covariance(
            model, [dict(tokenizer(TEXTS, return_tensors="pt", padding=True))], groups
        )
    finally:
        tokenizer.padding_side = "right"
    assert left.tokens == one_by_one.tokens
    # Rotary attention depends on relative positions only, but the model builds its
    # cos/sin tables in float32 at absolute positions: shifted tokens differ at ~1e-8.
    assert _relative_error(left.sums, one_by_one.sums) < 1e-6


class _TwoReaders(nn.Module):
    """q and k read the same input; out reads q's output."""

    def __init__(self, d=6):
        super().__init__()
        self.q, self.k, self.out = nn.Linear(d, d), nn.Linear(d, 4), nn.Linear(d, 3)

    def forward(self, x):
        return self.out(self.q(x)) + self.k(x).sum()


@pytest.mark.parametrize("normalize", ["none", "sample_max"])
def test_sums_match_a_hand_computation(normalize):
    torch.manual_seed(0)
    model = _TwoReaders().double()
    groups = [TargetGroup("qk", ("q", "k"), 6), TargetGroup("out", ("out",), 6)]
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]])
    with CovarianceAccumulator(model, groups, normalize) as acc, torch.no_grad(), acc.batch(mask):
        model(x)
    assert not model.q._forward_pre_hooks and not model.out._forward_pre_hooks  # removed on exit

    def expected(inputs):
        total = torch.zeros(6, 6, dtype=torch.float64)
        for sample, m in zip(inputs, mask.bool()):
            tokens = sample[m]
            if normalize == "sample_max":
                tokens = tokens / tokens.max().abs()
            total += tokens.T @ tokens
        return total

    torch.testing.assert_close(acc.sums["qk"], expected(x), rtol=1e-12, atol=0)
    torch.testing.assert_close(acc.sums["out"], expected(model.q(x).detach()), rtol=1e-12, atol=0)
    assert acc.tokens == {"qk": 11, "out": 11} and acc.samples == 3


def test_low_precision_activations_are_summed_in_float32_or_better():
    model = _TwoReaders().to(torch.bfloat16)
    x = torch.randn(2, 3, 6).to(torch.bfloat16)
    group = TargetGroup("qk", ("q", "k"), 6)
    with CovarianceAccumulator(model, [group]) as acc, torch.no_grad(), acc.batch(torch.ones(2, 3)):
        model(x)
    tokens = x.reshape(6, 6).float()
    assert acc.sums["qk"].dtype == torch.float64
    torch.testing.assert_close(acc.sums["qk"], (tokens.T @ tokens).double())


def test_decoder_body_runs_without_the_lm_head(llama64):
    model, tokenizer, groups = llama64
    calls = []
    handle = model.lm_head.register_forward_hook(lambda *args: calls.append(1))
    try:
        collect_covariance(
            model, [dict(tokenizer(TEXTS[:2], return_tensors="pt", padding=True))], groups
        )
    finally:
        handle.remove()
    assert calls == []
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_nan_activations_name_the_layer():
    model, tokenizer = tiny_text_model("llama", seed=0)
    groups = find_target_groups(model)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(InputError, match=r"model\.layers\.1\.self_attn\.q_proj: NaN or Inf"):
        collect_covariance(model, [dict(tokenizer("hello", return_tensors="pt"))], groups)


def test_mask_that_does_not_fit_the_activations_is_refused():
    model = _TwoReaders()
    with (
        CovarianceAccumulator(model, [TargetGroup("qk", ("q", "k"), 6)]) as acc,
        pytest.raises(InputError, match="layer q: activations of shape"),
        torch.no_grad(),
        acc.batch(torch.ones(2, 4)),
    ):
        model(torch.randn(2, 3, 6))


def test_vlm_language_layers_count_image_tokens():
    model, processor = tiny_vlm(seed=0)
    groups = find_target_groups(model)
    assert all(".vision" not in m for g in groups for m in g.modules)

    def batch(color):
        images = [[Image.new("RGB", (32, 32), color)], [Image.new("RGB", (32, 32), "white")]]
        texts = [f"{IMAGE_TOKEN}What is this?", f"{IMAGE_TOKEN}hi"]
        return dict(processor(text=texts, images=images, return_tensors="pt", padding=True))

    red, blue = batch("red"), batch("blue")
    store_red = collect_covariance(model, [red], groups)
    store_blue = collect_covariance(model, [blue], groups)
    n_image = int((red["input_ids"] == model.config.image_token_id).sum())
    assert n_image > 0
    assert store_red.tokens[groups[0].key] == int(red["attention_mask"].sum())
    # The image reaches the language layers' inputs: another image, another covariance.
    first = groups[0].key
    assert not torch.allclose(store_red.sums[first], store_blue.sums[first])


# -- the store ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_stores(llama64):
    model, tokenizer, groups = llama64
    a = collect_covariance(
        model,
        [dict(tokenizer(TEXTS[:4], return_tensors="pt", padding=True))],
        groups,
        data_fingerprint="first",
    )
    b = collect_covariance(
        model,
        [dict(tokenizer(TEXTS[4:], return_tensors="pt", padding=True))],
        groups,
        data_fingerprint="second",
    )
    both = collect_covariance(
        model, [dict(tokenizer(TEXTS, return_tensors="pt", padding=True))], groups
    )
    return a, b, both


def test_store_round_trip_is_exact(two_stores, tmp_path, llama64):
    store = two_stores[0]
    path = save_store(tmp_path / "covariance", store)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["version"] == 1 and manifest["normalize"] == "none"
    assert manifest["dtype"] == "float64" and manifest["data_fingerprints"] == ["first"]
    assert manifest["model_fingerprint"] == model_fingerprint(llama64[0])
    entry = manifest["groups"]["model.layers.0.self_attn.q_proj+k_proj+v_proj"]
    assert (
        entry["in_features"] == 128
        and entry["tokens"] == store.tokens["model.layers.0.self_attn.q_proj+k_proj+v_proj"]
    )
    assert entry["modules"]["model.layers.0.self_attn.k_proj"] == [64, 128]
    assert len(list(path.glob("*.safetensors"))) == len(store.sums)

    loaded = load_store(path, expected_fingerprint=store.model_fingerprint)
    assert loaded.tokens == store.tokens and loaded.samples == store.samples
    assert loaded.modules == store.modules
    for key in store.sums:
        assert torch.equal(loaded.sums[key], store.sums[key])
    assert not list(tmp_path.glob(".*"))  # no temporary directories left behind


def test_store_for_another_model_is_refused(two_stores, tmp_path):
    path = save_store(tmp_path / "covariance", two_stores[0])
    other = model_fingerprint(tiny_text_model("llama", seed=1)[0])
    with pytest.raises(
        InputError, match=f"made for model {two_stores[0].model_fingerprint}.*{other}"
    ):
        load_store(path, expected_fingerprint=other)


def test_failed_write_leaves_nothing(two_stores, tmp_path, monkeypatch):
    calls = []

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real_save(*args, **kwargs)

    real_save = store_mod.save_file
    monkeypatch.setattr(store_mod, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_store(tmp_path / "covariance", two_stores[0])
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_a_store_but_not_other_folders(two_stores, tmp_path):
    path = save_store(tmp_path / "covariance", two_stores[0])
    save_store(path, two_stores[1])
    assert load_store(path).data_fingerprints == ("second",)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["covariance"]
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "todo.txt").write_text("keep me")
    with pytest.raises(InputError, match="not a kore-ray artifact"):
        save_store(precious, two_stores[0])
    assert (precious / "todo.txt").read_text() == "keep me"


def test_stores_add_up(two_stores):
    a, b, both = two_stores
    merged = merge_stores([a, b])
    assert merged.tokens == both.tokens and merged.samples == both.samples
    assert merged.data_fingerprints == ("first", "second")
    # Padding lengths differ between the halves and the whole: same sums up to rounding.
    assert _relative_error(merged.sums, both.sums) < 1e-12
    assert (a + b).tokens == merged.tokens


def test_incompatible_stores_are_not_merged(two_stores, llama64):
    a, b, _ = two_stores
    model, tokenizer, groups = llama64
    normalised = collect_covariance(
        model,
        [dict(tokenizer(TEXTS[:2], return_tensors="pt", padding=True))],
        groups,
        normalize="sample_max",
    )
    with pytest.raises(InputError, match="normalised differently"):
        a + normalised
    other_model, _ = tiny_text_model("llama", seed=1, dtype=torch.float64)
    other = collect_covariance(other_model, [dict(tokenizer("x", return_tensors="pt"))], groups)
    with pytest.raises(InputError, match="different models"):
        merge_stores([a, b, other])


def test_fingerprint_is_stable_and_tells_checkpoints_apart():
    fp32, _ = tiny_text_model("llama", seed=0)
    assert model_fingerprint(fp32) == model_fingerprint(tiny_text_model("llama", seed=0)[0])
    # The same checkpoint in another dtype is the same model.
    assert model_fingerprint(fp32) == model_fingerprint(
        tiny_text_model("llama", seed=0, dtype=torch.bfloat16)[0]
    )
    assert model_fingerprint(fp32) != model_fingerprint(tiny_text_model("llama", seed=1)[0])
    assert model_fingerprint(fp32) != model_fingerprint(tiny_text_model("qwen2", seed=0)[0])
    with torch.no_grad():
        fp32.model.layers[0].mlp.down_proj.weight.mul_(2)
    assert model_fingerprint(fp32) != model_fingerprint(tiny_text_model("llama", seed=0)[0])


def test_unknown_normalisation_is_refused():
    with pytest.raises(InputError, match="normalize must be one of"):
        CovarianceAccumulator(_TwoReaders(), [TargetGroup("qk", ("q", "k"), 6)], normalize="l2")


def test_fingerprint_of_a_tensor_wider_than_float32_can_index():
    """Gemma's 262k x 640 embedding has more than 2^24 elements; sampling must stay in bounds."""
    from kore_ray.run_dir import model_fingerprint

    big = torch.nn.Embedding(2**24 + 3, 1)
    first = model_fingerprint(big)
    with torch.no_grad():
        big.weight[-1] = 123.0  # the last element is sampled
    assert model_fingerprint(big) != first


def test_a_loaded_store_reads_one_group_per_lookup(two_stores, tmp_path, monkeypatch):
    """Init reads a store group by group: at 70B widths the whole store is 655 GB."""
    path = save_store(tmp_path / "covariance", two_stores[0])
    reads = []
    real_load = store_mod.load_file
    monkeypatch.setattr(store_mod, "load_file", lambda f: reads.append(f) or real_load(f))
    loaded = load_store(path)
    assert reads == []  # nothing read until a group is asked for
    key = next(iter(two_stores[0].sums))
    assert torch.equal(loaded.sums[key], two_stores[0].sums[key])
    assert len(reads) == 1 and reads[0].endswith(store_mod.group_file(key))


def test_reducer_adds_partials_and_a_base_store_group_by_group(two_stores, tmp_path):
    """covariance_stage.reduce_groups, the reducers' core, without Ray."""
    from kore_ray.constraint.covariance_stage import reduce_groups

    a, b, both = two_stores
    save_store(tmp_path / "a", a)
    save_store(tmp_path / "b", b)
    keys = sorted(a.sums)[:3]  # a reducer's shard
    out = tmp_path / "out"
    out.mkdir()
    widths = {k: (a.sums[k].shape[0], [str(tmp_path / "a")]) for k in keys}
    reduce_groups(widths, str(tmp_path / "b"), str(out))  # b as the base store
    assert sorted(p.name for p in out.iterdir()) == sorted(store_mod.group_file(k) for k in keys)
    for k in keys:
        total = store_mod.read_group(out, k, a.sums[k].shape[0])
        assert ((total - both.sums[k]).abs().max() / both.sums[k].abs().max()).item() < 1e-12


def test_groups_shard_by_bytes_of_sums():
    from kore_ray.constraint.covariance_stage import shard_groups

    groups = [TargetGroup(f"g{i}", (f"m{i}",), d) for i, d in enumerate([4096, 11008, 4096, 4096, 11008])]
    shards = shard_groups(groups, 2)
    loads = sorted(sum(g.in_features**2 for g in s) for s in shards)
    assert sorted(g.key for s in shards for g in s) == sorted(g.key for g in groups)
    assert loads == [11008**2 + 4096**2, 11008**2 + 2 * 4096**2]
    assert len(shard_groups(groups[:1], 4)) == 1  # never an empty shard


def test_a_model_split_by_device_map_gives_the_same_sums(tmp_path, monkeypatch):
    """device "auto" (covariance.gpus_per_actor > 1) loads through accelerate's device_map;
    here, without GPUs, everything lands on the CPU and the sums must not change."""
    import transformers

    from kore_ray.models.loading import load_model
    from kore_ray.models.tiny import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "llama", "llama")
    plain, tokenizer = load_model(model_dir)
    calls = []
    real = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: calls.append(k) or real(*a, **k))
    split, _ = load_model(model_dir, device="auto")
    assert calls[0].get("device_map") == "auto"
    assert model_fingerprint(split) == model_fingerprint(plain)
    batch = [dict(tokenizer(TEXTS, return_tensors="pt", padding=True))]
    a = collect_covariance(plain, batch, find_target_groups(plain))
    b = collect_covariance(split, batch, find_target_groups(split))
    assert a.tokens == b.tokens and _relative_error(b.sums, a.sums) == 0.0
