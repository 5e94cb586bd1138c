"""KORE's merged-weight training path equals PEFT's own forward and backward (constraint/merged.py)."""

from __future__ import annotations

import pytest
import torch

from kore_ray.constraint import build_method, collect_covariance
from kore_ray.constraint.merged import FrozenALinear, use_merged_forward
from kore_ray.models.targets import find_target_groups
from kore_ray.models.tiny import tiny_text_model


def _kore(store, groups, train_a=False):
    model = tiny_text_model("llama", seed=0)[0]
    return build_method(model, "kore-v1" if train_a else "kore", groups, store, rank=8)


@pytest.fixture(scope="module")
def store():
    model = tiny_text_model("llama", seed=0)[0]
    groups = find_target_groups(model)
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(4, 60, (8, 32), generator=g)} for _ in range(4)]
    return collect_covariance(model, batches, groups), groups


def _layers(model):
    return [m for m in model.modules() if isinstance(m, FrozenALinear)]


def _steps(model, tokens, steps):
    """SGD steps on two micro-batches each; the losses and B's gradients of the first step.
    (SGD, not Adam: Adam divides by |grad| and blows rounding up where a gradient is ~0.)"""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=2.0)
    model.train()
    losses, first_grads = [], None
    for _ in range(steps):
        for half in tokens.chunk(2):
            loss = model(input_ids=half, labels=half).loss
            loss.backward()
            losses.append(loss.item())
        if first_grads is None:
            first_grads = [p.grad.clone() for p in params]
        opt.step()
        opt.zero_grad()
    return losses, first_grads


def test_merged_training_follows_pefts_forward(store):
    """Same losses, B gradients and trained B as PEFT's forward (float32 rounding apart), over
    steps that change B (so the merged weight must be re-formed each step), with A untouched."""
    cov, groups = store
    tokens = torch.randint(100, 160, (8, 24), generator=torch.Generator().manual_seed(1))
    merged, plain = _kore(cov, groups), _kore(cov, groups)
    assert len(_layers(merged)) == sum(len(g.modules) for g in groups)
    use_merged_forward(plain, False)
    assert not _layers(plain)
    a_before = {n: p.clone() for n, p in merged.named_parameters() if "lora_A" in n}

    losses_m, grads_m = _steps(merged, tokens, 4)
    losses_p, grads_p = _steps(plain, tokens, 4)

    # The fast path really ran: every layer re-forms its merged weight from the stepped B.
    merged(input_ids=tokens, labels=tokens)
    for layer in _layers(merged):
        _, weight = layer._kore_merged
        w, a, b = layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight
        torch.testing.assert_close(weight, w + b.detach() @ a, rtol=0, atol=1e-6)
    assert losses_m[-1] < losses_m[0] - 0.1  # B moved: it learns
    torch.testing.assert_close(torch.tensor(losses_m), torch.tensor(losses_p), rtol=1e-5, atol=1e-5)
    for gm, gp in zip(grads_m, grads_p, strict=True):
        torch.testing.assert_close(gm, gp, rtol=1e-4, atol=1e-6)
    for (name, pm), (_, pp) in zip(merged.named_parameters(), plain.named_parameters(), strict=True):
        if "lora_B" in name:
            torch.testing.assert_close(pm, pp, rtol=1e-4, atol=1e-6)
    assert all(torch.equal(p, a_before[n]) for n, p in merged.named_parameters() if "lora_A" in n)


def test_input_gradients_and_eval_match(store):
    """dL/dx through a merged layer equals PEFT's; without grad (eval) PEFT's forward runs."""
    cov, groups = store
    merged, plain = _kore(cov, groups), _kore(cov, groups)
    use_merged_forward(plain, False)
    with torch.no_grad():  # a trained-looking B, not B0
        for model in (merged, plain):
            torch.manual_seed(2)
            for layer in [m for m in model.modules() if hasattr(m, "lora_B")]:
                layer.lora_B["default"].weight.add_(0.05 * torch.randn_like(layer.lora_B["default"].weight))
    layer_m = _layers(merged)[0]
    layer_p = plain.get_submodule(next(n for n, m in merged.named_modules() if m is layer_m))
    x = torch.randn(2, 64, layer_m.in_features, requires_grad=True)  # enough tokens to merge
    x_p = x.detach().clone().requires_grad_()
    y_m, y_p = layer_m(x), layer_p(x_p)
    torch.testing.assert_close(y_m, y_p, rtol=1e-5, atol=1e-6)
    assert "_kore_merged" in layer_m.__dict__
    y_m.square().sum().backward()
    y_p.square().sum().backward()
    torch.testing.assert_close(x.grad, x_p.grad, rtol=1e-5, atol=1e-5)

    fresh = _kore(cov, groups)
    tokens = torch.randint(4, 60, (2, 12))
    with torch.no_grad():
        fresh(input_ids=tokens)
    assert not any("_kore_merged" in m.__dict__ for m in _layers(fresh))


def test_falls_back_where_the_maths_would_differ_or_merging_costs_more(store):
    """kore-v1 (A trains) keeps PEFT's layer; bf16 weights and batches too small to pay for the
    merge (d_in d_out / (d_in + 2 d_out) tokens: 32-64 here) take PEFT's forward."""
    cov, groups = store
    assert not _layers(_kore(cov, groups, train_a=True))
    model = _kore(cov, groups)
    model.train()
    small = torch.randint(4, 60, (1, 30))
    model(input_ids=small, labels=small).loss.backward()
    assert not any("_kore_merged" in m.__dict__ for m in _layers(model))
    large = torch.randint(4, 60, (2, 40))
    model(input_ids=large, labels=large).loss.backward()
    assert all("_kore_merged" in m.__dict__ for m in _layers(model))
    model = _kore(cov, groups).to(torch.bfloat16)
    model.train()
    tokens = torch.randint(4, 60, (2, 12))
    model(input_ids=tokens, labels=tokens).loss.backward()
    assert _layers(model) and not any("_kore_merged" in m.__dict__ for m in _layers(model))
