"""SimpleTuner's AuraFlow defaults, each tested against the value SimpleTuner uses (its source is named in
each test): the dtype the transformer is loaded in, the flow schedule shift and its auto-shift recipe, and
the prompt length ``lokr-job infer`` pads to without a config."""

import argparse
import shlex
from pathlib import Path

import pytest
import torch
from PIL import Image

from job.check.estimate import GIB, transformer_config, vram_estimate
from job.config.flavours import flavour_of, token_limit
from job.config.loader import load_config
from job.config.schema import JobConfig
from job.context import JobContext
from job.errors import ConfigError, ExitCode
from job.flow_matching import auto_shift, image_seq_len, schedule_shift
from job.infer import add_infer_arguments, infer, run_infer
from job.model.transformer import load_dtype, load_transformer, prepare_base_model
from job.workdir import WorkDir

PROMPT = "a red circle on blue"
FAST = {"steps": 2, "width": 64, "height": 64, "seed": 3}


def _shift_at(job: JobConfig, latent_side: int) -> float | None:
    """The shift training applies to a batch of square latents (the tiny model's patch is 2)."""
    return schedule_shift(
        job.flow_schedule_shift, job.flow_schedule_auto_shift, (latent_side, latent_side), 2
    )


@pytest.mark.parametrize(("mixed", "expected"), [("bf16", torch.bfloat16), ("no", torch.float32)])
def test_no_change_keeps_the_weights_in_simpletuners_weight_dtype_and_check_counts_them(
    tiny_job: Path, mixed: str, expected: torch.dtype
) -> None:
    """SimpleTuner: simpletuner/helpers/configuration/cmd_args.py ``parse_cmdline_args`` sets weight_dtype
    to bf16 under mixed_precision bf16 and fp32 under no; ``ModelFoundation.load_model``
    (simpletuner/helpers/models/common.py) loads the transformer with it as torch_dtype and moves it so."""
    cfg = load_config(tiny_job, [f"mixed_precision={mixed}"])
    model = Path(cfg.job.model_source)
    loaded = load_transformer(model, dtype=load_dtype(cfg.job))
    assert loaded.dtype == expected
    transformer = prepare_base_model(loaded, cfg.job, torch.device("cpu"))
    assert {p.dtype for p in transformer.parameters()} == {expected}

    config, source = transformer_config(model)
    estimate = vram_estimate(cfg, config, source, (64, 64))
    assert estimate.weights_bytes == sum(p.numel() * p.element_size() for p in transformer.parameters())


def test_the_real_model_loads_in_bf16_by_default_and_check_says_so(tiny_job: Path) -> None:
    """SimpleTuner's defaults: mixed_precision bf16 and base_model_precision no_change
    (simpletuner/simpletuner_sdk/server/services/field_registry/sections/advanced.py and model.py), so
    weight_dtype is bf16 (simpletuner/helpers/configuration/cmd_args.py ``parse_cmdline_args``): 6.8B
    weights take 12.8 GiB, not fp32's 25.6."""
    cfg = load_config(tiny_job, ["mixed_precision=bf16"])
    assert cfg.job.base_model_precision == "no_change"
    assert load_dtype(cfg.job) == torch.bfloat16
    config, source = transformer_config(None)
    weights = vram_estimate(cfg, config, source, (1024, 1024)).weights_bytes
    assert 12 * GIB < weights < 14 * GIB


def test_flow_schedule_shift_defaults_to_simpletuners_3() -> None:
    """SimpleTuner: simpletuner/simpletuner_sdk/server/services/field_registry/sections/advanced.py, field
    flow_schedule_shift, default_value 3.0; AuraFlow sets none of its own
    (simpletuner/helpers/models/auraflow/model.py), and simpletuner/helpers/training/custom_schedule.py
    ``apply_flow_schedule_shift`` applies it to every batch."""
    job = JobConfig(data_backend_config="x.json", lycoris_config="l.json", max_train_steps=1)
    assert job.flow_schedule_shift == 3.0
    assert not job.flow_schedule_auto_shift
    assert _shift_at(job, 128) == 3.0


def test_simpletuners_auto_shift_recipe_is_accepted(tiny_job: Path) -> None:
    """SimpleTuner's examples write flow_schedule_shift 0 with flow_schedule_auto_shift true
    (simpletuner/examples/cosmos3-image.lycoris-lokr/config.json); simpletuner/helpers/training/
    custom_schedule.py ``apply_flow_schedule_shift`` then picks the shift from the image's token count."""
    cfg = load_config(tiny_job, ["flow_schedule_shift=0", "flow_schedule_auto_shift=true"])
    assert not any("flow_schedule" in warning for warning in cfg.warnings)
    assert _shift_at(cfg.job, 8) == pytest.approx(auto_shift(image_seq_len(8, 8, 2)))


def test_a_fixed_shift_beside_auto_shift_gives_way_with_a_warning(tiny_job: Path) -> None:
    """SimpleTuner: simpletuner/helpers/training/default_settings/safety_check.py ``safety_check`` sets
    flow_schedule_shift to 0 when flow_schedule_auto_shift is on, silently; lokr-job says so."""
    cfg = load_config(tiny_job, ["flow_schedule_shift=2.5", "flow_schedule_auto_shift=true"])
    (warning,) = [w for w in cfg.warnings if "flow_schedule_shift" in w]
    assert "config.json: flow_schedule_shift: 2.5 is not used because flow_schedule_auto_shift" in warning
    assert _shift_at(cfg.job, 8) == pytest.approx(auto_shift(image_seq_len(8, 8, 2)))


def test_shift_zero_without_auto_shift_trains_on_unshifted_sigmas(tiny_job: Path) -> None:
    """SimpleTuner: simpletuner/helpers/training/custom_schedule.py ``apply_flow_schedule_shift`` shifts
    only by a value above 0 or by auto-shift; otherwise σ is left as drawn."""
    cfg = load_config(tiny_job, ["flow_schedule_shift=0"])
    assert _shift_at(cfg.job, 8) is None


def test_a_negative_shift_is_refused_naming_the_file_and_key(tiny_job: Path) -> None:
    """SimpleTuner's field registry (simpletuner/simpletuner_sdk/server/services/field_registry/sections/
    advanced.py, flow_schedule_shift) allows 0 and up: "Must be non-negative"."""
    with pytest.raises(ConfigError) as caught:
        load_config(tiny_job, ["flow_schedule_shift=-1", "flow_schedule_auto_shift=true"])
    assert caught.value.exit_code == ExitCode.BAD_CONFIG
    assert f"{tiny_job}: flow_schedule_shift: must be 0 or more" in caught.value.message


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_infer_arguments(parser)
    return parser


def _bytes(path: Path) -> bytes:
    return Image.open(path).tobytes()


def test_infer_without_a_config_pads_prompts_to_the_training_length(tiny_job: Path, tmp_path: Path) -> None:
    """SimpleTuner: simpletuner/helpers/models/auraflow/model.py ``Auraflow.check_user_config`` sets
    tokenizer_max_length to 120 for AuraFlow, 768 for the pony flavour, when it is unset; the
    AuraFlowPipeline's own default (256) is what infer used before."""
    model = Path(load_config(tiny_job).job.model_source)
    common = (
        f"--base-model {model} --transformer {model} --prompt '{PROMPT}' --steps 2 --width 64 --height 64"
    )
    renders = {}
    for name, extra in {"default": "", "pony": "--model-flavour pony"}.items():
        argv = shlex.split(f"{common} --seed 3 {extra} --out {tmp_path / name}")
        (renders[name],) = run_infer(_parser().parse_args(argv), None)
    at = {
        length: infer(model, None, [PROMPT], tmp_path / str(length), max_sequence_length=length, **FAST)[0]
        for length in (120, 256, 768)
    }
    assert _bytes(renders["default"]) == _bytes(at[120])
    assert _bytes(renders["pony"]) == _bytes(at[768])
    # The padded length shows in the image, so the equalities above are not vacuous.
    assert _bytes(at[120]) != _bytes(at[256])
    # pony's Hub repo as --base-model is recognised without --model-flavour.
    assert token_limit(flavour_of("purplesmartai/pony-v7-base")) == 768
    assert token_limit(flavour_of(str(model))) == 120


def test_infer_model_flavour_with_a_config_is_refused(tiny_job: Path, tmp_path: Path) -> None:
    ctx = JobContext(config=load_config(tiny_job), workdir=WorkDir(tmp_path / "work"))
    argv = ["--model-flavour", "pony", "--prompt", PROMPT]
    with pytest.raises(ConfigError, match="--model-flavour is for infer without --config"):
        run_infer(_parser().parse_args(argv), ctx)
