"""Checkpoint state without pickle: round trips, DeepSpeed's own objects, and refusal of anything else."""
from __future__ import annotations

import json
import math
from collections import OrderedDict

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.train.safestate import FORMAT, FORMAT_KEY, STRUCTURE_KEY, load_state, save_state


def test_nested_state_round_trips_exactly(tmp_path):
    base = torch.arange(12, dtype=torch.float32)
    state = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 3)}, 1: {"step": torch.tensor(3.0)}},
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, 1], "foreach": None, "amsgrad": False}],
        "ordered": OrderedDict([("b", 1), ("a", 2)]),
        "bf16": torch.randn(5).to(torch.bfloat16),
        "ints": torch.tensor([1, -2], dtype=torch.int64),
        "mask": torch.tensor([True, False]),
        "view": base[2:5],  # shares storage with `base`: stored as its own copy
        "base": base,
        "again": base,
        "inf": math.inf, "nan": math.nan, "shape": torch.Size([2, 3]), "dtype": torch.float16, "set": {3, 1},
        "text": "ok", "none": None, "python_rng": (3, tuple(range(5)), None),
    }
    path = tmp_path / "s.safetensors"
    save_state(state, path)
    back = load_state(path)
    assert list(back["state"]) == [0, 1] and isinstance(back["ordered"], OrderedDict)
    assert list(back["ordered"]) == ["b", "a"]
    for key in ("bf16", "ints", "mask", "view", "base", "again"):
        assert back[key].dtype == state[key].dtype and torch.equal(back[key], state[key]), key
    assert torch.equal(back["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    assert back["state"][0]["step"].shape == () and back["state"][0]["step"].item() == 3.0
    assert back["param_groups"][0]["betas"] == (0.9, 0.999) and back["param_groups"][0]["foreach"] is None
    assert back["inf"] == math.inf and math.isnan(back["nan"])
    assert back["shape"] == torch.Size([2, 3]) and back["dtype"] is torch.float16 and back["set"] == {1, 3}
    assert back["python_rng"] == (3, (0, 1, 2, 3, 4), None)


def test_deepspeed_objects_are_rebuilt_from_their_attributes(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    scaler = DynamicLossScaler(init_scale=2.0 ** 16, scale_window=1000, min_scale=1, delayed_shift=2,
                               consecutive_hysteresis=False)
    scaler.cur_scale, scaler.cur_iter = 1024.0, 77
    save_state({"scaler": scaler, "stage": ZeroStageEnum.gradients, "slice": fragment_address(numel=4, start=8)},
               tmp_path / "ds.pt")
    back = load_state(tmp_path / "ds.pt")
    assert isinstance(back["scaler"], DynamicLossScaler)
    assert (back["scaler"].cur_scale, back["scaler"].cur_iter, back["scaler"].dtype) == (1024.0, 77, torch.half)
    assert back["stage"] is ZeroStageEnum.gradients
    assert back["slice"] == fragment_address(numel=4, start=8)


def test_the_file_is_plain_safetensors(tmp_path):
    save_state({"w": torch.ones(2)}, tmp_path / "x.pt")
    with safe_open(str(tmp_path / "x.pt"), framework="pt") as handle:
        assert handle.metadata()[FORMAT_KEY] == FORMAT
        assert list(handle.keys()) == ["t0"]


class Opaque:
    pass


def test_tensors_are_written_from_their_own_memory(tmp_path, monkeypatch):
    """No second copy of the state: safetensors' in-memory `save` (the whole file as bytes) is not used."""
    import safetensors.torch

    def refuse(*args, **kwargs):
        raise AssertionError("save_state built the file in memory")

    monkeypatch.setattr(safetensors.torch, "save", refuse)
    state = {"exp_avg": torch.randn(64, 32), "step": 3}
    save_state(state, tmp_path / "optim_states.pt")
    loaded = load_state(tmp_path / "optim_states.pt")
    assert torch.equal(loaded["exp_avg"], state["exp_avg"]) and loaded["step"] == 3


def test_unknown_classes_are_refused_on_save(tmp_path):
    with pytest.raises(TypeError, match="cannot store a .*Opaque in a checkpoint without pickle"):
        save_state({"x": Opaque()}, tmp_path / "x.pt")


@pytest.mark.parametrize("structure, words", [
    ({"$t": "obj", "cls": "os.system", "v": []}, "not on the allowlist"),
    ({"$t": "enum", "cls": "subprocess.Popen", "v": 1}, "not on the allowlist"),
    ({"$t": "dtype", "v": "nn"}, "unknown dtype"),
    ({"$t": "lambda", "v": "1"}, "unknown tag"),
])
def test_a_tampered_file_cannot_name_other_code(tmp_path, structure, words):
    path = tmp_path / "evil.pt"
    save_file({}, str(path), metadata={FORMAT_KEY: FORMAT, STRUCTURE_KEY: json.dumps({"$t": "dict",
                                                                                        "v": [["x", structure]]})})
    with pytest.raises(ValueError, match=words):
        load_state(path)


def test_a_foreign_file_is_refused(tmp_path):
    save_file({"w": torch.ones(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a pipeline state file"):
        load_state(tmp_path / "other.safetensors")
