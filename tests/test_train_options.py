"""SimpleTuner's training-path options: loss_type and huber_c, the optimizer's settings, lr_end/lr_power,
the EMA's interval and warm-up, and gradient_checkpointing_interval, each checked by what it does."""

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from test_train_loop import LYCORIS_WITH_FF, FakeData, make_batch, make_job, make_trainer

from job.config.loader import load_config
from job.config.schema import JobConfig
from job.errors import ConfigError
from job.model.tiny import build_transformer
from job.model.transformer import prepare_base_model
from job.train.ema import AdapterEMA
from job.train.loss import huber_c_per_sample, training_loss
from job.train.optimizers import build_optimizer, optimizer_overrides
from job.train.schedule import build_lr_scheduler
from job.train.state import TrainState

pytestmark = pytest.mark.usefixtures("fresh_lycoris_preset", "one_torch_thread")


def _job(**settings) -> JobConfig:
    defaults = {"data_backend_config": "x.json", "lycoris_config": "l.json", "max_train_steps": 1}
    return JobConfig(**{**defaults, **settings})


def test_defaults_are_simpletuners():
    """SimpleTuner's field registry (simpletuner/simpletuner_sdk/server/services/field_registry/sections/):
    loss.py ``register_loss_fields`` (loss_type l2, huber_schedule snr, huber_c 0.1); training.py
    ``register_training_fields`` (lr_power 0.8, lr_num_cycles 1, ema_update_interval 1, ema_warmup_steps 0);
    advanced.py (lr_end 4e-7); model.py (gradient_checkpointing_interval unset); optimizer.py
    (optimizer_beta1/2 and optimizer_config unset); validation.py (validation_lycoris_strength 1.0)."""
    job = _job()
    assert (job.loss_type, job.huber_schedule, job.huber_c) == ("l2", "snr", 0.1)
    assert (job.lr_end, job.lr_power) == (4e-7, 0.8)
    assert (job.ema_update_interval, job.ema_warmup_steps) == (1, 0)
    assert job.gradient_checkpointing_interval is None
    assert (job.optimizer_beta1, job.optimizer_beta2, job.optimizer_config) == (None, None, None)
    assert job.validation_lycoris_strength == 1.0


# --- loss_type ---------------------------------------------------------------------------------------------


def _by_hand(prediction, target, sigmas, loss_type, c, schedule):
    """SimpleTuner's formulas written out per sample (simpletuner/helpers/models/common.py, ``loss`` with
    ``conditional_loss`` and ``compute_scheduled_huber_c``; flow matching's timestep is 1000·σ)."""
    losses = []
    for i, sigma in enumerate(sigmas.tolist()):
        d = prediction[i].double() - target[i].double()
        if loss_type == "l2":
            losses.append((d**2).mean())
            continue
        t = sigma * 1000
        if schedule == "constant":
            ci = c
        elif schedule == "exponential":
            ci = math.exp(-(-math.log(c) / 1000) * t)
        else:
            s = ((1 - t / 1000) / (t / 1000 + 0.0001)) ** 0.5
            ci = (1 - c) / (1 + s) ** 2 + c
        curve = torch.sqrt(d**2 + ci**2) - ci
        losses.append((2 * ci * curve if loss_type == "huber" else 2 * curve).mean())
    return float(torch.stack(losses).mean())


CASES = [("l2", "snr"), *[(t, s) for t in ("huber", "smooth_l1") for s in ("snr", "exponential", "constant")]]


@pytest.mark.parametrize(("loss_type", "schedule"), CASES)
def test_each_loss_type_is_simpletuners_formula(loss_type, schedule):
    generator = torch.Generator().manual_seed(0)
    prediction = torch.randn(3, 4, 8, 8, generator=generator).bfloat16()
    target = torch.randn(3, 4, 8, 8, generator=generator) * 3
    sigmas = torch.tensor([0.05, 0.5, 0.97])
    loss = training_loss(
        prediction, target, sigmas, loss_type=loss_type, huber_c=0.3, huber_schedule=schedule
    )
    assert loss.dtype == torch.float32
    assert float(loss) == pytest.approx(
        _by_hand(prediction, target, sigmas, loss_type, 0.3, schedule), rel=1e-5
    )


def test_huber_c_schedules_at_known_points():
    """simpletuner/helpers/models/common.py ``compute_scheduled_huber_c``: snr gives 1 at σ = 1 (no noise
    left to hide: c → 1) and c at σ → 0; exponential is c at σ = 1 and 1 at σ = 0."""
    sigmas = torch.tensor([1.0, 0.0])
    snr = huber_c_per_sample(sigmas, 0.1, "snr")
    assert float(snr[0]) == pytest.approx(1.0)
    assert float(snr[1]) == pytest.approx(0.1 + 0.9 / (1 + 100) ** 2)
    assert huber_c_per_sample(sigmas, 0.1, "exponential").tolist() == pytest.approx([0.1, 1.0])
    assert huber_c_per_sample(sigmas, 0.1, "constant").tolist() == pytest.approx([0.1, 0.1])


@pytest.mark.parametrize("loss_type", ["l2", "huber", "smooth_l1"])
def test_the_trainers_loss_is_the_hand_computed_one(loss_type):
    """The loss the loop reports for a step equals SimpleTuner's formula applied to what the transformer
    was given (σ, the noisy latents) and what it predicted."""
    batch = make_batch(3)
    job = make_job(loss_type=loss_type, huber_c=0.2, learning_rate=1e-2)
    trainer = make_trainer(job, FakeData(fixed=batch))
    seen: dict[str, torch.Tensor] = {}

    def before(module, args, kwargs):
        seen["noisy"], seen["sigmas"] = kwargs["hidden_states"].detach(), kwargs["timestep"].detach()

    def after(module, args, kwargs, output):
        seen["prediction"] = output[0].detach()

    hooks = [
        trainer.transformer.register_forward_pre_hook(before, with_kwargs=True),
        trainer.transformer.register_forward_hook(after, with_kwargs=True),
    ]
    result = trainer.step(TrainState())
    for hook in hooks:
        hook.remove()
    sigmas, x0 = seen["sigmas"], batch.latents
    sigma = sigmas.view(-1, 1, 1, 1)
    noise = (seen["noisy"] - (1 - sigma) * x0) / sigma
    expected = _by_hand(seen["prediction"], noise - x0, sigmas, loss_type, 0.2, "snr")
    assert result.loss == pytest.approx(expected, rel=1e-4)


def test_huber_c_that_zeroes_the_loss_is_refused():
    with pytest.raises(ValueError, match="huber_c 0"):
        _job(loss_type="huber", huber_c=0, huber_schedule="constant")
    _job(loss_type="smooth_l1", huber_c=0, huber_schedule="constant")  # plain L1: fine


# --- the optimizer -----------------------------------------------------------------------------------------


def _built(name: str, **settings) -> torch.optim.Optimizer:
    job = _job(optimizer=name, **settings)
    return build_optimizer(
        name, [torch.nn.Parameter(torch.ones(4))], job.learning_rate, optimizer_overrides(job)
    )


def test_each_optimizer_starts_from_simpletuners_settings():
    """simpletuner/helpers/training/optimizer_param.py ``optimizer_choices`` ``default_settings``."""
    adamw = _built("adamw").defaults
    assert (adamw["betas"], adamw["weight_decay"], adamw["eps"]) == ((0.9, 0.999), 1e-2, 1e-8)
    # optimi keeps betas as beta1 and beta2.
    optimi_adamw = _built("optimi-adamw").defaults
    assert (optimi_adamw["beta1"], optimi_adamw["beta2"], optimi_adamw["eps"]) == (0.9, 0.99, 1e-6)
    assert _built("optimi-lion").defaults["weight_decay"] == 0.0


def test_optimizer_config_and_betas_override_the_defaults():
    """simpletuner/helpers/training/optimizer_param.py ``convert_arg_to_parameters``: optimizer_config's
    pairs override the defaults, then optimizer_beta1/2 set betas."""
    group = _built(
        "adamw",
        optimizer_config="weight_decay=0.05,eps=1e-7,betas=ignored-by-betas-below",
        optimizer_beta1=0.8,
        optimizer_beta2=0.95,
    ).param_groups[0]
    assert group["betas"] == (0.8, 0.95)
    assert group["weight_decay"] == 0.05
    assert group["eps"] == 1e-7
    assert group["lr"] == 1e-4


def test_a_setting_the_optimizer_does_not_take_is_dropped_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="lokr"):
        optimizer = _built("optimi-lion", optimizer_config="eps=1e-6,weight_decay=0.1")
    assert optimizer.param_groups[0]["weight_decay"] == 0.1
    assert any("optimi-lion takes no eps" in r.getMessage() for r in caplog.records)


def test_bad_optimizer_settings_are_config_errors_naming_the_key(tiny_job: Path):
    for override, expected in [
        ("optimizer_config=eps", "optimizer_config: 'eps' is not key=value"),
        ("optimizer_config=eps=1.x", "'1.x' is not a number"),
        ("optimizer_beta1=0.8", "optimizer_beta1 and optimizer_beta2 go together"),
    ]:
        with pytest.raises(ConfigError) as caught:
            load_config(tiny_job, [override])
        assert caught.value.exit_code == 2
        assert expected in str(caught.value) and str(tiny_job) in str(caught.value), str(caught.value)
    # A value of the right form the optimizer itself rejects is still a config error, not a traceback.
    with pytest.raises(ConfigError, match="optimizer_config: adamw refused the settings"):
        build_optimizer("adamw", [torch.nn.Parameter(torch.ones(1))], 1e-4, {"eps": -1.0})


# --- lr_end and lr_power -----------------------------------------------------------------------------------


def test_polynomial_decays_to_lr_end_with_lr_power():
    """simpletuner/helpers/training/custom_schedule.py ``get_lr_scheduler`` (polynomial branch) and
    ``get_polynomial_decay_schedule_with_warmup``: lr_end + (lr - lr_end)·(1 - progress)^power after warm-up."""
    lr, end, power, warmup, total = 1e-3, 1e-5, 0.8, 10, 110
    job = _job(
        learning_rate=lr,
        lr_scheduler="polynomial",
        lr_warmup_steps=warmup,
        lr_end=end,
        lr_power=power,
        max_train_steps=total,
    )
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=lr)
    scheduler = build_lr_scheduler(job, optimizer, total)
    rates = []
    for _ in range(total + 1):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates[5] == pytest.approx(lr * 5 / warmup)
    for step in (10, 35, 60, 109):
        progress = (step - warmup) / (total - warmup)
        assert rates[step] == pytest.approx(end + (lr - end) * (1 - progress) ** power), step
    assert rates[total] == pytest.approx(end)


def test_lr_end_must_be_below_the_learning_rate_for_polynomial():
    with pytest.raises(ValueError, match="lr_end"):
        _job(learning_rate=1e-6, lr_scheduler="polynomial", lr_end=1e-5)
    _job(learning_rate=1e-6, lr_scheduler="constant", lr_end=1e-5)


# --- the EMA -----------------------------------------------------------------------------------------------


def test_ema_decay_follows_simpletuners_schedule():
    """simpletuner/helpers/training/ema.py ``EMAModel.get_decay``: step 1 copies (0), then
    min(decay, (1+s)/(10+s)) with s = step-1; with warmup_steps W, 0 before W and decay from W on."""
    ema = AdapterEMA([("w", torch.nn.Parameter(torch.ones(1)))], 0.995)
    assert [ema.decay_at(t) for t in (1, 2, 3)] == pytest.approx([0.0, 2 / 11, 3 / 12])
    assert ema.decay_at(10_000) == 0.995
    warm = AdapterEMA([("w", torch.nn.Parameter(torch.ones(1)))], 0.9, warmup_steps=5)
    assert [warm.decay_at(t) for t in (1, 4, 5, 6)] == [0.0, 0.0, 0.9, 0.9]


def test_the_ema_updates_only_every_ema_update_interval_steps():
    """simpletuner/helpers/training/ema.py ``should_update_ema``: update when step % interval == 0."""
    job = make_job(use_ema=True, ema_update_interval=3, ema_decay=0.5)
    trainer = make_trainer(job, FakeData(fixed=make_batch(5)), lycoris=LYCORIS_WITH_FF)
    state = TrainState()
    changed = []
    for _ in range(7):
        before = {k: v.clone() for k, v in trainer.objects.ema.state_dict().items()}
        trainer.step(state)
        after = trainer.objects.ema.state_dict()
        changed.append(any(not torch.equal(before[k], after[k]) for k in before))
    assert changed == [False, False, True, False, False, True, False]


# --- gradient_checkpointing_interval -----------------------------------------------------------------------


def _forward_backward(interval: int | None) -> tuple[int, list[torch.Tensor]]:
    """Block forward calls in one forward+backward (a checkpointed block runs twice), and the gradients."""
    torch.manual_seed(0)
    job = _job(gradient_checkpointing=True, gradient_checkpointing_interval=interval, mixed_precision="no")
    transformer = prepare_base_model(build_transformer(), job, torch.device("cpu"))
    transformer.proj_out.requires_grad_(True)
    calls = []
    for block in [*transformer.joint_transformer_blocks, *transformer.single_transformer_blocks]:
        # A pre-hook: recomputation stops once it has what backward needs, before forward hooks run.
        block.register_forward_pre_hook(lambda *_: calls.append(1))
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, 4, 8, 8, generator=generator, requires_grad=True)
    text = torch.randn(1, 6, 32, generator=generator)
    out = transformer(hidden_states=hidden, encoder_hidden_states=text, timestep=torch.tensor([0.5]))
    out.sample.square().mean().backward()
    return len(calls), [hidden.grad, *[p.grad for p in transformer.proj_out.parameters()]]


def test_checkpointing_every_nth_block_recomputes_only_those_and_gives_the_same_gradients():
    """simpletuner/helpers/training/gradient_checkpointing_interval.py ``should_checkpoint_block``: block i
    of each stack is checkpointed when i % interval == 0 (the tiny model: 1 joint block, 2 single)."""
    every, every_grads = _forward_backward(None)
    second, second_grads = _forward_backward(2)
    assert every == 3 + 3  # each of the 3 blocks runs again in backward
    assert second == 3 + 2  # joint 0 and single 0 again; single 1 kept its activations
    for a, b in zip(every_grads, second_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_the_options_file_acts_on_the_training_path_options():
    raw = json.loads((Path(__file__).parent.parent / "job/config/simpletuner_options.json").read_text())
    acted = {n for n, o in raw["config"].items() if o["disposition"] == "acted_on"}
    assert {
        "loss_type",
        "huber_c",
        "huber_schedule",
        "gradient_checkpointing_interval",
        "ema_update_interval",
        "ema_warmup_steps",
        "lr_end",
        "lr_power",
        "optimizer_beta1",
        "optimizer_beta2",
        "optimizer_config",
        "validation_lycoris_strength",
    } <= acted
