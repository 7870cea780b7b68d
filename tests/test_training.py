"""Trainer: protocol checks, LR schedule, EMA, clipping, precision, discriminator, checkpoints and resume."""

import copy
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from fastlatent.training import (
    EMA,
    Callback,
    LRSchedule,
    Trainer,
    TrainerConfig,
    epoch_permutation,
    list_checkpoints,
    load_checkpoint,
    plot_metrics,
    read_metrics,
)
from fastlatent.training import trainer as trainer_module
from fastlatent.training.data_order import BatchStream, EpochBatchSampler

REPO_ROOT = Path(__file__).resolve().parents[1]


class PairDataset(Dataset):
    """``(x [4], y)`` pairs with ``y = x.sum()``: a regression any small net learns quickly."""

    def __init__(self, n=64, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x.sum(-1)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class Regressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.SiLU(), nn.Linear(16, 1))
        self.seen_dtypes = []

    def training_step(self, batch, step):
        x, y = batch
        pred = self.net(x).squeeze(-1)
        self.seen_dtypes.append(pred.dtype)
        loss = ((pred.float() - y) ** 2).mean()
        return {"loss": loss, "mae": (pred.float() - y).abs().mean(), "constant": 3.0}


class TinyGAN(nn.Module):
    """Generator maps x to an output; the discriminator scores outputs. The generator's loss includes
    the adversarial term -D(G(x)), which also produces gradients on D's weights that must not train D."""

    def __init__(self, adversarial_from_step=0):
        super().__init__()
        self.generator = nn.Linear(4, 4)
        self.discriminator = nn.Sequential(nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 1))
        self.adversarial_from_step = adversarial_from_step

    def discriminator_parameters(self):
        return list(self.discriminator.parameters())

    def training_step(self, batch, step):
        x, y = batch
        fake = self.generator(x)
        rec = ((fake.sum(-1) - y) ** 2).mean()
        if step < self.adversarial_from_step:
            return {"loss": rec, "rec": rec}
        g_adv = -self.discriminator(fake).mean()
        real = x.flip(-1)
        d_loss = (
            torch.relu(1 - self.discriminator(real)).mean()
            + torch.relu(1 + self.discriminator(fake.detach())).mean()
        )
        return {"loss": rec + 0.1 * g_adv, "disc_loss": d_loss, "rec": rec}


def small_config(tmp_path, **kw):
    base = dict(
        out_dir=str(tmp_path / "run"),
        steps=6,
        batch_size=8,
        lr=1e-2,
        log_every=1,
        checkpoint_every=3,
        progress=False,
        plots=False,
    )
    base.update(kw)
    return base


# ---------------------------------------------------------------------------------------------- schedule


def test_lr_schedule_values():
    s = LRSchedule("cosine", total_steps=10, warmup_steps=4, min_lr_ratio=0.1)
    assert [s.factor(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s.factor(4) == 1.0
    for i in range(4, 10):
        progress = (i - 4) / 6
        assert s.factor(i) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)), abs=1e-15)
    assert s.factor(10) == pytest.approx(0.1) and s.factor(50) == pytest.approx(0.1)
    lin = LRSchedule("linear", total_steps=5, warmup_steps=0, min_lr_ratio=0.0)
    assert [lin.factor(i) for i in range(5)] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    const = LRSchedule("constant", total_steps=5, warmup_steps=2)
    assert [const.factor(i) for i in range(5)] == [0.5, 1.0, 1.0, 1.0, 1.0]
    assert LRSchedule("cosine", total_steps=3, warmup_steps=3).factor(2) == 1.0
    for bad in (dict(kind="step"), dict(total_steps=0), dict(warmup_steps=11), dict(min_lr_ratio=1.5)):
        kwargs = dict(kind="cosine", total_steps=10, warmup_steps=0, min_lr_ratio=0.0) | bad
        with pytest.raises(ValueError, match=next(iter(bad))):
            LRSchedule(**kwargs)


def test_trainer_applies_the_schedule_per_step(tmp_path):
    trainer = Trainer(Regressor(), **small_config(tmp_path, steps=8, warmup_steps=3, min_lr_ratio=0.2))
    trainer.fit(PairDataset())
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    expected = LRSchedule("cosine", 8, 3, 0.2)
    assert [r["lr"] for r in records] == pytest.approx([1e-2 * expected.factor(i) for i in range(8)])
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * expected.factor(7))


# ---------------------------------------------------------------------------------------------- EMA


def test_ema_math():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    frozen = model[0].bias
    frozen.requires_grad_(False)
    ema = EMA(model, decay=0.9, start_step=2)
    history = []
    for step in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model[1].running_mean.add_(1.0)
        ema.update(model, step)
        history.append(model[0].weight.detach().clone())
    # Steps 0 and 1 copy; steps 2..4 average: e = 0.9 e + 0.1 w.
    expected = history[1]
    for w in history[2:]:
        expected = 0.9 * expected + 0.1 * w
    torch.testing.assert_close(ema.module[0].weight, expected, rtol=0, atol=1e-6)
    # Buffers are copied, frozen parameters are not averaged (they keep the copy made at construction).
    torch.testing.assert_close(ema.module[1].running_mean, model[1].running_mean)
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    assert not torch.equal(ema.module[0].bias, model[0].bias)  # frozen but changed by hand: not followed

    restored = EMA(model, decay=0.9)
    restored.load_state_dict(ema.state_dict())
    torch.testing.assert_close(restored.module[0].weight, ema.module[0].weight)
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.0)


def test_trainer_ema_excludes_discriminator_and_tracks_average(tmp_path):
    module = TinyGAN()
    trainer = Trainer(module, **small_config(tmp_path, steps=4, ema_decay=0.5, ema_start=1))
    init_disc = copy.deepcopy(module.discriminator.state_dict())
    weights = []
    record = Callback(
        lambda t: weights.append(t.module.generator.weight.detach().clone()), every=1, at_end=False
    )
    trainer.callbacks.append(record)
    trainer.fit(PairDataset())
    expected = weights[0]
    for w in weights[1:]:
        expected = 0.5 * expected + 0.5 * w
    torch.testing.assert_close(trainer.ema_model().generator.weight, expected, rtol=0, atol=1e-6)
    for name, value in trainer.ema_model().discriminator.state_dict().items():
        torch.testing.assert_close(value, init_disc[name])  # the discriminator is not averaged


# ---------------------------------------------------------------------------------------------- clipping


def _grad_norm(grads):
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


@pytest.mark.parametrize("clip", [None, 0.05])
def test_gradient_clipping_and_reported_norm(tmp_path, clip):
    torch.manual_seed(0)
    module = Regressor()
    reference = copy.deepcopy(module)
    trainer = Trainer(module, **small_config(tmp_path, steps=1, grad_clip=clip, shuffle=False))
    seen = {}

    def record_norm(opt, args, kwargs):
        seen.setdefault("norm", _grad_norm([p.grad for p in module.parameters()]))

    trainer.optimizer.register_step_pre_hook(record_norm)
    trainer.fit(PairDataset())
    data = PairDataset()
    reference.training_step((data.x[:8], data.y[:8]), 0)["loss"].backward()
    unclipped = _grad_norm([p.grad for p in reference.parameters()])
    record = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    assert record["grad_norm"] == pytest.approx(float(unclipped), rel=1e-5)
    assert unclipped > 0.05
    applied = float(seen["norm"])
    assert applied == pytest.approx(float(unclipped) if clip is None else clip, rel=1e-4)


# ---------------------------------------------------------------------------------------------- precision


def test_bf16_autocast_runs_and_learns(tmp_path):
    torch.manual_seed(0)
    module = Regressor()
    data = PairDataset()

    def full_loss():
        with torch.no_grad():
            return float(((module.net(data.x).squeeze(-1) - data.y) ** 2).mean())

    before = full_loss()
    trainer = Trainer(
        module, **small_config(tmp_path, steps=40, precision="bf16", checkpoint_every=100, log_every=5)
    )
    trainer.fit(data)
    assert set(module.seen_dtypes) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in module.parameters())  # autocast, not bf16 weights
    assert full_loss() < 0.4 * before


def test_fp16_uses_grad_scaler(tmp_path):
    if trainer_module._autocast_supported(torch.device("cpu"), torch.float16) is not None:
        pytest.skip("fp16 autocast is not available on this CPU build")
    module = Regressor()
    trainer = Trainer(module, **small_config(tmp_path, steps=4, precision="fp16"))
    assert trainer.scaler.is_enabled()
    trainer.fit(PairDataset())
    assert set(module.seen_dtypes) == {torch.float16}
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all(r["loss_scale"] > 1 for r in records)
    state = load_checkpoint(list_checkpoints(tmp_path / "run" / "checkpoints")[-1][1])
    assert state["scaler"]["scale"] == trainer.scaler.get_scale()


def test_unsupported_precision_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "_autocast_supported", lambda device, dtype: "no fp16 kernels here")
    with pytest.raises(ValueError, match=r"precision='fp16' is not supported on cpu.*no fp16 kernels here"):
        Trainer(Regressor(), **small_config(tmp_path, precision="fp16"))


# ---------------------------------------------------------------------------------------------- discriminator


def test_discriminator_optimizer_only_touches_discriminator(tmp_path):
    torch.manual_seed(0)
    module = TinyGAN()
    reference = copy.deepcopy(module)
    trainer = Trainer(module, **small_config(tmp_path, steps=1, shuffle=False, grad_clip=None))
    main_ids = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    disc_ids = {id(p) for g in trainer.disc_optimizer.param_groups for p in g["params"]}
    assert disc_ids == {id(p) for p in module.discriminator.parameters()}
    assert main_ids == {id(p) for p in module.generator.parameters()}
    grads = {}

    def capture(name, params):
        def hook(opt, args, kwargs):
            grads.setdefault(name, [p.grad.clone() for p in params])

        return hook

    trainer.optimizer.register_step_pre_hook(capture("gen", list(module.generator.parameters())))
    trainer.disc_optimizer.register_step_pre_hook(capture("disc", list(module.discriminator.parameters())))
    trainer.fit(PairDataset())

    data = PairDataset()
    out = reference.training_step((data.x[:8], data.y[:8]), 0)
    expected_gen = torch.autograd.grad(out["loss"], list(reference.generator.parameters()), retain_graph=True)
    expected_disc = torch.autograd.grad(out["disc_loss"], list(reference.discriminator.parameters()))
    polluted = torch.autograd.grad(
        reference.training_step((data.x[:8], data.y[:8]), 0)["loss"],
        list(reference.discriminator.parameters()),
    )
    assert any(p.abs().sum() > 0 for p in polluted)  # the generator loss does reach D: the test can fail
    for got, want in zip(grads["gen"], expected_gen):
        torch.testing.assert_close(got, want)
    for got, want in zip(grads["disc"], expected_disc):
        torch.testing.assert_close(got, want)
    record = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    assert {"disc_loss", "disc_grad_norm", "disc_lr", "rec"} <= set(record)


def test_discriminator_untouched_before_it_is_used(tmp_path):
    module = TinyGAN(adversarial_from_step=3)
    before = copy.deepcopy(module.discriminator.state_dict())
    states = []

    def snapshot(trainer):
        states.append(copy.deepcopy(trainer.module.discriminator.state_dict()))

    trainer = Trainer(
        module, **small_config(tmp_path, steps=4, disc_lr=5e-2, weight_decay=0.1), callbacks=[(1, snapshot)]
    )
    trainer.fit(PairDataset())
    assert trainer.disc_optimizer.param_groups[0]["lr"] == pytest.approx(5e-2 * trainer.schedule.factor(3))
    for name in before:
        torch.testing.assert_close(states[2][name], before[name])  # after 3 steps without disc_loss
        if name.endswith("weight"):  # the 4th step trains it (hinge bias gradients can cancel to 0)
            assert not torch.equal(states[3][name], before[name]), name


# ---------------------------------------------------------------------------------------------- errors


class NoStep(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))


class Returns(nn.Module):
    def __init__(self, make):
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))
        self.make = make

    def training_step(self, batch, step):
        return self.make(self, batch)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(steps=0), "steps must be an int >= 1"),
        (dict(steps=-3), "steps must be an int >= 1"),
        (dict(steps=2.5), "steps must be an int >= 1"),
        (dict(precision="fp8"), "precision must be one of"),
        (dict(batch_size=0), "batch_size"),
        (dict(lr=0.0), "lr must be"),
        (dict(lr=float("nan")), "lr must be"),
        (dict(betas=(0.9,)), "betas must be two numbers"),
        (dict(betas=(0.9, 1.0)), r"betas must lie in \[0, 1\)"),
        (dict(warmup_steps=10, steps=5), "warmup_steps"),
        (dict(schedule="step"), "schedule must be one of"),
        (dict(ema_decay=1.0), "ema_decay"),
        (dict(grad_clip=-1.0), "grad_clip"),
        (dict(checkpoint_every=0), "checkpoint_every"),
    ],
)
def test_bad_config_raises(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Trainer(Regressor(), **small_config(tmp_path, **kwargs))


def test_bad_modules_and_outputs_raise(tmp_path):
    with pytest.raises(TypeError, match="has no training_step"):
        Trainer(NoStep(), **small_config(tmp_path))
    with pytest.raises(TypeError, match="out_dir and steps"):
        Trainer(Regressor())
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        Trainer(object(), **small_config(tmp_path))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            Trainer(Regressor(), device="cuda", **small_config(tmp_path))
    cases = [
        (lambda m, b: {"total": m.w.sum()}, ValueError, "returned no 'loss' entry"),
        (lambda m, b: m.w.sum(), TypeError, "must return a dict"),
        (lambda m, b: {"loss": m.w * 2}, ValueError, r"'loss'\] must be a scalar tensor"),
        (lambda m, b: {"loss": m.w.sum().detach()}, ValueError, "does not require grad"),
        (lambda m, b: {"loss": m.w.sum(), "disc_loss": m.w.sum()}, ValueError, "no discriminator_parameters"),
        (lambda m, b: {"loss": m.w.sum(), "hist": m.w.detach()}, ValueError, r"\['hist'\] must be a scalar"),
        (lambda m, b: {"loss": m.w.sum(), "name": "abc"}, ValueError, r"\['name'\] must be a scalar tensor"),
    ]
    for i, (make, error, match) in enumerate(cases):
        trainer = Trainer(Returns(make), **small_config(tmp_path / str(i)))
        with pytest.raises(error, match=match):
            trainer.fit(PairDataset())


def test_dataset_errors(tmp_path):
    trainer = Trainer(Regressor(), **small_config(tmp_path, batch_size=100))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        trainer.fit(PairDataset(n=64))
    with pytest.raises(ValueError, match="empty"):
        trainer.fit(PairDataset(n=0))
    with pytest.raises(TypeError, match="map-style dataset"):
        trainer.fit(iter([1, 2, 3]))


def test_discriminator_parameters_must_belong_to_module(tmp_path):
    class Foreign(TinyGAN):
        def discriminator_parameters(self):
            return [nn.Parameter(torch.zeros(2))]

    with pytest.raises(ValueError, match="not a parameter of the module"):
        Trainer(Foreign(), **small_config(tmp_path))


def test_non_finite_loss_stops_before_a_checkpoint(tmp_path):
    def make(m, b):
        return {"loss": m.w.sum() * float("nan")}

    trainer = Trainer(Returns(make), **small_config(tmp_path, checkpoint_every=1))
    with pytest.raises(FloatingPointError, match="loss is nan at step 1"):
        trainer.fit(PairDataset())
    assert list_checkpoints(tmp_path / "run" / "checkpoints") == []


# ---------------------------------------------------------------------------------------------- data order


def test_data_order_is_seeded_sharded_and_resumable():
    assert torch.equal(epoch_permutation(10, seed=3, epoch=1), epoch_permutation(10, seed=3, epoch=1))
    assert not torch.equal(epoch_permutation(10, seed=3, epoch=1), epoch_permutation(10, seed=3, epoch=2))
    full = EpochBatchSampler(22, batch_size=4, seed=5, world_size=1)
    shards = [EpochBatchSampler(22, batch_size=2, seed=5, rank=r, world_size=2) for r in range(2)]
    assert full.batches_per_epoch == 5  # 22 // 4, the incomplete global batch is dropped
    for whole, a, b in zip(list(full), list(shards[0]), list(shards[1])):
        assert whole == a + b
    dataset = list(range(22))
    stream = BatchStream(dataset, EpochBatchSampler(22, 4, seed=5))
    seen = [next(stream).tolist() for _ in range(7)]
    assert stream.position()["epoch"] == 1 and stream.position()["batch_in_epoch"] == 2
    resumed = BatchStream(dataset, EpochBatchSampler(22, 4, seed=5), epoch=0, batch_in_epoch=3)
    assert [next(resumed).tolist() for _ in range(4)] == seen[3:]
    end_of_epoch = BatchStream(dataset, EpochBatchSampler(22, 4, seed=5), epoch=0, batch_in_epoch=5)
    assert next(end_of_epoch).tolist() == seen[5]


# ---------------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_contents_load_with_weights_only(tmp_path):
    trainer = Trainer(
        TinyGAN(),
        **small_config(
            tmp_path,
            steps=7,
            checkpoint_every=3,
            keep_checkpoints=2,
            ema_decay=0.9,
            precision="bf16",
            plots=True,
        ),
    )
    trainer.fit(PairDataset())
    folder = tmp_path / "run" / "checkpoints"
    assert [step for step, _ in list_checkpoints(folder)] == [6, 7]  # pruned to the 2 newest
    state = torch.load(folder / "step_00000007.pt", weights_only=True)
    assert state["step"] == 7
    assert {
        "model",
        "optimizer",
        "disc_optimizer",
        "scaler",
        "ema",
        "lr_schedule",
        "rng",
        "data",
        "config",
    } <= set(state)
    assert state["data"]["epoch"] == 7 * 8 // 64 and state["data"]["batch_in_epoch"] == 7 % 8
    for name, value in trainer.module.state_dict().items():
        torch.testing.assert_close(state["model"][name], value)
    assert (tmp_path / "run" / "metrics.png").stat().st_size > 1000
    config = json.loads((tmp_path / "run" / "trainer_config.json").read_text())
    assert config["steps"] == 7 and config["precision"] == "bf16"


def test_resume_skips_corrupt_newest_checkpoint_and_stale_temporaries(tmp_path):
    config = small_config(tmp_path, steps=6, checkpoint_every=2, keep_checkpoints=3)
    Trainer(Regressor(), **config).fit(PairDataset())
    folder = tmp_path / "run" / "checkpoints"
    newest = folder / "step_00000006.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # as if the disk lost the tail of the file
    stale = folder / ".step_00000008.pt.abc.tmp"
    stale.write_bytes(b"partial")
    trainer = Trainer(Regressor(), **small_config(tmp_path, steps=8, checkpoint_every=2, keep_checkpoints=3))
    with pytest.warns(RuntimeWarning) as caught:
        trainer.fit(PairDataset())
    messages = " | ".join(str(w.message) for w in caught)
    assert "step_00000006.pt could not be loaded" in messages and "resuming with steps=8" in messages
    assert not stale.exists()
    steps = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert steps == list(range(1, 9))  # resumed from step 4, steps 5.. re-run, no duplicates


def test_resume_refuses_changed_data_order(tmp_path):
    Trainer(Regressor(), **small_config(tmp_path, steps=2)).fit(PairDataset())
    trainer = Trainer(Regressor(), **small_config(tmp_path, steps=4, batch_size=4))
    with pytest.raises(ValueError, match="batch_size: 8 -> 4"):
        trainer.fit(PairDataset())
    Trainer(Regressor(), **small_config(tmp_path, steps=4, batch_size=4, resume=False)).fit(PairDataset())


def test_resume_refuses_a_different_architecture(tmp_path):
    Trainer(Regressor(), **small_config(tmp_path, steps=2)).fit(PairDataset())
    wider = Regressor()
    wider.net[0] = nn.Linear(4, 32)
    wider.net[2] = nn.Linear(32, 1)
    with pytest.raises(ValueError, match="does not fit this module and optimizer"):
        Trainer(wider, **small_config(tmp_path, steps=2)).fit(PairDataset())


def test_finished_run_is_not_retrained(tmp_path):
    Trainer(Regressor(), **small_config(tmp_path, steps=3)).fit(PairDataset())
    before = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert Trainer(Regressor(), **small_config(tmp_path, steps=3)).fit(PairDataset()) == {}
    assert read_metrics(tmp_path / "run" / "metrics.jsonl") == before


def test_callbacks_log_eval_records_and_do_not_change_the_run(tmp_path):
    def noisy_eval(trainer):
        torch.randn(100)  # consumes the RNG: must not change the training run
        return {"score": float(trainer.step)}

    class Noisy(Regressor):
        def training_step(self, batch, step):
            out = super().training_step(batch, step)
            out["loss"] = out["loss"] + 0.01 * torch.randn(()) ** 2
            return out

    torch.manual_seed(0)
    a = Trainer(Noisy(), **small_config(tmp_path / "a"), callbacks=[Callback(noisy_eval, every=2)])
    a.fit(PairDataset())
    torch.manual_seed(0)
    Trainer(Noisy(), **small_config(tmp_path / "b")).fit(PairDataset())
    records_a = read_metrics(tmp_path / "a" / "run" / "metrics.jsonl")
    records_b = read_metrics(tmp_path / "b" / "run" / "metrics.jsonl")
    evals = [r for r in records_a if r.get("kind") == "eval"]
    assert [(r["step"], r["score"]) for r in evals] == [(2, 2.0), (4, 4.0), (6, 6.0)]
    train_a = [r["loss"] for r in records_a if r.get("kind") != "eval"]
    assert train_a == [r["loss"] for r in records_b]
    plot_metrics(records_a, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 1000


def test_data_order_does_not_depend_on_worker_processes(tmp_path):
    from fastlatent.data import DigitsDataset

    class DigitLogits(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(64, 10)

        def training_step(self, batch, step):
            images, labels = batch
            logits = self.head(images.flatten(1))
            return {"loss": nn.functional.cross_entropy(logits, labels), "label_sum": labels.sum().float()}

    data = DigitsDataset("test", size=8, augment_shift=1)
    for workers in (0, 2):
        torch.manual_seed(0)
        config = small_config(tmp_path / str(workers), steps=5, num_workers=workers)
        Trainer(DigitLogits(), **config).fit(data)
    assert _curve(tmp_path / "0" / "run") == _curve(tmp_path / "2" / "run")


def test_config_from_dict_round_trip(tmp_path):
    config = TrainerConfig(out_dir=str(tmp_path), steps=10, betas=[0.5, 0.9])
    again = TrainerConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.betas == (0.5, 0.9)
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['learning_rate'\]"):
        TrainerConfig.from_dict({"out_dir": "x", "steps": 1, "learning_rate": 1.0})


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    torch.manual_seed(0)
    module = Regressor()
    twin = copy.deepcopy(module)
    Trainer(
        module, **small_config(tmp_path / "a", steps=3, batch_size=4, grad_accum_steps=2, shuffle=False)
    ).fit(PairDataset())
    Trainer(twin, **small_config(tmp_path / "b", steps=3, batch_size=8, shuffle=False)).fit(PairDataset())
    for p, q in zip(module.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------- kill and resume


class AugmentedData(Dataset):
    """Per-epoch augmentation through ``set_epoch``, as the fastlatent datasets do."""

    def __init__(self):
        self.x = torch.randn(40, 6, generator=torch.Generator().manual_seed(1))
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(1000 * self.epoch + i)
        return self.x[i] + 0.1 * torch.randn(6, generator=g), i % 3


class NoisyGAN(nn.Module):
    """Uses every RNG a checkpoint restores: torch (dropout, noise), numpy, python; has a discriminator."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 32), nn.SiLU(), nn.Dropout(0.2), nn.Linear(32, 6))
        self.disc = nn.Linear(6, 1)

    def discriminator_parameters(self):
        return list(self.disc.parameters())

    def training_step(self, batch, step):
        import random

        import numpy as np

        x, label = batch
        noisy = x + torch.randn_like(x) * float(np.random.uniform(0.05, 0.2)) * random.uniform(0.5, 1.5)
        out = self.net(noisy)
        rec = ((out - x) ** 2).mean()
        d_loss = torch.relu(1 - self.disc(x)).mean() + torch.relu(1 + self.disc(out.detach())).mean()
        return {
            "loss": rec - 0.01 * self.disc(out).mean(),
            "disc_loss": d_loss,
            "rec": rec,
            "label_mean": label.float().mean(),
        }


def resume_test_trainer(out_dir, precision, callbacks=()):
    torch.manual_seed(123)
    return Trainer(
        NoisyGAN(),
        out_dir=str(out_dir),
        steps=14,
        batch_size=6,
        grad_accum_steps=2,
        lr=3e-3,
        warmup_steps=3,
        ema_decay=0.8,
        ema_start=2,
        checkpoint_every=4,
        log_every=1,
        precision=precision,
        progress=False,
        callbacks=callbacks,
        plots=False,
    )


TRAIN_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch
    sys.path.insert(0, sys.argv[4])
    from test_training import AugmentedData, resume_test_trainer
    from fastlatent.training import Callback

    out_dir, kill_at, precision = sys.argv[1], int(sys.argv[2]), sys.argv[3]

    def die(trainer):
        if trainer.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    trainer = resume_test_trainer(out_dir, precision, callbacks=[Callback(die, every=1)])
    trainer.fit(AugmentedData())
    torch.save(trainer.ema_model().state_dict(), os.path.join(out_dir, "ema.pt"))
""")


def _start_script(script, *args):
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        OMP_NUM_THREADS="1",
    )
    command = [sys.executable, str(script), *map(str, args), str(Path(__file__).parent)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process):
    _, stderr = process.communicate(timeout=180)
    return process.returncode, stderr


def _curve(folder):
    return [
        {k: v for k, v in r.items() if k not in ("time", "samples_per_s")}
        for r in read_metrics(Path(folder) / "metrics.jsonl")
    ]


@pytest.mark.slow
def test_resume_after_sigkill_reproduces_the_loss_curve(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    # The uninterrupted run and the run that gets killed go side by side.
    straight = _start_script(script, tmp_path / "straight", -1, "fp32")
    killed = _start_script(script, tmp_path / "resumed", 10, "fp32")
    code, stderr = _finish(killed)
    assert code == -signal.SIGKILL, stderr
    assert [s for s, _ in list_checkpoints(tmp_path / "resumed" / "checkpoints")] == [4, 8]
    # It logged past its last checkpoint; the resumed run must replace those records.
    assert read_metrics(tmp_path / "resumed" / "metrics.jsonl")[-1]["step"] == 10
    resumed = _start_script(script, tmp_path / "resumed", -1, "fp32")
    for process in (straight, resumed):
        code, stderr = _finish(process)
        assert code == 0, stderr

    expected, got = _curve(tmp_path / "straight"), _curve(tmp_path / "resumed")
    assert [r["step"] for r in got] == list(range(1, 15))
    assert got == expected  # exact: every loss, metric, grad norm and lr, step by step
    assert expected[-1]["epoch"] >= 2  # the run crossed epoch boundaries
    ema_a = torch.load(tmp_path / "straight" / "ema.pt", weights_only=True)
    ema_b = torch.load(tmp_path / "resumed" / "ema.pt", weights_only=True)
    for name in ema_a:
        assert torch.equal(ema_a[name], ema_b[name]), name


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_resume_after_interruption_reproduces_the_loss_curve(tmp_path, precision):
    dtype = trainer_module.PRECISIONS[precision]
    if trainer_module._autocast_supported(torch.device("cpu"), dtype) is not None:
        pytest.skip(f"{precision} autocast is not available on this CPU build")
    resume_test_trainer(tmp_path / "straight", precision).fit(AugmentedData())

    def interrupt(trainer):
        if trainer.step == 7:
            raise Interrupted

    with pytest.raises(Interrupted):
        resume_test_trainer(tmp_path / "resumed", precision, callbacks=[(1, interrupt)]).fit(AugmentedData())
    torch.randn(1000)  # the resumed run must not depend on the state the interrupted process left
    resume_test_trainer(tmp_path / "resumed", precision).fit(AugmentedData())
    assert _curve(tmp_path / "resumed") == _curve(tmp_path / "straight")
