"""The trained adapter's files: SimpleTuner's layout, deterministic bytes, the idempotency record."""

import json

import pytest
import torch
from lokr_fixtures import SEED_LYCORIS
from safetensors import safe_open
from safetensors.torch import load_file

from job.model.lokr import METADATA_KEY, attach_lokr
from job.model.tiny import build_transformer
from job.train.ema import AdapterEMA
from job.train.output import ADAPTER_FILE, CONFIG_FILE, EMA_FILE, RESULT_FILE, is_finished, write_output

pytestmark = pytest.mark.usefixtures("fresh_lycoris_preset")


@pytest.fixture
def trained():
    torch.manual_seed(0)
    network = attach_lokr(build_transformer().requires_grad_(False), SEED_LYCORIS, seed=3)
    ema = AdapterEMA(list(network.named_parameters()), decay=0.5)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(0.1)
    ema.update(step=2)
    return network, ema


def test_layout_metadata_and_lycoris_config(tmp_path, trained):
    network, ema = trained
    path = write_output(tmp_path, network, ema, SEED_LYCORIS, config_hash="abc", step=24)
    assert path == tmp_path / ADAPTER_FILE
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == sorted(
        [ADAPTER_FILE, CONFIG_FILE, EMA_FILE, RESULT_FILE]
    )
    with safe_open(path, "pt") as handle:
        assert json.loads(handle.metadata()[METADATA_KEY]) == json.loads((tmp_path / CONFIG_FILE).read_text())
    weights, averaged = load_file(path), load_file(tmp_path / EMA_FILE)
    key = "lycoris_joint_transformer_blocks_0_attn_to_q.lokr_w2"
    # Step 2's decay is min(0.5, 2/11) (SimpleTuner's warm-up): 9/11 of the way from w2 = 0 to trained.
    assert torch.allclose(averaged[key], 9 / 11 * weights[key])
    assert torch.equal(dict(network.named_parameters())[key].detach(), weights[key])
    record = json.loads((tmp_path / RESULT_FILE).read_text())
    assert record["config_hash"] == "abc" and record["step"] == 24
    assert set(record["files"]) == {ADAPTER_FILE, CONFIG_FILE, EMA_FILE}


def test_bytes_depend_only_on_weights_and_config(tmp_path, trained):
    network, ema = trained
    write_output(tmp_path / "a", network, ema, SEED_LYCORIS, config_hash="abc", step=24)
    write_output(tmp_path / "b", network, ema, SEED_LYCORIS, config_hash="abc", step=24)
    for name in (ADAPTER_FILE, CONFIG_FILE, EMA_FILE, RESULT_FILE):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_is_finished_needs_same_hash_same_step_and_intact_files(tmp_path, trained):
    network, _ = trained
    assert not is_finished(tmp_path, config_hash="abc", step=24)
    write_output(tmp_path, network, None, SEED_LYCORIS, config_hash="abc", step=24)
    assert not (tmp_path / EMA_FILE).exists()
    assert is_finished(tmp_path, config_hash="abc", step=24)
    assert not is_finished(tmp_path, config_hash="abd", step=24)
    assert not is_finished(tmp_path, config_hash="abc", step=32)
    with open(tmp_path / ADAPTER_FILE, "r+b") as handle:
        handle.truncate(100)
    assert not is_finished(tmp_path, config_hash="abc", step=24)
