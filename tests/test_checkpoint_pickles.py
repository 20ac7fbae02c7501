"""A checkpoint whose pickles could run code is refused before anything in it is unpickled: the run URI is
shared storage, and DeepSpeed unpickles its ZeRO files with ``weights_only=False``."""

import pickle
from pathlib import Path

import pytest
import torch

from job.errors import DataError, ExitCode
from job.train.pickles import refuse_pickled_code


def test_a_torch_archive_naming_code_is_refused_and_never_run(tmp_path: Path, pickle_payload) -> None:
    folder = tmp_path / "checkpoint-00000008"
    (folder / "pytorch_model").mkdir(parents=True)
    torch.save({"state": {}, "param_groups": []}, folder / "optimizer.pt")
    torch.save({"fp32": torch.ones(2), "hook": pickle_payload}, folder / "pytorch_model" / "optim_states.pt")
    with pytest.raises(DataError) as caught:
        refuse_pickled_code(folder)
    assert caught.value.exit_code == ExitCode.BAD_DATA
    message = caught.value.message
    assert "pytorch_model/optim_states.pt names posix.system" in message
    assert "optimizer.pt " not in message  # the clean file is not named
    assert not pickle_payload.proof.exists()


def test_a_bare_pickle_is_refused_whatever_its_name(tmp_path: Path, pickle_payload) -> None:
    (tmp_path / "random_states_0.pkl").write_bytes(pickle.dumps(pickle_payload))
    with pytest.raises(DataError, match=r"random_states_0\.pkl is a bare pickle"):
        refuse_pickled_code(tmp_path)
    assert not pickle_payload.proof.exists()


def test_what_lokr_job_writes_passes(tmp_path: Path) -> None:
    generator_states = {"torch": torch.get_rng_state(), "python": [3, list(range(5)), None]}
    torch.save({"ranks": [generator_states, generator_states]}, tmp_path / "rng.pt")
    torch.save(
        torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1).state_dict(), tmp_path / "optimizer.pt"
    )
    (tmp_path / "trainer_state.json").write_text("{}")
    # A safetensors header whose length starts with the pickle protocol byte is not a pickle.
    (tmp_path / "lokr.safetensors").write_bytes(b"\x80\x02" + b"\x00" * 30)
    refuse_pickled_code(tmp_path)
