"""The grouped CPU LoRA ops give vLLM's own torch ops' results, without gathering weights per token."""

import pytest
import torch

pytest.importorskip("vllm")
from vllm.lora.ops import torch_ops as ref  # noqa: E402

from kore_ray.serve import cpu_lora  # noqa: E402

SLOTS, RANK, D_IN, D_OUT, TOKENS = 3, 8, 24, 40, 11


@pytest.fixture
def case():
    g = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(TOKENS, D_IN, generator=g),
        "a": torch.randn(SLOTS, 1, RANK, D_IN, generator=g),  # vLLM's stacked layout
        "b": torch.randn(SLOTS, 1, D_OUT, RANK, generator=g),
        "h": torch.randn(TOKENS, RANK, generator=g),
        "y": torch.randn(TOKENS, D_OUT + 6, generator=g),
        "mixed": torch.tensor([0, 0, 2, 1, 1, 1, 0, 2, 2, 1, 0]),
    }


@pytest.mark.parametrize("indices", ["mixed", "one"])
def test_shrink_and_expand_match_vllm(case, indices):
    idx = case["mixed"] if indices == "mixed" else torch.full((TOKENS,), 1)
    want, got = torch.zeros(TOKENS, RANK), torch.zeros(TOKENS, RANK)
    ref.bgmv_shrink(case["x"], case["a"], want, idx, 0.5)
    cpu_lora.bgmv_shrink(case["x"], case["a"], got, idx, 0.5)
    torch.testing.assert_close(got, want)
    for add in (True, False):
        want, got = case["y"].clone(), case["y"].clone()
        ref.bgmv_expand(case["h"], case["b"], want, idx, add)
        cpu_lora.bgmv_expand(case["h"], case["b"], got, idx, add)
        torch.testing.assert_close(got, want)
        want, got = case["y"].clone(), case["y"].clone()
        ref.bgmv_expand_slice(case["h"], case["b"], want, idx, 3, D_OUT, add)
        cpu_lora.bgmv_expand_slice(case["h"], case["b"], got, idx, 3, D_OUT, add)
        torch.testing.assert_close(got, want)


def test_prefill_ops_explode_per_sequence(case):
    lens, seq_idx = torch.tensor([4, 5, 2]), torch.tensor([2, 0, 1])
    starts = torch.tensor([0, 4, 9])
    meta = (starts, lens, seq_idx, 3, 5, TOKENS)
    want, got = torch.zeros(TOKENS, RANK), torch.zeros(TOKENS, RANK)
    ref.sgmv_shrink(case["x"], case["a"], want, *meta, 2.0)
    cpu_lora.sgmv_shrink(case["x"], case["a"], got, *meta, 2.0)
    torch.testing.assert_close(got, want)
    want, got = case["y"].clone(), case["y"].clone()
    ref.sgmv_expand_slice(case["h"], case["b"], want, *meta, 2, D_OUT, True)
    cpu_lora.sgmv_expand_slice(case["h"], case["b"], got, *meta, 2, D_OUT, True)
    torch.testing.assert_close(got, want)


def test_tokens_without_an_adapter_are_left_alone(case):
    idx = torch.tensor([0, -1, 1, -1, 2, 0, -1, 1, 1, 2, -1])
    y = case["y"].clone()
    cpu_lora.bgmv_expand(case["h"], case["b"], y, idx, True)
    base = idx < 0
    assert torch.equal(y[base], case["y"][base])  # no adapter: nothing added
    assert not torch.allclose(y[~base], case["y"][~base])
    h = torch.ones(TOKENS, RANK)
    cpu_lora.bgmv_shrink(case["x"], case["a"], h, idx, 1.0)
    assert torch.equal(h[base], torch.zeros(int(base.sum()), RANK))


def test_register_swaps_the_cpu_wrapper_ops():
    from vllm.lora.punica_wrapper import punica_cpu

    cpu_lora.register()
    assert all(getattr(punica_cpu, name) is getattr(cpu_lora, name) for name in cpu_lora.OPS)
    cpu_lora.register()  # idempotent: the originals stay recorded
    assert cpu_lora._ORIGINAL["bgmv_expand"] is ref.bgmv_expand


@pytest.mark.parametrize("indices", [
    [0, 0, 2, 1, -1, 1, 0, 2, 2, -1, 0],  # decode-like, balanced: one padded batch
    [0] * 9 + [1, 2],  # one long, two short: padding would triple the rows, so groups
    [1] * TOKENS, [-1] * TOKENS])
def test_add_lora_linear_matches_the_wrappers_own(indices):
    """The fused layer method (q/k/v-like 3 slices, scaling 0.5) equals PunicaWrapperCPU's own
    method on the per-op grouped ops (vLLM's reference ops read index -1 as the last slot, the
    GPU kernels as no adapter), for mixed, single and no adapters; and a rewritten slot (as
    vLLM loads another adapter into it) is seen, not served from the cache."""
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    cpu_lora.register()
    own = cpu_lora._ORIGINAL["add_lora_linear"]
    wrapper = PunicaWrapperCPU(max_num_batched_tokens=64, max_batches=8, device="cpu")
    idx = torch.tensor(indices)
    wrapper._token_lora_indices[:TOKENS].copy_(idx)
    wrapper.indices_len[0] = TOKENS
    wrapper.is_prefill = False
    g = torch.Generator().manual_seed(1)
    slices = (D_OUT, 16, 16)
    a = tuple(torch.randn(SLOTS, 1, RANK, D_IN, generator=g) for _ in slices)
    b = tuple(torch.randn(SLOTS, 1, n, RANK, generator=g) for n in slices)
    x, y = torch.randn(TOKENS, D_IN, generator=g), torch.randn(TOKENS, sum(slices), generator=g)
    for _ in range(2):
        want = y.clone()
        own(wrapper, want, x, a, b, 0.5, slices)
        got = y.clone()
        cpu_lora.add_lora_linear(wrapper, got, x, a, b, 0.5, slices)
        torch.testing.assert_close(got, want)
        a[1][:, 0].add_(1.0)  # an adapter loaded into every slot: the next pass must see it


def test_the_per_step_caches_keep_their_tensors_alive():
    """Caches are keyed by storage address: an entry keeps its tensor alive, so a later step's
    indices (or another test's wrapper) cannot reuse that memory and hit a stale entry."""
    import weakref

    idx = torch.tensor([0, 1, 1, 0])
    alive = weakref.ref(idx)
    cpu_lora._step_groups(idx)
    cpu_lora._step_plan(idx, 2)
    del idx
    assert alive() is not None
