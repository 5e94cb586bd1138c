"""The training core without Ray: loss, schedule, data plan, collation, VLM labels, checkpoints."""

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from kore_ray.constraint import build_method
from kore_ray.data.schemas import Conversation
from kore_ray.data.tokenize import IGNORE_INDEX, pad_token_id
from kore_ray.errors import InputError
from kore_ray.models.targets import find_target_groups
from kore_ray.models.tiny import save_tiny_model, tiny_text_model
from kore_ray.train.checkpoint import (
    gather_state,
    load_optimizer_state,
    load_weights,
    read_train_state,
    read_weights,
    trainable_names,
    write_checkpoint,
)
from kore_ray.train.data import (
    Collate,
    Tokenize,
    expand_labels,
    image_token_id,
    load_preprocessor,
    per_worker_batch,
    plan_schedule,
    rank_tables,
    vision_batch,
)
from kore_ray.train.loop import MetricsLog, fsdp_kwargs
from kore_ray.train.steps import (
    assistant_loss_sum,
    build_optimizer,
    build_scheduler,
    labelled_loss_sum,
    loss_positions,
    loss_token_count,
    lr_factor,
    train_step,
)


def _messages(i: int) -> list[dict]:
    return [
        {"role": "user", "content": f"Where does item {i} live?"},
        {"role": "assistant", "content": "In the city of Q" + "x" * (i % 5) + f", number {i}."},
    ]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("llama") / "model", kind="llama")


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    for color in ("red", "blue"):
        Image.new("RGB", (40, 30), color).save(root / f"{color}.png")
    return save_tiny_model(root / "model", kind="vlm")


def _tokenised(model_dir, n: int = 8, images: list | None = None) -> dict[str, np.ndarray]:
    """What a rank's shard hands the collate for one step: numpy columns, as Ray Data does."""
    rows = []
    for i in range(n):
        messages = _messages(i)
        if images is not None:
            messages[0]["content"] = [{"type": "image"}, {"type": "text", "text": "What is this?"}]
        rows.append({"step": 0, "id": f"c{i}", "messages": json.dumps(messages),
                     "image": images[i % len(images)] if images else None})
    out = Tokenize(str(model_dir), max_length=64)(pa.Table.from_pylist(rows))
    batch = {}
    for name in out.column_names:
        column = np.empty(len(out), dtype=object)
        values = out.column(name).to_pylist()
        column[:] = [np.array(v) if isinstance(v, list) else v for v in values]
        batch[name] = column
    batch["step"] = batch["step"].astype(np.int64)
    return batch


def _micro(batches: dict, model_dir, micro: int, skip_before: int = 0, packed: bool = False):
    """Padded by default: most tests below read the attention mask; packing has its own."""
    pre, vision = load_preprocessor(str(model_dir))
    return Collate(pre, vision, pad_token_id(pre), 64, micro, skip_before, packed)(batches)


# --- loss and schedule ------------------------------------------------------------------


def test_assistant_loss_is_the_hf_loss_summed(llama_dir):
    model, _ = tiny_text_model()
    batch = _micro(_tokenised(llama_dir, 4), llama_dir, micro=4).micro_batches[0]
    with torch.no_grad():
        hf = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   labels=batch["labels"]).loss
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    n = loss_token_count(batch["labels"])
    assert 0 < n < int(batch["attention_mask"].sum())  # prompts carry no loss
    torch.testing.assert_close(assistant_loss_sum(logits, batch["labels"]) / n, hf)


def test_logits_only_where_the_loss_needs_them(llama_dir):
    # The step asks the model for logits at the labelled positions only; the loss and its
    # gradients must be those of the full logits.
    model, _ = tiny_text_model()
    batch = _micro(_tokenised(llama_dir, 4), llama_dir, micro=4).micro_batches[0]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    positions = loss_positions(batch["labels"])
    assert 0 < len(positions) < batch["input_ids"].shape[1] - 1  # the prompts are skipped
    losses, grads = [], []
    for keep in (None, positions):
        model.zero_grad()
        logits = model(**inputs, logits_to_keep=0 if keep is None else keep).logits
        loss = assistant_loss_sum(logits, batch["labels"], keep)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(losses[1], losses[0])
    torch.testing.assert_close(grads[1], grads[0])


def test_logits_only_for_labelled_tokens(llama_dir):
    # The step's lm_head sees only the labelled (row, position) hidden states: the loss and
    # its gradients must be those of the full logits, with rows of different prompt lengths.
    model, _ = tiny_text_model()
    batch = _micro(_tokenised(llama_dir, 4), llama_dir, micro=4).micro_batches[0]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, a, out: seen.append(out.shape))
    losses, grads = [], []
    for full in (True, False):
        model.zero_grad()
        if full:
            loss = assistant_loss_sum(model(**inputs).logits, batch["labels"])
        else:
            loss = labelled_loss_sum(model, inputs, batch["labels"])
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    hook.remove()
    assert seen[1][:2] == (1, loss_token_count(batch["labels"]))  # one logit row per label
    torch.testing.assert_close(losses[1], losses[0])
    torch.testing.assert_close(grads[1], grads[0])


def test_lr_schedules():
    assert [lr_factor(s, 10, 2, "constant") for s in range(3)] == [0.5, 1.0, 1.0]
    assert lr_factor(2, 12, 2, "linear") == 1.0 and lr_factor(7, 12, 2, "linear") == 0.5
    assert lr_factor(7, 12, 2, "cosine") == pytest.approx(0.5)
    assert 0 < lr_factor(11, 12, 2, "cosine") < 0.05  # the last step keeps a little
    with pytest.raises(InputError, match="lr_schedule"):
        lr_factor(0, 10, 0, "exponential")


def test_optimizer_takes_trainable_parameters_only():
    model, _ = tiny_text_model()
    peft = build_method(model, "lora", find_target_groups(model), rank=4)
    opt = build_optimizer(peft, 1e-3)
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert ids == {id(p) for p in peft.parameters() if p.requires_grad}
    for p in peft.parameters():
        p.requires_grad_(False)
    with pytest.raises(InputError, match="no trainable"):
        build_optimizer(peft, 1e-3)


def _step(model, micro_batches, **kw):
    opt = build_optimizer(model, 1e-2)
    return train_step(model, opt, build_scheduler(opt, 10, 0, "constant"), micro_batches, **kw)


def _sgd_step(model, micro_batches):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = build_scheduler(opt, 10, 0, "constant")
    return train_step(model, opt, sched, micro_batches, max_grad_norm=1.0)


def test_micro_batches_give_the_one_batch_step(llama_dir):
    """Normalising by the global token count makes any split of a batch the same step: the
    same property lets DDP workers (gradients averaged, loss scaled by W) match one worker.
    (SGD, so parameters show the gradient; Adam's first step is ~lr * sign(g) and turns
    float32 rounding of near-zero gradients into visible differences.)"""
    data = _tokenised(llama_dir, 6)
    one, _ = tiny_text_model()
    split, _ = tiny_text_model()
    a = _sgd_step(one, _micro(data, llama_dir, micro=6).micro_batches)
    b = _sgd_step(split, _micro(data, llama_dir, micro=2).micro_batches)
    assert a.loss_tokens == b.loss_tokens and a.tokens == b.tokens
    assert a.loss == pytest.approx(b.loss, rel=1e-6)
    assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-5)
    for p, q in zip(one.parameters(), split.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_activation_checkpointing_changes_nothing(llama_dir):
    batches = _micro(_tokenised(llama_dir, 4), llama_dir, micro=4).micro_batches
    plain, _ = tiny_text_model()
    ckpt, _ = tiny_text_model()
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    plain.train(), ckpt.train()
    a, b = _step(plain, batches), _step(ckpt, batches)
    assert a.loss == pytest.approx(b.loss, rel=1e-6)
    for p, q in zip(plain.parameters(), ckpt.parameters()):
        torch.testing.assert_close(p, q)


def test_bfloat16_autocast_keeps_float32_weights_and_the_loss(llama_dir):
    """Autocast computes in bf16 but the parameters, their gradients and the optimizer stay
    float32: the loss agrees with the float32 step to bf16's precision."""
    batches = _micro(_tokenised(llama_dir, 4), llama_dir, micro=2).micro_batches
    plain, _ = tiny_text_model()
    mixed, _ = tiny_text_model()
    a, b = _sgd_step(plain, batches), _step_amp(mixed, batches)
    assert b.loss == pytest.approx(a.loss, rel=2e-2) and b.loss != a.loss
    assert all(p.dtype == torch.float32 for p in mixed.parameters())
    start, _ = tiny_text_model()
    assert any(not torch.equal(p, q) for p, q in zip(start.parameters(), mixed.parameters()))


def _step_amp(model, micro_batches):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return train_step(model, opt, build_scheduler(opt, 10, 0, "constant"), micro_batches,
                      max_grad_norm=1.0, autocast=torch.bfloat16)


def test_autocast_setting_resolves_per_device(monkeypatch):
    from kore_ray.train import steps

    cpu = torch.device("cpu")
    assert steps.autocast_dtype("off", cpu) is None
    assert steps.autocast_dtype("bfloat16", cpu) is torch.bfloat16
    monkeypatch.setattr(steps, "fast_bfloat16", lambda device: False)
    assert steps.autocast_dtype("auto", cpu) is None
    monkeypatch.setattr(steps, "fast_bfloat16", lambda device: True)
    assert steps.autocast_dtype("auto", cpu) is torch.bfloat16


# --- data plan ----------------------------------------------------------------------------


def test_schedule_visits_each_conversation_once_per_epoch():
    s = plan_schedule(10, 4, epochs=2, max_steps=None, seed=0)
    assert s.shape == (5, 4)  # 20 rows -> 5 global batches
    flat = s.reshape(-1)
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert not np.array_equal(flat[:10], flat[10:])  # each epoch has its own order
    assert np.array_equal(s, plan_schedule(10, 4, 2, None, seed=0))
    assert not np.array_equal(s, plan_schedule(10, 4, 2, None, seed=1))
    assert plan_schedule(10, 4, 1, None, 0).shape == (2, 4)  # the short tail is dropped
    assert plan_schedule(3, 2, 1, max_steps=7, seed=0).shape == (7, 2)  # data repeats
    with pytest.raises(InputError, match="one global batch"):
        plan_schedule(3, 4, 1, None, 0)


def test_ranks_split_each_global_batch():
    with pytest.raises(InputError, match="divisible"):
        per_worker_batch(6, 4)
    convs = [Conversation(id=f"c{i}", task="qa", messages=_messages(i)) for i in range(6)]
    schedule = plan_schedule(6, 4, 2, None, 0)
    tables = [pa.concat_tables(blocks) for blocks in rank_tables(convs, schedule, 2)]
    for t in tables:
        assert t.column("step").to_pylist() == sorted(t.column("step").to_pylist())
    for step in range(schedule.shape[0]):
        got = [i for t in tables for i, s in zip(t.column("id").to_pylist(),
                                                  t.column("step").to_pylist()) if s == step]
        assert got == [f"c{i}" for i in schedule[step]]  # rank 0's slots, then rank 1's


def test_collate_splits_micro_batches_and_skips_done_steps(llama_dir):
    data = _tokenised(llama_dir, 5)
    batch = _micro(data, llama_dir, micro=2)
    assert batch.step == 0 and [len(mb["input_ids"]) for mb in batch.micro_batches] == [2, 2, 1]
    assert _micro(data, llama_dir, micro=2, skip_before=1).micro_batches == []
    data["step"] = np.array([0, 0, 1, 1, 1])
    with pytest.raises(RuntimeError, match="out of order"):
        _micro(data, llama_dir, micro=2)


def test_packed_collate_is_one_sequence_per_micro_batch(llama_dir):
    data = _tokenised(llama_dir, 5)
    padded = _micro(data, llama_dir, micro=2).micro_batches
    packed = _micro(data, llama_dir, micro=2, packed=True).micro_batches
    assert len(packed) == 3 and all("attention_mask" not in mb for mb in packed)
    for p, q in zip(padded, packed):
        lengths = p["attention_mask"].sum(1).tolist()
        assert q["input_ids"].shape == (1, sum(lengths))
        starts = np.cumsum([0] + lengths[:-1])
        assert q["position_ids"][0, starts].tolist() == [0] * len(lengths)  # restart per row
        assert (q["labels"][0, starts] == IGNORE_INDEX).all()  # no row predicts the next one
        assert loss_token_count(q["labels"]) == loss_token_count(p["labels"])


def _tiny_gemma3(tokenizer):
    """Gemma 3's text model with a sliding window shorter than the rows: the packed mask must
    combine the window with the rows' boundaries."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):  # the same weights each call, no global seed
        torch.manual_seed(0)
        return Gemma3ForCausalLM(config)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_packed_step_is_the_padded_step(llama_dir, arch):
    data = _tokenised(llama_dir, 6)
    models = [_tiny_gemma3(tiny_text_model()[1]) if arch == "gemma3" else tiny_text_model(arch)[0]
              for _ in range(2)]
    a = _sgd_step(models[0], _micro(data, llama_dir, micro=3).micro_batches)
    b = _sgd_step(models[1], _micro(data, llama_dir, micro=3, packed=True).micro_batches)
    assert (a.loss_tokens, a.tokens) == (b.loss_tokens, b.tokens)
    assert a.loss == pytest.approx(b.loss, rel=1e-5)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# --- vision-language batches --------------------------------------------------------------


def test_vlm_labels_follow_the_expanded_image(vlm_dir):
    processor, vision = load_preprocessor(str(vlm_dir))
    assert vision
    data = _tokenised(vlm_dir, 2, images=[str(vlm_dir.parent / "red.png")])
    rows = [{k: data[k][i] for k in data} for i in range(2)]
    for r in rows:
        r["input_ids"], r["labels"] = list(r["input_ids"]), list(r["labels"])
    enc = vision_batch(processor, rows, max_length=256)
    image = image_token_id(processor)
    assert enc["pixel_values"].shape[0] == 2
    for i, r in enumerate(rows):
        n = int(enc["attention_mask"][i].sum())
        assert (enc["input_ids"][i, :n] == image).sum() > 1  # the image was expanded
        supervised = enc["input_ids"][i][enc["labels"][i] != IGNORE_INDEX].tolist()
        assert supervised == [t for t, y in zip(r["input_ids"], r["labels"]) if y != IGNORE_INDEX]
    with pytest.raises(InputError, match="beyond train.max_length"):
        vision_batch(processor, rows, max_length=8)


def test_expand_labels_refuses_what_it_cannot_align():
    assert expand_labels([1, 9, 2], [-100, -100, 2], [1, 7, 9, 9, 7, 2], 9, "c") == [
        -100, -100, -100, -100, -100, 2]
    with pytest.raises(InputError, match="around the image"):
        expand_labels([1, 9, 2], [-100, -100, 2], [1, 7, 9, 9, 7, 3], 9, "c")
    with pytest.raises(InputError, match="one image"):
        expand_labels([9, 9], [-100, -100], [9, 9], 9, "c")


def test_vlm_short_run_learns(vlm_dir):
    from kore_ray.models import load_model

    images = [str(vlm_dir.parent / f"{c}.png") for c in ("red", "blue")]
    batches = _micro(_tokenised(vlm_dir, 4, images=images), vlm_dir, micro=2).micro_batches
    assert "pixel_values" in batches[0]
    model, _ = load_model(str(vlm_dir))
    torch.manual_seed(0)  # LoRA's random A: the same run every time
    model = build_method(model, "lora", find_target_groups(model), rank=8)
    model.train()
    opt = build_optimizer(model, 1e-2)
    sched = build_scheduler(opt, 10, 0, "constant")
    losses = [train_step(model, opt, sched, batches).loss for _ in range(8)]
    # At this learning rate single steps bounce; the last three together must be well down.
    assert all(np.isfinite(losses)) and np.mean(losses[-3:]) < 0.9 * losses[0], losses


# --- checkpoints and metrics --------------------------------------------------------------


def _lora(seed=0):
    model, _ = tiny_text_model()
    torch.manual_seed(seed)
    return build_method(model, "lora", find_target_groups(model), rank=4)


def test_checkpoint_resume_continues_the_same_trajectory(llama_dir, tmp_path):
    batches = _micro(_tokenised(llama_dir, 4), llama_dir, micro=4).micro_batches

    def run(model, opt, sched, n):
        return [train_step(model, opt, sched, batches).loss for _ in range(n)]

    ref = _lora()
    opt = build_optimizer(ref, 1e-2)
    sched = build_scheduler(opt, 6, 2, "cosine")
    run(ref, opt, sched, 2)
    weights, opt_state = gather_state(ref, opt, trainable_names(ref))
    assert weights and all("lora_" in k for k in weights)  # adapter weights only
    write_checkpoint(tmp_path, weights, opt_state, sched, 2, {"loss": 0.0})
    expected = run(ref, opt, sched, 2)

    resumed = _lora(seed=1)  # another random A: the checkpoint must overwrite it
    load_weights(resumed, read_weights(tmp_path))
    opt2 = build_optimizer(resumed, 1e-2)
    sched2 = build_scheduler(opt2, 6, 2, "cosine")
    state = read_train_state(tmp_path)
    load_optimizer_state(resumed, opt2, state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    assert state["step"] == 2
    assert run(resumed, opt2, sched2, 2) == expected


def test_checkpoint_leaves_out_a_frozen_tied_weight():
    """Gemma ties lm_head to the embedding: the alias must not ride along as 'trainable'."""
    model = _lora()
    inner = model.base_model.model
    inner.lm_head.weight = inner.model.embed_tokens.weight
    opt = build_optimizer(model, 1e-3)
    weights, _ = gather_state(model, opt, trainable_names(model))
    assert set(weights) == trainable_names(model)
    assert all("lora_" in k for k in weights)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    model, _ = tiny_text_model()
    with pytest.raises(InputError, match="does not match"):
        load_weights(_lora(), {n: p for n, p in model.named_parameters()})


def test_metrics_restart_keeps_the_checkpointed_steps(tmp_path):
    path = tmp_path / "m" / "metrics.jsonl"
    log = MetricsLog(path, keep_through=0)
    for step in (1, 2, 3):
        log.write({"step": step})
    log = MetricsLog(path, keep_through=2)  # restarted from the step-2 checkpoint
    log.write({"step": 3, "again": True})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 1}, {"step": 2}, {"step": 3, "again": True}]


def test_fsdp_wraps_decoder_layers():
    policy = fsdp_kwargs(_lora())
    assert policy["use_orig_params"]
    classes = policy["auto_wrap_policy"].keywords["transformer_layer_cls"]
    assert {c.__name__ for c in classes} == {"LlamaDecoderLayer"}
