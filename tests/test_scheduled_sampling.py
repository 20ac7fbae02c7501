"""SimpleTuner's scheduled sampling (job.train.rollout): the chance per step, which samples roll out and how
far, the rollout the trainer's input comes from (made without a graph), and that a run with it is still a
pure function of (seed, step, rank), in process and through the real CLI."""

import math
from pathlib import Path

import pytest
import torch
from test_train_loop import FakeData, make_batch, make_job, make_trainer
from test_train_resume_cli import lokr_job

from job.config.deepspeed import deepspeed_problems
from job.config.loader import load_config
from job.flow_matching import draw_step, flow_target, noisy_latents, step_generator
from job.train.checkpoint import latest_complete
from job.train.lokr import LoKrTrainer
from job.train.loss import training_loss
from job.train.output import ADAPTER_FILE
from job.train.rollout import draw_offsets, rollout_probability, rollout_steps
from job.train.state import TrainState

pytestmark = pytest.mark.usefixtures("fresh_lycoris_preset", "one_torch_thread")

ROLLOUT = {
    "scheduled_sampling_max_step_offset": 6,
    "scheduled_sampling_probability": 1.0,
    "scheduled_sampling_reflexflow": False,
}


def rollout_job(**settings):
    return make_job(**{**ROLLOUT, **settings})


def test_the_chance_is_the_probability_without_a_ramp():
    job = rollout_job(scheduled_sampling_probability=0.3)
    assert [rollout_probability(job, step) for step in (0, 7, 10_000)] == [0.3, 0.3, 0.3]


def test_the_chance_ramps_from_start_to_end_after_the_start_step():
    job = rollout_job(
        scheduled_sampling_prob_start=0.1,
        scheduled_sampling_prob_end=0.5,
        scheduled_sampling_ramp_steps=100,
        scheduled_sampling_start_step=20,
    )
    chances = [rollout_probability(job, step) for step in (0, 19, 20, 45, 70, 120, 5000)]
    assert chances == pytest.approx([0.1, 0.1, 0.1, 0.2, 0.3, 0.5, 0.5])
    cosine = job.model_copy(update={"scheduled_sampling_ramp_shape": "cosine"})
    quarter = 0.1 + 0.4 * (0.5 - 0.5 * math.cos(math.pi / 4))
    assert [rollout_probability(cosine, step) for step in (20, 45, 70, 120)] == pytest.approx(
        [0.1, quarter, 0.3, 0.5]
    )


def test_a_zero_prob_start_stands_for_the_probability_as_in_simpletuner():
    # SimpleTuner reads prob_start/prob_end as `value or probability`: its Dreambooth example
    # (probability 1.0, ramp_steps 1000, default prob_start 0.0 and prob_end 0.5) ramps from 1.0 to 0.5.
    job = rollout_job(scheduled_sampling_ramp_steps=1000)
    assert [rollout_probability(job, step) for step in (0, 500, 1000)] == pytest.approx([1.0, 0.75, 0.5])


@pytest.mark.parametrize(
    ("strategy", "low", "high"),
    [("uniform", 2.5, 3.5), ("biased_early", 1.5, 2.5), ("biased_late", 3.5, 4.5)],
)
def test_offsets_stay_within_the_maximum_and_lean_as_the_strategy_says(strategy, low, high):
    job = rollout_job(scheduled_sampling_strategy=strategy)
    offsets = draw_offsets(job, 1.0, 4000, torch.Generator().manual_seed(0))
    assert int(offsets.min()) == 0 and int(offsets.max()) == 6
    assert low < float(offsets.float().mean()) < high
    half = draw_offsets(job, 0.5, 4000, torch.Generator().manual_seed(0))
    assert 0.4 < float((half == 0).float().mean()) < 0.7  # half not chosen, plus the chosen zeros


def test_a_rollout_never_starts_past_the_last_timestep():
    offsets = torch.tensor([5, 5, 5, 0])
    sigmas = torch.tensor([0.5, 0.9985, 0.9995, 0.2])
    assert rollout_steps(offsets, sigmas).tolist() == [5, 1, 0, 0]


def test_reflexflow_is_on_with_scheduled_sampling_unless_turned_off():
    # SimpleTuner's _maybe_enable_reflexflow_default, for flow-matching models such as AuraFlow.
    assert make_job(scheduled_sampling_max_step_offset=4).reflexflow
    assert not rollout_job().reflexflow  # scheduled_sampling_reflexflow: false
    assert make_job(scheduled_sampling_reflexflow=True).reflexflow  # on even without scheduled sampling
    assert not make_job().reflexflow


def test_simpletuner_keys_load(tiny_job: Path):
    sets = [f"{key}={str(value).lower()}" for key, value in ROLLOUT.items()]
    config = load_config(
        tiny_job, [*sets, "scheduled_sampling_sampler=euler", "scheduled_sampling_reflexflow_beta1=5"]
    )
    assert config.job.scheduled_sampling_max_step_offset == 6
    assert config.job.scheduled_sampling_sampler == "euler"
    assert config.job.scheduled_sampling_reflexflow_beta1 == 5
    assert not any("scheduled_sampling" in w for w in config.warnings)


def test_an_offset_with_no_chance_of_a_rollout_is_warned_about(tiny_job: Path):
    config = load_config(tiny_job, ["scheduled_sampling_max_step_offset=4"])
    assert not config.job.rolls_out and config.job.reflexflow
    (warning,) = [w for w in config.warnings if "scheduled_sampling" in w]
    assert "nothing rolls out; ReflexFlow's anti-drift term still applies" in warning
    ramped = ["scheduled_sampling_max_step_offset=4", "scheduled_sampling_ramp_steps=10"]
    assert load_config(tiny_job, ramped).job.rolls_out  # the ramp's prob_end defaults to 0.5


@pytest.mark.parametrize("stage", [2, 3])
def test_full_rank_rolls_out_with_zero_2_only(stage):
    # ZeRO-3 gathers the weights across GPUs in every forward pass; each GPU rolls out a different number.
    job = rollout_job(model_type="full", deepspeed_config="ds.json", grad_clip_method="norm")
    problems = deepspeed_problems({"zero_optimization": {"stage": stage}}, job)
    if stage == 2:
        assert problems == []
    else:
        assert len(problems) == 1
        assert problems[0].startswith("zero_optimization.stage: 3 cannot train with scheduled sampling")


def trained_adapter(settings: dict, steps: int = 3) -> dict[str, torch.Tensor]:
    trainer = make_trainer(make_job(gradient_accumulation_steps=2, **settings), FakeData())
    assert trainer.train(TrainState(), steps)
    return trainer.network.state_dict()


@pytest.mark.parametrize(
    "settings",
    [
        {**ROLLOUT, "scheduled_sampling_probability": 0.0},
        {**ROLLOUT, "scheduled_sampling_max_step_offset": 0},
        {
            **ROLLOUT,
            "scheduled_sampling_probability": 0.0,
            "scheduled_sampling_ramp_steps": 10,
            "scheduled_sampling_start_step": 50,
        },
    ],
    ids=["probability-0", "offset-0", "ramp-not-started"],
)
def test_a_run_that_rolls_nothing_out_is_bit_identical_to_one_without_the_keys(settings):
    plain = trained_adapter({})
    for (name, a), b in zip(plain.items(), trained_adapter(settings).values(), strict=True):
        assert torch.equal(a, b), name


def forward_calls(trainer: LoKrTrainer, batch, step: int = 0) -> tuple[torch.Tensor, list[dict]]:
    """The micro-batch's loss, and each transformer call: its input, σ and whether it could build a graph."""
    calls: list[dict] = []

    def record(module, args, kwargs):
        calls.append(
            {
                "input": kwargs["hidden_states"].detach().clone(),
                "sigmas": kwargs["timestep"].clone(),
                "grad": torch.is_grad_enabled(),
                "input_grad_fn": kwargs["hidden_states"].grad_fn,
            }
        )

    handle = trainer.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        loss = trainer.micro_batch_loss(batch, step_generator(trainer.job.seed, step, 0), step)
    finally:
        handle.remove()
    return loss, calls


def test_with_probability_1_the_input_is_the_models_rollout_made_without_a_graph():
    batch = make_batch(8, size=3)
    _, plain = forward_calls(make_trainer(make_job(), FakeData()), batch)
    trainer = make_trainer(rollout_job(scheduled_sampling_strategy="biased_late"), FakeData())
    loss, calls = forward_calls(trainer, batch)

    *rollout, final = calls
    assert len(plain) == 1 and 1 <= len(rollout) <= 6
    assert not any(call["grad"] for call in rollout) and final["grad"]
    assert final["input_grad_fn"] is None, "the rolled-out input is data, not part of the loss's graph"
    assert torch.equal(final["sigmas"], plain[0]["sigmas"]), "trained at the σ it drew"
    assert not torch.equal(final["input"], plain[0]["input"])
    # Each rollout call is a few thousandths of σ above a sample's own σ, on its way down to it.
    drawn = plain[0]["sigmas"].tolist()
    seen = [float(sigma) for call in rollout for sigma in call["sigmas"]]
    assert all(any(0 < sigma - own <= 0.006 + 1e-6 for own in drawn) for sigma in seen), (seen, drawn)

    # The gradients are those of the final prediction alone, on that input as plain data.
    loss.backward()
    rolled_grads = [p.grad.clone() for p in trainer.parameters]
    trainer.objects.optimizer.zero_grad(set_to_none=True)
    draws = draw_step(step_generator(trainer.job.seed, 0, 0), batch.latents.shape, shift=3.0)
    prediction = trainer.predict(final["input"], batch.prompt_embeds, batch.prompt_mask, draws.sigmas)
    target = flow_target(batch.latents, draws.noise)
    direct = training_loss(
        prediction, target, draws.sigmas, loss_type="l2", huber_c=0.1, huber_schedule="snr"
    )
    assert torch.equal(direct, loss.detach())
    direct.backward()
    for rolled, manual in zip(rolled_grads, [p.grad for p in trainer.parameters], strict=True):
        assert torch.equal(rolled, manual)


def test_the_same_step_gives_the_same_loss_and_another_step_another_rollout():
    trainer = make_trainer(rollout_job(), FakeData())
    batch = make_batch(9, size=4)
    first, calls = forward_calls(trainer, batch, step=5)
    again, calls_again = forward_calls(trainer, batch, step=5)
    assert torch.equal(first, again)
    assert len(calls) == len(calls_again) and torch.equal(calls[-1]["input"], calls_again[-1]["input"])
    _, other = forward_calls(trainer, batch, step=6)
    assert not torch.equal(other[-1]["input"], calls[-1]["input"])


def test_the_reflexflow_loss_is_the_one_computed_by_hand():
    """Unset, scheduled_sampling_reflexflow is on: the exposure weighting, β2 and the anti-drift term."""
    alpha, beta1, beta2 = 0.7, 3.0, 0.9
    job = rollout_job(
        scheduled_sampling_reflexflow=None,
        scheduled_sampling_reflexflow_alpha=alpha,
        scheduled_sampling_reflexflow_beta1=beta1,
        scheduled_sampling_reflexflow_beta2=beta2,
    )
    trainer = make_trainer(job, FakeData())
    batch = make_batch(8, size=3)
    loss, calls = forward_calls(trainer, batch)
    *_, clean_call, biased_call, final = calls
    assert not clean_call["grad"] and not biased_call["grad"] and final["grad"]

    draws = draw_step(step_generator(job.seed, 0, 0), batch.latents.shape, shift=3.0)
    noisy = noisy_latents(batch.latents, draws.noise, draws.sigmas)
    rolled = (final["input"] != noisy).flatten(1).any(dim=1)
    assert bool(rolled.any())
    embeds, mask = batch.prompt_embeds, batch.prompt_mask
    with torch.no_grad():
        clean = trainer.predict(noisy[rolled], embeds[rolled], mask[rolled], draws.sigmas[rolled]).float()
        biased = trainer.predict(
            final["input"][rolled], embeds[rolled], mask[rolled], draws.sigmas[rolled]
        ).float()
        prediction = trainer.predict(final["input"], embeds, mask, draws.sigmas).float()
    exposure = torch.zeros_like(noisy)
    exposure[rolled] = clean - biased
    weight = 1 + alpha * exposure / exposure.abs().sum(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    squared = (prediction - flow_target(batch.latents, draws.noise)) ** 2 * weight * beta2
    drift = (final["input"] - batch.latents).flatten(1)
    direction = prediction.flatten(1) / prediction.flatten(1).norm(dim=1, keepdim=True)
    misdirection = (direction - drift / drift.norm(dim=1, keepdim=True)).pow(2).sum(dim=1)
    by_hand = (squared.mean(dim=(1, 2, 3)) + beta1 * misdirection).mean()
    assert float(loss.detach()) == pytest.approx(float(by_hand), rel=1e-5)

    plain = make_trainer(rollout_job(), FakeData())
    assert float(forward_calls(plain, batch)[0].detach()) != pytest.approx(float(loss.detach()), rel=1e-3)


def test_reflexflow_on_its_own_adds_the_anti_drift_term_to_every_step():
    batch = make_batch(8, size=3)
    plain, calls = forward_calls(make_trainer(make_job(), FakeData()), batch)
    with_it, calls_with = forward_calls(
        make_trainer(make_job(scheduled_sampling_reflexflow=True), FakeData()), batch
    )
    assert len(calls) == len(calls_with) == 1  # no rollout, no extra forward
    assert float(with_it.detach()) > float(plain.detach())


def test_regularisation_targets_the_base_prediction_at_the_rolled_out_input():
    # The adapter starts as the identity: base and trained model agree wherever both are asked.
    trainer = make_trainer(rollout_job(), FakeData(fixed=make_batch(3, regularisation=True)))
    assert trainer.step(TrainState()).loss == 0.0


def test_resume_in_process_with_scheduled_sampling_is_bit_identical(tmp_path):
    job = rollout_job(
        scheduled_sampling_ramp_steps=4,
        scheduled_sampling_prob_start=0.25,
        gradient_accumulation_steps=2,
        checkpoint_step_interval=3,
    )
    straight = make_trainer(job, FakeData(), tmp_path / "a")
    assert straight.train(TrainState(), 6)
    first = make_trainer(job, FakeData(), tmp_path / "b")
    first.should_stop = iter([False] * 3 + [True]).__next__
    assert not first.train(TrainState(), 6)
    second = make_trainer(job, FakeData(), tmp_path / "b")
    assert second.checkpointer is not None
    checkpoint = second.checkpointer.checkpoint
    assert second.train(checkpoint.load(latest_complete(tmp_path / "b")), 6)
    for (name, a), b in zip(
        straight.network.state_dict().items(), second.network.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_the_cli_trains_with_scheduled_sampling_and_resumes_bit_identical(tmp_path: Path):
    lokr_job("tiny", str(tmp_path / "job"))
    config = str(tmp_path / "job" / "config" / "config.json")
    rollout = [
        "scheduled_sampling_max_step_offset=4",
        "scheduled_sampling_probability=1.0",
        "scheduled_sampling_ramp_steps=8",
        "scheduled_sampling_prob_start=0.25",
    ]
    sets = [arg for setting in [*rollout, "max_train_steps=16"] for arg in ("--set", setting)]
    lokr_job("run", "--config", config, "--workdir", str(tmp_path / "A"), *sets)
    # B stops at its step-8 checkpoint, then a second process resumes it to 16.
    lokr_job("run", "--config", config, "--workdir", str(tmp_path / "B"), *sets, "--set", "max_train_steps=8")
    resumed = lokr_job("run", "--config", config, "--workdir", str(tmp_path / "B"), *sets)
    assert "resumed from" in resumed.stderr and "checkpoint-00000008 (step 8" in resumed.stderr
    # Without scheduled sampling the same 16 steps train another adapter.
    lokr_job("run", "--config", config, "--workdir", str(tmp_path / "C"), "--set", "max_train_steps=16")

    adapter = {run: (tmp_path / run / "output" / ADAPTER_FILE).read_bytes() for run in "ABC"}
    assert adapter["A"] == adapter["B"]
    assert adapter["A"] != adapter["C"]
