"""The training loop on the tiny transformer, with batches built in the test (no caches needed)."""

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from lokr_fixtures import SEED_LYCORIS

from job.cache.dataset import Batch
from job.config.schema import JobConfig, LycorisConfig
from job.errors import ConfigError
from job.flow_matching import draw_step, flow_loss, flow_target, noisy_latents, step_generator
from job.model.lokr import attach_lokr
from job.model.tiny import TEXT_DIM, build_transformer
from job.model.transformer import load_dtype, prepare_base_model
from job.train.checkpoint import latest_complete, list_checkpoints
from job.train.checkpointer import Checkpointer
from job.train.ema import AdapterEMA
from job.train.lokr import LoKrObjects, LoKrState, LoKrTrainer
from job.train.optimizers import adapter_dtype, build_optimizer
from job.train.schedule import build_lr_scheduler, total_steps
from job.train.state import TrainingCheckpoint, TrainState

pytestmark = pytest.mark.usefixtures("fresh_lycoris_preset", "one_torch_thread")

# In the random tiny model attention barely reaches the output (the FF dominates), so tests that watch the
# loss fall also wrap the feed-forward layers.
LYCORIS_WITH_FF = LycorisConfig.model_validate(
    {
        **SEED_LYCORIS.model_dump(exclude_unset=True),
        "apply_preset": {
            "target_module": ["Attention", "AuraFlowFeedForward"],
            "module_algo_map": {"Attention": {"factor": 8}, "AuraFlowFeedForward": {"factor": 8}},
        },
    }
)
TOKENS = 12


def make_batch(seed: int, size: int = 2, *, regularisation: bool = False, dropout: float = 0.0) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(size, TOKENS, dtype=torch.long)
    mask[:, TOKENS // 2 :] = 0
    return Batch(
        latents=torch.randn(size, 4, 8, 8, generator=generator),
        prompt_embeds=torch.randn(size, TOKENS, TEXT_DIM, generator=generator),
        prompt_mask=mask,
        is_regularisation=torch.full((size,), regularisation),
        caption_dropout=torch.full((size,), dropout),
        keys=[f"sample-{seed}-{i}" for i in range(size)],
    )


@dataclass
class FakeData:
    """``TrainingData``'s interface: batch (epoch, index) is the same every time it is asked for."""

    batches_per_epoch: int = 3
    fixed: Batch | None = None
    requests: list[tuple[int, int]] = field(default_factory=list)

    def batch(self, epoch: int, index: int) -> Batch:
        self.requests.append((epoch, index))
        return self.fixed or make_batch(1000 * epoch + index)

    def null_embedding(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.full((TOKENS, TEXT_DIM), 0.5), torch.ones(TOKENS, dtype=torch.long)


def make_job(**settings) -> JobConfig:
    defaults = {
        "data_backend_config": "x.json",
        "lycoris_config": "l.json",
        "max_train_steps": 12,
        "learning_rate": 1e-2,
        "optimizer": "adamw",
        "mixed_precision": "no",
        "base_model_precision": "no_change",
        "seed": 7,
        "checkpoint_step_interval": 1000,
    }
    return JobConfig(**{**defaults, **settings})


def make_trainer(
    job: JobConfig, data: FakeData, checkpoints: Path | None = None, lycoris: LycorisConfig = SEED_LYCORIS
) -> LoKrTrainer:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # accelerate keeps its state process-wide; each test picks its own mixed precision.
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(mixed_precision=job.mixed_precision, cpu=True)
    torch.manual_seed(0)
    transformer = prepare_base_model(build_transformer(), job, accelerator.device)
    network = attach_lokr(transformer, lycoris, seed=job.seed)
    network.to(dtype=adapter_dtype(job.optimizer))
    network.requires_grad_(True)
    optimizer = build_optimizer(job.optimizer, network.parameters(), job.learning_rate)
    objects = LoKrObjects(
        network=network,
        optimizer=optimizer,
        scheduler=build_lr_scheduler(job, optimizer, total_steps(job, data.batches_per_epoch)),
        ema=AdapterEMA(list(network.named_parameters()), job.ema_decay) if job.use_ema else None,
        lycoris=lycoris,
    )
    checkpointer = None
    if checkpoints is not None:
        checkpoint = TrainingCheckpoint(
            LoKrState(objects), objects.scheduler, accelerator, config_hash="test"
        )
        checkpointer = Checkpointer(checkpoints, checkpoint, total_limit=job.checkpoints_total_limit)
    return LoKrTrainer(
        accelerator=accelerator,
        transformer=transformer,
        objects=objects,
        data=data,
        job=job,
        input_dtype=load_dtype(job),
        checkpointer=checkpointer,
    )


def fixed_loss(trainer: LoKrTrainer, batch: Batch) -> float:
    """The loss at fixed σ and noise, so before/after compare the model, not the draws."""
    draws = draw_step(step_generator(123, 0, 0), batch.latents.shape, shift=None)
    with torch.no_grad():
        prediction = trainer.predict(
            noisy_latents(batch.latents, draws.noise, draws.sigmas),
            batch.prompt_embeds,
            batch.prompt_mask,
            draws.sigmas,
        )
    return float(flow_loss(prediction, flow_target(batch.latents, draws.noise)))


@pytest.mark.parametrize("precision", ["no_change", "bf16", "int8-quanto"])
@pytest.mark.parametrize("checkpointing_and_ema", [False, True], ids=["plain", "gc+ema"])
def test_loss_goes_down_on_a_fixed_batch(precision, checkpointing_and_ema):
    batch = make_batch(5)
    job = make_job(
        base_model_precision=precision,
        gradient_checkpointing=checkpointing_and_ema,
        use_ema=checkpointing_and_ema,
        ema_decay=0.9,
    )
    trainer = make_trainer(job, FakeData(fixed=batch), lycoris=LYCORIS_WITH_FF)
    before = fixed_loss(trainer, batch)
    state = TrainState()
    assert trainer.train(state, 12)
    after = fixed_loss(trainer, batch)
    assert after < before - 1e-3, (before, after)
    if checkpointing_and_ema:
        ema = trainer.objects.ema
        with ema.swapped_in():
            averaged = fixed_loss(trainer, batch)
        assert after < averaged < before
        assert fixed_loss(trainer, batch) == after


def test_bf16_mixed_precision_and_the_bf16_optimizer_train():
    batch = make_batch(5)
    job = make_job(mixed_precision="bf16", base_model_precision="bf16", optimizer="adamw_bf16")
    trainer = make_trainer(job, FakeData(fixed=batch), lycoris=LYCORIS_WITH_FF)
    assert {p.dtype for p in trainer.network.parameters()} == {torch.bfloat16}
    before = fixed_loss(trainer, batch)
    assert trainer.train(TrainState(), 6)
    assert fixed_loss(trainer, batch) < before


def test_the_transformer_gets_sigma_not_sigma_times_1000():
    job = make_job()
    trainer = make_trainer(job, FakeData())
    seen = []
    handle = trainer.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["timestep"].clone()), with_kwargs=True
    )
    trainer.step(TrainState())
    handle.remove()
    # σ shifted by SimpleTuner's default flow_schedule_shift (3), never multiplied by 1000.
    expected = draw_step(step_generator(job.seed, 0, 0), torch.Size([2, 4, 8, 8]), shift=3.0).sigmas
    assert torch.equal(seen[0], expected)
    assert bool((seen[0] > 0).all()) and bool((seen[0] < 1).all())


def test_regularisation_targets_the_base_models_prediction():
    # The adapter starts as the identity (w2 = 0), so on regularisation data the loss starts at exactly 0.
    trainer = make_trainer(make_job(), FakeData(fixed=make_batch(3, regularisation=True)))
    result = trainer.step(TrainState())
    assert result.loss == 0.0
    assert trainer.network.multiplier == 1.0
    assert all(lora.multiplier == 1.0 for lora in trainer.network.loras)


def test_caption_dropout_swaps_in_the_null_embedding_per_sample():
    trainer = make_trainer(make_job(), FakeData())
    batch = make_batch(4, size=3)
    batch.caption_dropout = torch.tensor([0.0, 1.0, 0.0])
    embeds, mask = trainer._captions(batch, torch.tensor([0.5, 0.5, 0.5]))
    assert torch.equal(embeds[0], batch.prompt_embeds[0]) and torch.equal(embeds[2], batch.prompt_embeds[2])
    assert torch.equal(embeds[1], torch.full((TOKENS, TEXT_DIM), 0.5))
    assert torch.equal(mask[1], torch.ones(TOKENS, dtype=torch.long))
    assert torch.equal(mask[0], batch.prompt_mask[0])


def test_gradient_accumulation_walks_the_data_in_order_across_epochs():
    data = FakeData(batches_per_epoch=3)
    trainer = make_trainer(make_job(gradient_accumulation_steps=2), data)
    state = TrainState()
    trainer.step(state)
    trainer.step(state)
    assert data.requests == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert (state.step, state.epoch, state.batch_index) == (2, 1, 1)


def test_gradient_clipping_by_value():
    trainer = make_trainer(make_job(max_grad_norm=1e-4, grad_clip_method="value"), FakeData())
    trainer.step(TrainState())  # .grad stays as clipped until the next step zeroes it
    grads = torch.cat([p.grad.flatten() for p in trainer.network.parameters()])
    assert float(grads.abs().max()) <= 1e-4


def test_should_stop_checkpoints_and_returns_false(tmp_path):
    trainer = make_trainer(make_job(), FakeData(), tmp_path)
    calls = iter([False, False, False, True])
    trainer.should_stop = lambda: next(calls)
    state = TrainState()
    assert not trainer.train(state, 12)
    assert state.step == 3
    assert latest_complete(tmp_path).name == "checkpoint-00000003"


def test_checkpoints_at_the_interval_and_the_end_with_rotation(tmp_path):
    job = make_job(checkpoint_step_interval=4, checkpoints_total_limit=2, max_train_steps=10)
    trainer = make_trainer(job, FakeData(), tmp_path)
    hooked = []
    trainer.checkpointer.on_complete.append(lambda path, step: hooked.append((path.name, step)))
    assert trainer.train(TrainState(), 10)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [8, 10]
    assert hooked == [("checkpoint-00000004", 4), ("checkpoint-00000008", 8), ("checkpoint-00000010", 10)]


@pytest.mark.parametrize("optimizer", ["adamw", "optimi-lion", "prodigy"])
def test_resume_in_process_is_bit_identical(tmp_path, optimizer):
    job = make_job(
        optimizer=optimizer,
        use_ema=True,
        lr_scheduler="cosine",
        lr_warmup_steps=2,
        gradient_accumulation_steps=2,
        checkpoint_step_interval=3,
        learning_rate=1.0 if optimizer == "prodigy" else 1e-2,
    )
    straight = make_trainer(job, FakeData(), tmp_path / "a")
    assert straight.train(TrainState(), 7)

    first = make_trainer(job, FakeData(), tmp_path / "b")
    first.should_stop = iter([False] * 5 + [True]).__next__
    assert not first.train(TrainState(), 7)
    second = make_trainer(job, FakeData(), tmp_path / "b")
    assert second.checkpointer is not None
    checkpoint = second.checkpointer.checkpoint
    state = checkpoint.load(latest_complete(tmp_path / "b"))
    assert (state.step, state.epoch, state.batch_index) == (5, 3, 1)
    assert second.train(state, 7)

    for (name, a), b in zip(
        straight.network.state_dict().items(), second.network.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert straight.objects.ema.state_dict().keys() == second.objects.ema.state_dict().keys()
    for key, value in straight.objects.ema.state_dict().items():
        assert torch.equal(value, second.objects.ema.state_dict()[key]), key
    assert straight.objects.scheduler.get_last_lr() == second.objects.scheduler.get_last_lr()


@pytest.mark.parametrize("name", ["adamw", "adamw_bf16", "optimi-lion", "optimi-adamw", "prodigy"])
def test_every_seed_optimizer_steps(name):
    parameter = torch.nn.Parameter(torch.ones(4, dtype=adapter_dtype(name)))
    optimizer = build_optimizer(name, [parameter], 0.1)
    parameter.grad = torch.ones_like(parameter)
    optimizer.step()
    assert not torch.equal(parameter.detach(), torch.ones_like(parameter))


def test_bnb_without_bitsandbytes_or_cuda_is_a_config_error():
    with pytest.raises(ConfigError, match="bnb-lion8bit-paged"):
        build_optimizer("bnb-lion8bit-paged", [torch.nn.Parameter(torch.ones(2))], 1e-4)


def test_steps_from_epochs_and_schedules():
    job = make_job(max_train_steps=0, num_train_epochs=3, gradient_accumulation_steps=2)
    assert total_steps(job, 5) == 8
    assert total_steps(make_job(max_train_steps=100, num_train_epochs=3), 5) == 100
    parameter = torch.nn.Parameter(torch.ones(1))
    for name, warmup, expected in [
        ("constant", 10, [1.0, 1.0]),
        ("constant_with_warmup", 10, [0.0, 0.1]),
        ("linear", 0, [1.0, 0.99]),
    ]:
        optimizer = torch.optim.SGD([parameter], lr=1.0)
        scheduler = build_lr_scheduler(make_job(lr_scheduler=name, lr_warmup_steps=warmup), optimizer, 100)
        lrs = [scheduler.get_last_lr()[0]]
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
        assert lrs == pytest.approx(expected), name
