"""LoKr on the tiny transformer: the seed's preset, a float multiplier, pass-through keys, the file format."""

import json

import pytest
import torch
from lokr_fixtures import SEED_LYCORIS
from safetensors import safe_open

from job.config.schema import LycorisConfig
from job.errors import ConfigError
from job.model.lokr import METADATA_KEY, attach_lokr, merge_lokr, save_adapter
from job.model.tiny import build_transformer
from job.tiny import LYCORIS_CONFIG_TEXT

pytestmark = pytest.mark.usefixtures("fresh_lycoris_preset")


def _inputs() -> dict[str, object]:
    return {
        "hidden_states": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)),
        "encoder_hidden_states": torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(1)),
        "timestep": torch.tensor([0.5]),
        "return_dict": False,
    }


def _transformer() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_transformer().requires_grad_(False)


def test_seed_preset_wraps_every_attention_projection():
    network = attach_lokr(_transformer(), SEED_LYCORIS, seed=1)
    names = [lora.lora_name for lora in network.loras]
    # 1 joint block (q, k, v, out, add_q, add_k, add_v, add_out) + 2 single blocks (q, k, v, out).
    assert len(names) == 16
    assert all("attn" in name for name in names)
    assert "lycoris_joint_transformer_blocks_0_attn_to_q" in names
    # factor 8 on 64-wide layers, linear_dim 10000: full-matrix w1 (8x8) and w2 (8x8).
    assert sum(p.numel() for p in network.parameters()) == 16 * 128


def test_initial_weights_are_a_function_of_the_seed():
    a = attach_lokr(_transformer(), SEED_LYCORIS, seed=1).state_dict()
    b = attach_lokr(_transformer(), SEED_LYCORIS, seed=1).state_dict()
    c = attach_lokr(_transformer(), SEED_LYCORIS, seed=2).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_the_preset_does_not_leak_into_the_next_network():
    from lycoris import LycorisNetwork

    attach_lokr(_transformer(), SEED_LYCORIS, seed=1)
    assert LycorisNetwork.TARGET_REPLACE_MODULE == ["Attention"]
    plain = LycorisConfig.model_validate({"algo": "lokr", "linear_dim": 4, "factor": 4})
    network = attach_lokr(_transformer(), plain, seed=1)
    # No preset: LyCORIS's defaults (every Linear, norms included) apply, not the previous run's.
    assert len(network.loras) > 16
    assert "Linear" in LycorisNetwork.TARGET_REPLACE_MODULE


def test_multiplier_stays_a_float_and_extra_keys_pass_through():
    config = SEED_LYCORIS.model_copy(update={"multiplier": 0.5})
    config = LycorisConfig.model_validate({**config.model_dump(exclude_unset=True), "rank_dropout": 0.25})
    network = attach_lokr(_transformer(), config, seed=1)
    assert network.multiplier == 0.5
    assert all(lora.multiplier == 0.5 for lora in network.loras)
    assert all(lora.rank_dropout == 0.25 for lora in network.loras)


def test_a_preset_that_matches_nothing_is_a_config_error():
    config = LycorisConfig.model_validate({"apply_preset": {"target_module": ["NoSuchBlock"]}})
    with pytest.raises(ConfigError, match="matched no module"):
        attach_lokr(_transformer(), config, seed=1)


def test_adapter_file_format_metadata_and_determinism(tmp_path):
    network = attach_lokr(_transformer(), SEED_LYCORIS, seed=1)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(0.01)
    save_adapter(network, tmp_path / "a.safetensors", SEED_LYCORIS)
    save_adapter(network, tmp_path / "b.safetensors", SEED_LYCORIS)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    with safe_open(tmp_path / "a.safetensors", "pt") as handle:
        metadata = handle.metadata()
        keys = set(handle.keys())
    assert set(metadata) == {METADATA_KEY}
    settings = json.loads(metadata[METADATA_KEY])
    assert settings["apply_preset"]["module_algo_map"] == {"Attention": {"factor": 8}}
    assert settings["multiplier"] == 1.0 and settings["factor"] == 16
    assert "lycoris_joint_transformer_blocks_0_attn_to_q.lokr_w1" in keys
    assert "lycoris_joint_transformer_blocks_0_attn_to_q.alpha" in keys


def test_adapter_reloads_with_create_lycoris_from_weights(tmp_path):
    from lycoris import create_lycoris_from_weights

    transformer = _transformer()
    network = attach_lokr(transformer, SEED_LYCORIS, seed=1)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(0.05)
    save_adapter(network, tmp_path / "adapter.safetensors", SEED_LYCORIS)
    inputs = _inputs()
    with torch.no_grad():
        trained = transformer(**inputs)[0]
        fresh = _transformer()
        base = fresh(**inputs)[0]
        reloaded, _ = create_lycoris_from_weights(1.0, str(tmp_path / "adapter.safetensors"), fresh)
        reloaded.merge_to()
        merged = fresh(**inputs)[0]
    assert len(reloaded.loras) == 16
    assert not torch.allclose(base, trained)
    assert torch.allclose(merged, trained, atol=1e-5)


def test_the_tiny_jobs_lycoris_file_parses_to_the_seed_config():
    import json5

    assert LycorisConfig.model_validate(json5.loads(LYCORIS_CONFIG_TEXT)) == SEED_LYCORIS


def test_seed_preset_on_the_full_size_auraflow():
    from diffusers import AuraFlowTransformer2DModel

    # AuraFlow v0.3's architecture (DESIGN §4), on the meta device: no weights, only the module tree.
    with torch.device("meta"):
        transformer = AuraFlowTransformer2DModel(
            attention_head_dim=256,
            num_attention_heads=12,
            num_mmdit_layers=4,
            num_single_dit_layers=32,
            joint_attention_dim=2048,
            caption_projection_dim=3072,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            sample_size=64,
            pos_embed_max_size=9216,
        )
    network = attach_lokr(transformer.requires_grad_(False), SEED_LYCORIS, seed=0)
    assert len(network.loras) == 160
    assert sum(p.numel() for p in network.parameters()) == 23_603_200


def test_a_merge_adds_what_the_training_forward_adds_whatever_the_rank_scale(tmp_path):
    """alpha 2 over rank 4: the forward scales the Kronecker product by 0.5; LyCORIS's merge_to scales it
    by 0.25 (twice), merge_lokr by 0.5, as trained."""
    from lycoris import create_lycoris_from_weights

    low_rank = LycorisConfig.model_validate({"algo": "lokr", "linear_dim": 4, "linear_alpha": 2, "factor": 4})
    transformer = _transformer()
    network = attach_lokr(transformer, low_rank, seed=0)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
    assert {module.scale for module in network.loras} == {0.5}
    save_adapter(network, tmp_path / "adapter.safetensors", low_rank)
    inputs = _inputs()
    network.set_multiplier(0.75)
    with torch.no_grad():
        trained = transformer(**inputs)[0]
        ours, theirs = _transformer(), _transformer()
        merged, _ = create_lycoris_from_weights(0.75, str(tmp_path / "adapter.safetensors"), ours)
        merge_lokr(merged, 0.75)
        lycoris_merged, _ = create_lycoris_from_weights(0.75, str(tmp_path / "adapter.safetensors"), theirs)
        lycoris_merged.merge_to(0.75)
        assert torch.allclose(ours(**inputs)[0], trained, atol=1e-5)
        assert not torch.allclose(theirs(**inputs)[0], trained, atol=1e-3)
