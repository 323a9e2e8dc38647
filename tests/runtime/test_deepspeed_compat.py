"""One test per DeepSpeed internal the pipeline relies on (pipeline/runtime/deepspeed_compat.py).

Each test checks that the installed DeepSpeed still has what the item assumes (a name, a signature, an
attribute written by a class) and that the item does its job on small stand-ins; a DeepSpeed upgrade
that breaks an item fails here, naming it, before a training run does. The end-to-end effects are
covered by tests/train (checkpoints, resume, fp16, export).
"""
from __future__ import annotations

import contextlib

import importlib
import inspect
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pydantic
import pytest
import torch

from pipeline.runtime import deepspeed_compat as compat


def test_installed_deepspeed_is_the_tested_line():
    import deepspeed

    assert compat.version_problem(deepspeed.__version__) is None, \
        "a new DeepSpeed: re-read every item of pipeline/runtime/deepspeed_compat.py, then update TESTED"


def test_version_problem_names_the_file():
    assert compat.version_problem("0.19.8") is None and compat.version_problem("0.19.0+cu124") is None
    message = compat.version_problem("0.20.1")
    assert "0.20.1" in message and "0.19.x" in message and "deepspeed_compat.py" in message
    assert compat.version_problem("weird") is not None


def test_skip_shm_build_replaces_the_jit_build(monkeypatch):
    ds_comm_torch = importlib.import_module("deepspeed.comm.torch")
    assert hasattr(ds_comm_torch, "build_shm_op"), "deepspeed.comm.torch.build_shm_op is gone: drop skip_shm_build"
    monkeypatch.setattr(ds_comm_torch, "build_shm_op", ds_comm_torch.build_shm_op)  # restored after the test
    compat.skip_shm_build()
    assert ds_comm_torch.build_shm_op() is None


def test_eager_muon_imports_deepspeeds_muon_without_torch_compile():
    """In a fresh interpreter (this one may hold the module already): after eager_muon, ZeRO's later import finds
    DeepSpeed's Muon functions plain (not torch.compile's wrappers) and torch._inductor never imported; compile()
    is DeepSpeed's again. Failed before (no eager_muon)."""
    code = ("import sys, types; from pipeline.runtime import deepspeed_compat as c; c.eager_muon(); "
            "from deepspeed.runtime import compiler; import torch; "
            "from deepspeed.runtime.zero.muon import original_muon as m; "
            "assert type(m.zeropower_via_newtonschulz5) is types.FunctionType, type(m.zeropower_via_newtonschulz5); "
            "assert 'torch._inductor' not in sys.modules; assert compiler.compile() is torch.compile; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_checkpoint_engine_overrides_every_method_and_round_trips(tmp_path):
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

    from pipeline.train.safestate import load_state, save_state

    engine = compat.checkpoint_engine(save_state, load_state)
    assert isinstance(engine, CheckpointEngine)
    abstract = getattr(CheckpointEngine, "__abstractmethods__", frozenset())
    assert not abstract - set(vars(type(engine))), f"CheckpointEngine gained abstract methods {abstract}"
    # Every method DeepSpeed's base would run with torch.save / torch.load semantics is ours.
    for name in ("create", "save", "load", "commit", "makedirs", "preserves_storage_sharing"):
        assert name in vars(CheckpointEngine), f"CheckpointEngine.{name} is gone"
        assert name in vars(type(engine)), name
    path = tmp_path / "deepspeed" / "mp_rank_00_model_states.pt"
    engine.makedirs(str(path.parent), exist_ok=True)
    engine.save({"module": {"w": torch.arange(3.0)}, "step": 4}, str(path))
    back = engine.load(str(path), map_location="cpu")
    assert back["step"] == 4 and torch.equal(back["module"]["w"], torch.arange(3.0))
    holder = types.SimpleNamespace(checkpoint_engine=None)
    compat.use_checkpoint_engine(holder, engine)
    assert holder.checkpoint_engine is engine
    with pytest.raises(compat.IncompatibleDeepSpeed, match="use_checkpoint_engine"):
        compat.use_checkpoint_engine(object(), engine)


def test_z3_leaf_modules_marks_the_modules_deepspeed_gathers_whole():
    """DeepSpeed's ZeRO-3 hooks stop at a module its z3_leaf_module says is a leaf (what Qwen3-MoE's sparse blocks
    need: pipeline.model.moe.zero3_leaf_modules)."""
    from deepspeed.utils import z3_leaf_module

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.Linear(2, 2)))
    compat.z3_leaf_modules(model, [torch.nn.Sequential])
    assert z3_leaf_module(model) and z3_leaf_module(model[1]) and not z3_leaf_module(model[0])


def test_module_state_dict_has_deepspeeds_signature_and_drops_frozen_aliases():
    from deepspeed.runtime.engine import DeepSpeedEngine

    def shape(fn):
        return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]

    assert shape(DeepSpeedEngine.module_state_dict) == shape(compat.module_state_dict)

    module = torch.nn.Module()
    module.wte = torch.nn.Embedding(5, 3)
    module.lm_head = torch.nn.Linear(3, 5, bias=False)
    module.lm_head.weight = module.wte.weight  # tied: one parameter, two names
    module.wte.weight.requires_grad_(False)
    module.adapter = torch.nn.Linear(3, 3)
    engine = types.SimpleNamespace(module=module, module_state_dict=lambda **kw: None)
    compat.exclude_frozen_aliases(engine)
    assert set(engine.module_state_dict(exclude_frozen_parameters=True)) == {"adapter.weight", "adapter.bias"}
    assert "lm_head.weight" in engine.module_state_dict()


def test_helper_scripts_are_the_ones_deepspeed_copies():
    import deepspeed.utils

    shipped = Path(deepspeed.utils.__file__).parent
    for script in compat.HELPER_SCRIPTS:
        assert (shipped / script).is_file(), f"DeepSpeed no longer ships {script}"


def test_state_classes_exist():
    for name in sorted(compat.STATE_CLASSES | compat.STATE_ENUMS):
        module, _, attr = name.rpartition(".")
        assert hasattr(importlib.import_module(module), attr), f"{name} is gone: update STATE_CLASSES"


def _zero12_layout(world: int, rank: int, numel: int = 10) -> types.SimpleNamespace:
    """Rank `rank`'s DeepSpeedZeroOptimizer partition layout for one param group of `numel` elements (two
    parameters, 4 and the rest) on `world` ranks, as stage_1_and_2 builds it: the flat group padded to a multiple of
    2 x world (nccl_start_alignment_factor 2), cut into `world` equal partitions, the padding on the last rank."""
    total = -(-numel // (2 * world)) * 2 * world
    size = total // world
    return types.SimpleNamespace(single_partition_of_fp32_groups=[torch.zeros(size)],
                                 groups_padding=[total - numel if rank == world - 1 else 0],
                                 round_robin_bit16_padding=[[0, 0]],
                                 round_robin_bit16_groups=[[torch.zeros(4), torch.zeros(numel - 4)]],
                                 bit16_groups_flat=[torch.zeros(total)], partition_count=[world],
                                 nccl_start_alignment_factor=2, _param_slice_mappings=[{"w": "mine"}])


def _zero12_saved(values: list[float], world: int) -> list[dict]:
    """What each of `world` ranks saves of a group holding `values` (DeepSpeedZeroOptimizer.state_dict, rigid):
    its fp32 partition without padding, Adam's moments as whole partitions (padding included), the step."""
    size = _zero12_layout(world, 0, len(values)).single_partition_of_fp32_groups[0].numel()
    flat = torch.zeros(size * world)
    flat[:len(values)] = torch.tensor(values)
    out = []
    for rank in range(world):
        part = flat[rank * size:(rank + 1) * size]
        padding = _zero12_layout(world, rank, len(values)).groups_padding[0]
        out.append({"loss_scaler": "kept", "group_paddings": [padding], "partition_count": [world],
                    "single_partition_of_fp32_groups": [part[:size - padding].clone()],
                    "base_optimizer_state": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": part * 10,
                                                           "exp_avg_sq": part * 100}},
                                             "param_groups": [{"lr": 0.5, "params": [0]}]}})
    return out


@pytest.mark.parametrize("saved_world, world, wanted, reads", [
    # 10 values on 2 ranks (12 with padding: partitions of 6, the last padded by 2), read on 3 ranks (12: partitions
    # of 4, the last holding 8, 9 and 2 padding), on 1 (10: no padding) and back from 3 to 2; `reads`: the saved
    # ranks each rank reads, those its partition overlaps
    (2, 3, [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]], [{0}, {0, 1}, {1}]),
    (2, 1, [list(range(10))], [{0, 1}]),
    (3, 2, [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9]], [{0, 1}, {1, 2}]),
])
def test_zero12_partition_moves_masters_and_moments_to_the_new_partitions(saved_world, world, wanted, reads):
    """resharded_loads' arithmetic on the layout DeepSpeedZeroOptimizer builds (written out above by hand, not
    taken from the code under test): each rank gets exactly its slice of the masters and of both moments, padded
    with zeros where its partition is, reading only the saved partitions it overlaps; the step, the param groups
    and the loss scaler come through as saved."""
    saved = _zero12_saved([float(v) for v in range(10)], saved_world)
    for rank, values in enumerate(wanted):
        layout, read = _zero12_layout(world, rank), set()
        state = compat.zero12_partition(layout, lambda s: read.add(s) or saved[s], saved_world, rank, world)
        assert read == reads[rank]
        size = layout.single_partition_of_fp32_groups[0].numel()
        padded = torch.tensor([float(v) for v in values] + [0.0] * (size - len(values)))
        assert torch.equal(state["single_partition_of_fp32_groups"][0], torch.tensor(values, dtype=torch.float32))
        moments = state["base_optimizer_state"]["state"][0]
        assert torch.equal(moments["exp_avg"], padded * 10) and torch.equal(moments["exp_avg_sq"], padded * 100)
        assert moments["step"] == 3.0 and state["base_optimizer_state"]["param_groups"] == [{"lr": 0.5, "params": [0]}]
        assert state["group_paddings"] == layout.groups_padding and state["partition_count"] == [world]
        assert state["loss_scaler"] == "kept" and state["param_slice_mappings"] == [{"w": "mine"}]


def _bf16_optimizer_layout(world: int, rank: int, numel: int = 10) -> Any:
    """Rank `rank`'s BF16_Optimizer layout for one param group of `numel` elements (two parameters, 4 and the rest)
    on `world` ranks, as bf16_optimizer._setup_for_real_optimizer builds it: the parameters flattened without gaps,
    padded to a multiple of 2 x world, cut into `world` equal partitions, the padding on the last rank."""
    zero = _zero12_layout(world, rank, numel)
    layout = type("BF16_Optimizer", (), {})()  # the class name is what flat_groups tells the optimizers apart by
    layout.__dict__.update(fp32_groups_flat_partition=zero.single_partition_of_fp32_groups,
                           group_paddings=zero.groups_padding, bf16_groups=zero.round_robin_bit16_groups,
                           bf16_groups_flat=zero.bit16_groups_flat, partition_count=[world],
                           nccl_start_alignment_factor=2, _param_slice_mappings=[{"w": "mine"}])
    return layout


@pytest.mark.parametrize("saved_world, world, wanted", [
    (2, 3, [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]),
    (3, 2, [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9]]),
])
def test_zero12_partition_reads_bf16_optimizers_padded_partitions(saved_world, world, wanted):
    """DeepSpeed's BF16_Optimizer (bf16 at ZeRO 1, fp32 gradient accumulation) saves its fp32 partitions with their
    padding (BF16_Optimizer.state_dict: fp32_groups_flat_partition as is), which DeepSpeedZeroOptimizer strips; the
    padding (here -1) is not carried into another rank's partition. Failed before: resharded_loads refused
    BF16_Optimizer ("keeps partitions this trainer does not rebuild")."""
    saved = _zero12_saved([float(v) for v in range(10)], saved_world)
    size = _zero12_layout(saved_world, 0).single_partition_of_fp32_groups[0].numel()
    for state in saved:  # the padded partition BF16_Optimizer writes, its padding -1
        lean = state["single_partition_of_fp32_groups"][0]
        state["single_partition_of_fp32_groups"] = [torch.cat([lean, -torch.ones(size - lean.numel())])]
        del state["loss_scaler"]  # BF16_Optimizer has none
    for rank, values in enumerate(wanted):
        layout = _bf16_optimizer_layout(world, rank)
        state = compat.zero12_partition(layout, lambda s: saved[s], saved_world, rank, world)
        padded = torch.tensor([float(v) for v in values] + [0.0] * (layout.fp32_groups_flat_partition[0].numel()
                                                                     - len(values)))
        assert torch.equal(state["single_partition_of_fp32_groups"][0], torch.tensor(values, dtype=torch.float32))
        assert torch.equal(state["base_optimizer_state"]["state"][0]["exp_avg"], padded * 10)
        assert state["group_paddings"] == layout.group_paddings and state["partition_count"] == [world]


def test_reshard_problem_refuses_nvme_offload_and_unknown_optimizers_only():
    """offload_optimizer: cpu and BF16_Optimizer are resharded (both refused before); NVMe offload and an optimizer
    class this file does not know are refused, each naming why."""
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum

    def engine(stage: int, kind: str, nvme: bool = False, offload: bool = True) -> types.SimpleNamespace:
        device = OffloadDeviceEnum.nvme if nvme else OffloadDeviceEnum.cpu
        return types.SimpleNamespace(zero_optimization_stage=lambda: stage, optimizer=type(kind, (), {})(),
                                     zero_offload_optimizer=lambda: types.SimpleNamespace(device=device)
                                     if offload else None)

    assert compat.reshard_problem(engine(1, "BF16_Optimizer")) is None
    assert compat.reshard_problem(engine(2, "DeepSpeedZeroOptimizer")) is None
    assert compat.reshard_problem(engine(3, "DeepSpeedZeroOptimizer_Stage3")) is None
    assert compat.reshard_problem(engine(0, "AdamW")) is None  # ZeRO 0: the whole state in the model-states file
    assert compat.reshard_problem(engine(2, "DeepSpeedZeroOptimizer", offload=False)) is None
    # the engine's device as its config names it, no made-up one ("cpu or none" before)
    assert [compat.offload_device(engine(3, "x", nvme=n, offload=o)) for n, o in ((True, True), (False, True),
                                                                                  (False, False))] == \
        ["nvme", "cpu", "none"]
    assert "offload_optimizer: nvme" in compat.reshard_problem(engine(3, "DeepSpeedZeroOptimizer_Stage3", nvme=True))
    assert compat.reshard_problem(engine(3, "SuperOffloadOptimizer_Stage3")) == (
        "zero_stage 3 with DeepSpeed's SuperOffloadOptimizer_Stage3 keeps partitions this trainer does not rebuild")


def test_bf16_optimizer_and_offload_are_what_reshard_problem_reads():
    """BF16_Optimizer's state_dict keys and attributes flat_groups reads, when DeepSpeed picks it, and that CPU
    offload writes the same state_dict (DeepSpeedZeroOptimizer.state_dict has no offload branch) while NVMe is
    what the engine's offload_optimizer.device says (DeepSpeed swaps the state exactly then)."""
    import deepspeed.checkpoint.constants as keys
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    state_dict = inspect.getsource(BF16_Optimizer.state_dict)
    for key in ("BASE_OPTIMIZER_STATE", "SINGLE_PARTITION_OF_FP32_GROUPS", "GROUP_PADDINGS", "PARTITION_COUNT",
                "PARAM_SLICE_MAPPINGS"):
        assert f"state_dict[{key}]" in state_dict and hasattr(keys, key), key
    assert "state_dict[SINGLE_PARTITION_OF_FP32_GROUPS] = self.fp32_groups_flat_partition" in state_dict  # padded
    setup = inspect.getsource(BF16_Optimizer._setup_for_real_optimizer)
    for line in ("self.nccl_start_alignment_factor * real_dp_world_size", "self.group_paddings.append(padding)",
                 "self.fp32_groups_flat_partition.append(", "self.bf16_groups.append(trainable_parameters)",
                 "self.bf16_groups_flat.append("):
        assert line in setup, line
    assert "self.nccl_start_alignment_factor = 2" in inspect.getsource(BF16_Optimizer.__init__)
    assert "return BFLOAT16" in inspect.getsource(DeepSpeedEngine._do_optimizer_sanity_check)
    assert "cpu_offload" not in inspect.getsource(DeepSpeedZeroOptimizer.state_dict)
    assert "return self._config.zero_config.offload_optimizer" in \
        inspect.getsource(DeepSpeedEngine.zero_offload_optimizer)  # what offload_device reads its device from
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    assert "self.swap_optimizer = offload_optimizer_config.device == OffloadDeviceEnum.nvme" in \
        inspect.getsource(DeepSpeedZeroOptimizer_Stage3)


def _zero3_layout(world: int) -> types.SimpleNamespace:
    """DeepSpeedZeroOptimizer_Stage3's layout on `world` ranks for two parameters of 5 and 3 elements in one
    sub-group, as partition_parameters cuts them: each into pieces of ceil(numel / world), the last padded, and a
    rank's flat sub-group its pieces one after another."""
    params = [types.SimpleNamespace(ds_numel=n, partition_numel=lambda n=n: -(-n // world)) for n in (5, 3)]
    return types.SimpleNamespace(fp16_groups=[params], partition_count=world,
                                 fp32_partitioned_groups_flat=[torch.zeros(sum(-(-n // world) for n in (5, 3)))])


def _zero3_saved(world: int) -> list[dict]:
    """What each of `world` ranks saves (DeepSpeedZeroOptimizer_Stage3._rigid_state_dict) of parameters holding
    0-4 and 10-12: its pieces of both, padded with -1 (padding is whatever the rank held there), Adam's moments the
    same layout times 10 and 100, the step."""
    out = []
    for rank in range(world):
        flat = []
        for values in (list(range(5)), [10, 11, 12]):
            size = -(-len(values) // world)
            piece = values[rank * size:(rank + 1) * size]
            flat += [float(v) for v in piece] + [-1.0] * (size - len(piece))
        part = torch.tensor(flat)
        out.append({"loss_scaler": "kept", "partition_count": world, "fp32_flat_groups": [part.clone()],
                    "optimizer_state_dict": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": part * 10,
                                                           "exp_avg_sq": part * 100}},
                                             "param_groups": [{"lr": 0.5, "params": [0]}]}})
    return out


@pytest.mark.parametrize("saved_world, world, wanted", [
    # 5 and 3 elements on 2 ranks (pieces of 3 and 2: [0 1 2 | 10 11], [3 4 pad | 12 pad]) read on 1 rank, and
    # back: from 1 rank to 2, and from 2 to 3 (pieces of 2 and 1)
    (2, 1, [[0, 1, 2, 3, 4, 10, 11, 12]]),
    (1, 2, [[0, 1, 2, 10, 11], [3, 4, 0, 12, 0]]),
    (2, 3, [[0, 1, 10], [2, 3, 11], [4, 0, 12]]),
])
def test_zero3_partition_moves_each_parameters_pieces_to_the_new_ranks(saved_world, world, wanted):
    """resharded_loads' ZeRO 3 arithmetic on the layout written out above by hand: each rank gets its piece of every
    parameter, of the masters and of both moments, zeros where its padding is (the saved padding is not carried);
    the step, param groups and loss scaler come through as saved, partition_count is this run's."""
    saved = _zero3_saved(saved_world)
    for rank, values in enumerate(wanted):
        read: list[int] = []
        state = compat.zero3_partition(_zero3_layout(world), lambda s: read.append(s) or saved[s], saved_world,
                                       rank, world)
        assert read == list(range(saved_world))  # every saved rank holds a piece of every parameter: each read once
        want = torch.tensor([float(v) for v in values])
        assert torch.equal(state["fp32_flat_groups"][0], want)
        moments = state["optimizer_state_dict"]["state"][0]
        assert torch.equal(moments["exp_avg"], want * 10) and torch.equal(moments["exp_avg_sq"], want * 100)
        assert moments["step"] == 3.0 and state["optimizer_state_dict"]["param_groups"] == [{"lr": 0.5, "params": [0]}]
        assert state["partition_count"] == world and state["loss_scaler"] == "kept"


def test_resharded_loads_reads_deepspeeds_names():
    """The file names and state-dict keys resharded_loads reads are the ones DeepSpeed 0.19 writes and checks."""
    import deepspeed.checkpoint.constants as keys
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    source = inspect.getsource(DeepSpeedEngine)
    assert "_mp_rank_{mp_rank:02d}_optim_states.pt" in source and '"mp_rank_" + mp_rank_str + "_model_states.pt"' \
        in source and "self.loaded_checkpoint_dp_world_size = checkpoint['dp_world_size']" in source
    for bf16 in (False, True):  # the names DeepSpeed gives the per-rank files, with and without bf16
        engine = types.SimpleNamespace(_get_zero_ckpt_prefix=types.MethodType(DeepSpeedEngine._get_zero_ckpt_prefix,
                                                                              object()))
        name = DeepSpeedEngine._get_rank_zero_ckpt_name(engine, "d", "t", mp_rank=0, dp_rank=3, bf16_mode=bf16)
        match = compat.ZERO_OPTIM_FILE.match(Path(name).name)
        assert match and match["rank"] == "3" and match["prefix"] == ("bf16_" if bf16 else ""), name
    state_dict = inspect.getsource(DeepSpeedZeroOptimizer.state_dict)
    for key in ("BASE_OPTIMIZER_STATE", "SINGLE_PARTITION_OF_FP32_GROUPS", "GROUP_PADDINGS", "PARTITION_COUNT",
                "PARAM_SLICE_MAPPINGS"):
        assert f"state_dict[{key}]" in state_dict and hasattr(keys, key), key
    init = inspect.getsource(DeepSpeedZeroOptimizer.__init__)
    assert "self.nccl_start_alignment_factor = 2" in init and "self.groups_padding.append(padding)" in init
    for name in ("single_partition_of_fp32_groups", "round_robin_bit16_groups", "round_robin_bit16_padding",
                 "bit16_groups_flat", "partition_count", "_param_slice_mappings"):
        assert f"self.{name} =" in init, name
    # ZeRO 3: the per-rank model states file (engine._get_ckpt_name, globbed by _get_all_ckpt_names), the rigid state
    # of fp32_partitioned_groups_flat and each parameter's own padded piece (partition_parameters)
    from deepspeed.runtime.zero import partition_parameters
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    assert 'f"{filename}_mp_rank_{mp_rank_str}_model_states.pt"' in source and \
        'filename = "zero_pp_rank_{}".format(pp_rank)' in source
    assert compat.ZERO3_MODEL_STATES_FILE.match("zero_pp_rank_1_mp_rank_00_model_states.pt")
    assert "ckpt_list = self._get_all_ckpt_names(load_dir, tag)" in inspect.getsource(DeepSpeedEngine._load_checkpoint)
    rigid = inspect.getsource(DeepSpeedZeroOptimizer_Stage3._rigid_state_dict)
    for key in ("OPTIMIZER_STATE_DICT", "FP32_FLAT_GROUPS", "PARTITION_COUNT"):
        assert f"state_dict[{key}]" in rigid and hasattr(keys, key), key
    assert "state_dict[FP32_FLAT_GROUPS] = self.fp32_partitioned_groups_flat" in rigid
    assert "self.fp16_partitioned_groups.append([param.ds_tensor for param in sub_group])" in \
        inspect.getsource(DeepSpeedZeroOptimizer_Stage3)
    init = inspect.getsource(partition_parameters.Init)
    for line in ("return param.ds_numel + self._padding_size(param)", "return param.ds_tensor.ds_numel",
                 "partition_size = tensor_size // self._partition_world_size(param)"):
        assert line in init, line


def test_fp32_master_reads_the_unfused_wrappers_groups():
    from deepspeed.runtime.fp16 import unfused_optimizer

    source = inspect.getsource(unfused_optimizer.FP16_UnfusedOptimizer.__init__)
    assert "self.fp16_groups" in source and "self.fp32_groups" in source
    low, high, other = torch.nn.Parameter(torch.ones(2)), torch.ones(2), torch.nn.Parameter(torch.zeros(2))
    engine = types.SimpleNamespace(optimizer=types.SimpleNamespace(fp16_groups=[[low]], fp32_groups=[[high]]))
    assert compat.fp32_master(engine, low) is high
    assert compat.fp32_master(engine, other) is other  # fp32 without ZeRO: its own master


def test_loss_scale_reads_the_fp16_optimizers_attribute():
    from deepspeed.runtime.fp16 import fused_optimizer, unfused_optimizer

    for cls in (fused_optimizer.FP16_Optimizer, unfused_optimizer.FP16_UnfusedOptimizer):
        assert "cur_scale" in inspect.getsource(cls), f"{cls.__name__} no longer keeps cur_scale"
    assert compat.loss_scale(types.SimpleNamespace(optimizer=types.SimpleNamespace(cur_scale=1024))) == 1024.0
    assert compat.loss_scale(types.SimpleNamespace(optimizer=torch.optim.SGD([torch.nn.Parameter(torch.ones(1))],
                                                                            lr=0.1))) is None


def test_reports_grad_norm_follows_the_configuration():
    def engine(zero=0, bf16=False, fp16=False):
        return types.SimpleNamespace(zero_optimization=lambda: zero, bfloat16_enabled=lambda: bf16,
                                     fp16_enabled=lambda: fp16)

    assert not compat.reports_grad_norm(engine())
    assert compat.reports_grad_norm(engine(zero=2)) and compat.reports_grad_norm(engine(bf16=True))


def test_gathered_for_generation_uses_deepspeeds_unwrap():
    """Under ZeRO-3 the item enters DeepSpeed's unwrap_model_for_generation, which gathers every parameter and takes
    the ZeRO-3 module hooks off (its parameter_offload's forward_hooks / backward_hooks), then registers them again
    (_register_deepspeed_module). The runs are tests/compat/test_ppo_example.py (one rank, against ZeRO 0) and
    tests/compat/test_ppo_multirank.py (two ranks whose responses end apart)."""
    from deepspeed.runtime.zero import parameter_offload, unwrap_model_for_generation

    source = inspect.getsource(unwrap_model_for_generation)
    for name in ("GatheredParameters(model.parameters())", "parameter_offload", "forward_hooks", "backward_hooks",
                 "_register_deepspeed_module"):
        assert name in source, f"unwrap_model_for_generation no longer uses {name}"
    offload = inspect.getsource(parameter_offload.DeepSpeedZeRoOffload)
    assert "self.forward_hooks = []" in offload and "def _register_deepspeed_module" in offload
    module = torch.nn.Linear(2, 2)
    plain = types.SimpleNamespace(module=module, zero_optimization_stage=lambda: 2)
    with compat.gathered_for_generation(plain) as model:
        assert model is module  # nothing partitioned: the module as it is
    zero3 = types.SimpleNamespace(module=module, zero_optimization_stage=lambda: 3, optimizer=object())
    with pytest.raises(compat.IncompatibleDeepSpeed, match="gathered_for_generation"):
        with compat.gathered_for_generation(zero3):
            pass


def test_validate_config_checks_the_batch_of_the_runs_world_whatever_group_this_process_holds(monkeypatch):
    """check_start asks DeepSpeed's config check before the ranks meet, where DeepSpeedConfig divides the batch by
    deepspeed.comm's world: 1 with no group, or that of a group of one an earlier in-process run left set up (a test
    worker: test_ranks_before_they_meet failed there with 'train_batch_size 4 != 2 x 1 x 1'). A 2-rank run's batch
    of 4 (2 per rank, no accumulation) passes either way; a wrong one is still refused."""
    from deepspeed import comm

    config = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1}
    compat.validate_config(config, world_size=2)
    monkeypatch.setattr(comm, "is_initialized", lambda: True)
    monkeypatch.setattr(comm, "get_world_size", lambda group=None: 1)
    monkeypatch.setattr(comm, "get_rank", lambda group=None: 0)
    compat.validate_config(config, world_size=2)
    with pytest.raises(AssertionError, match="train_batch_size"):
        compat.validate_config({**config, "train_batch_size": 6}, world_size=2)
    with pytest.raises(AssertionError, match="train_batch_size"):  # 5 is no 2 ranks' batch (it read 5 // 2 = 2 x 1)
        compat.validate_config({**config, "train_batch_size": 5}, world_size=2)


def test_validate_config_and_section_keys():
    compat.validate_config({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}})
    with pytest.raises(pydantic.ValidationError) as err:
        compat.validate_config({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stagee": 2}})
    problem = err.value.errors()[0]
    assert problem["type"] == "extra_forbidden"
    keys = compat.section_keys(err.value.title)
    assert keys is not None and "stage" in keys and "offload_optimizer" in keys
    assert compat.section_keys("NoSuchModel") is None


def test_no_other_module_reaches_into_deepspeed():
    """Outside deepspeed_compat only DeepSpeed's public entry points are imported (one file to read)."""
    import re

    public = {"deepspeed", "deepspeed.accelerator", "deepspeed.launcher.runner"}
    root = Path(compat.__file__).resolve().parents[1]
    pattern = re.compile(r"^\s*(?:from|import)\s+(deepspeed[\w.]*)|[\"'](deepspeed\.[\w.]+)[\"']", re.M)
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.name == "deepspeed_compat.py":
            continue
        for match in pattern.finditer(path.read_text(encoding="utf-8")):
            name = match.group(1) or match.group(2)
            if name not in public:
                found.append(f"{path.relative_to(root.parent)}: {name}")
    assert not found, "DeepSpeed internals used outside pipeline/runtime/deepspeed_compat.py: " + "; ".join(found)


# torch 2.13's message as a one-rank ZeRO-3 run printed it on stderr (the survey of h110), emitted at
# torch/distributed/c10d_logger.py:83 (the deprecation decorator's caller frame)
TORCH_DEPRECATION = ("`torch.distributed.reduce_scatter_tensor` is deprecated. Please use "
                     "`torch.distributed.reduce_scatter_single` instead.")
C10D_LOGGER = "torch.distributed.c10d_logger"


def test_quiet_deprecated_collectives_hides_torchs_message_from_torch_only(monkeypatch):
    """The filter matches the exact message torch gives (from torch itself: the deprecated functions warn before
    they look for a process group, whether or not one is set up) and nothing beside it: another FutureWarning of the same module, the same text
    from another module or as another category all still show."""
    import warnings

    source = inspect.getsource(importlib.import_module("deepspeed.comm.torch"))  # (import gives torch: see skip_shm)
    assert "torch.distributed.reduce_scatter_tensor" in source and "torch.distributed.all_gather_into_tensor" in source, \
        "DeepSpeed no longer calls the deprecated collectives: drop quiet_deprecated_collectives"
    monkeypatch.setattr("sys.warnoptions", [])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert compat.quiet_deprecated_collectives()
        for deprecated in (torch.distributed.reduce_scatter_tensor, torch.distributed.all_gather_into_tensor):
            # without a process group the call then fails (ValueError); with one an earlier test of this pytest
            # worker left (a one-rank gloo group) it may run or fail in gloo: the warning came first either way
            with contextlib.suppress(ValueError, RuntimeError):
                deprecated(torch.zeros(1), torch.zeros(1))
        warnings.warn_explicit(TORCH_DEPRECATION, FutureWarning, "c10d_logger.py", 83, module=C10D_LOGGER)
        assert not seen, [str(w.message) for w in seen]
        kept = [("`torch.distributed.reduce_op` is deprecated, please use `torch.distributed.ReduceOp` instead",
                 FutureWarning, C10D_LOGGER),
                (TORCH_DEPRECATION, FutureWarning, "my_training_script"),
                (TORCH_DEPRECATION, UserWarning, C10D_LOGGER)]
        for message, category, module in kept:
            warnings.warn_explicit(message, category, "x.py", 1, module=module)
    assert [(str(w.message), w.category) for w in seen] == [(m, c) for m, c, _ in kept]


def test_quiet_deprecated_collectives_leaves_the_users_own_filters(monkeypatch):
    """PYTHONWARNINGS=default (or python -W): the user asked for warnings, so nothing is hidden."""
    import warnings

    monkeypatch.setattr("sys.warnoptions", ["default"])
    with warnings.catch_warnings():
        before = list(warnings.filters)
        assert not compat.quiet_deprecated_collectives()
        assert warnings.filters == before
