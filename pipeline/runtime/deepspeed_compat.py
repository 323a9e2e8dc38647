"""Every place the pipeline relies on DeepSpeed internals, in one file: a DeepSpeed upgrade reads this.

DeepSpeed's public API (initialize, init_distributed, engine.backward/step/save_checkpoint/load_checkpoint,
get_accelerator) is used directly elsewhere. What is here depends on how one DeepSpeed release is built
inside — private attributes, a method replaced on the engine, a base class subclassed, class names written
into checkpoints — and each item was read against the release in TESTED. `guard()` says so when another
release is installed; `tests/runtime/test_deepspeed_compat.py` has one test per item that fails on a
release where the item no longer holds, naming it.

  item                         why                                                       used by
  skip_shm_build               no ~75 s JIT build of a CPU shared-memory allreduce        runtime dist init
  eager_muon                   DeepSpeed's Muon module imported without torch.compile     runtime dist init
                               (~1 CPU-s a rank: torch._inductor, sympy; never used here)
  SafeCheckpointEngine         DeepSpeed's save/load without pickle (CheckpointEngine)   train.checkpoint
  exclude_frozen_aliases       no frozen tied head in LoRA checkpoints (module_state_dict) train.checkpoint
                               (frozen: not `trains`; BAdam's resting layers are kept)
  HELPER_SCRIPTS               recovery scripts DeepSpeed copies into a checkpoint        train.checkpoint
  resharded_loads              a ZeRO 0-3 checkpoint of N ranks read on M (world_size;    train.checkpoint
                               BF16_Optimizer too: flat_groups)
  STATE_CLASSES / STATE_ENUMS  DeepSpeed classes inside its state dicts (safestate allowlist) train.safestate
  fp32_master                  the fp32 master of a parameter (fp16_groups/fp32_groups)   train.export
  loss_scale                   the fp16 loss scale (optimizer.cur_scale / loss_scale)     train.loop
  reports_grad_norm            which configurations report the pre-clip gradient norm     train.loop
  validate_config, section_keys  DeepSpeed's pydantic config models                      train.run
  gathered_for_generation      ZeRO-3 weights whole, DeepSpeed's per-layer hooks off      train.ppo (rollouts)
  quiet_deprecated_collectives torch's FutureWarning on the collectives ZeRO calls, off    runtime dist init
  z3_leaf_modules              ZeRO-3 gathers a module's whole subtree at once             train.run (MoE blocks)
                               (deepspeed.utils.set_z3_leaf_modules)

The launcher's process tree (pipeline.launch: the ranks are the runner's grandchildren) is the one
further assumption, documented there.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import re
import sys
import types
from typing import Any, Callable, Iterator

TESTED = (0, 19)  # the DeepSpeed major.minor every item below was read against (requirements.txt pins it)

# Scripts DeepSpeed copies into every checkpoint folder; they read pickles, which these checkpoints are not.
HELPER_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")
# DeepSpeed classes found inside the state dicts it saves; pipeline.train.safestate rebuilds exactly these
# from their attributes (never by unpickling) and refuses any other class.
STATE_CLASSES = frozenset({
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
})
STATE_ENUMS = frozenset({"deepspeed.runtime.zero.config.ZeroStageEnum"})


class IncompatibleDeepSpeed(RuntimeError):
    """An internal this file relies on is missing or changed in the installed DeepSpeed (a bug to fix here)."""


def version_problem(version: str) -> str | None:
    """A sentence when `version` is not the tested release line, else None."""
    parts = version.split("+")[0].split(".")
    try:
        installed = (int(parts[0]), int(parts[1]))
    except (IndexError, ValueError):
        installed = None
    if installed == TESTED:
        return None
    return (f"DeepSpeed {version} is installed, but the pipeline was tested with {TESTED[0]}.{TESTED[1]}.x; "
            "the internals it relies on are listed in pipeline/runtime/deepspeed_compat.py "
            "(run tests/runtime/test_deepspeed_compat.py to check them)")


@functools.lru_cache(maxsize=1)
def guard() -> None:
    """Warn once on stderr when the installed DeepSpeed is not the tested release line."""
    import deepspeed

    problem = version_problem(deepspeed.__version__)
    if problem:
        print(f"warning: {problem}", file=sys.stderr)


def _require(condition: bool, item: str, detail: str) -> None:
    if not condition:
        import deepspeed

        raise IncompatibleDeepSpeed(f"DeepSpeed {deepspeed.__version__}: {item}: {detail}; "
                                    "see pipeline/runtime/deepspeed_compat.py")


# ---------------------------------------------------------------------------------------------- distributed

def skip_shm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory allreduce kernel for CPU (~75 s with gcc on a
    fresh machine): gloo does the same reductions. Call before deepspeed.init_distributed."""
    guard()
    # (`import deepspeed.comm.torch as m` would give torch itself: deepspeed.comm re-exports `torch`.)
    ds_comm_torch = importlib.import_module("deepspeed.comm.torch")
    if hasattr(ds_comm_torch, "build_shm_op"):  # releases without it have nothing to skip
        ds_comm_torch.build_shm_op = lambda: None


MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"


def eager_muon() -> None:
    """Import DeepSpeed's Muon module with its torch.compile decorators as no-ops, before ZeRO imports it.

    DeepSpeed 0.19's ZeRO 1/2 (average_tensor, on the first gradient reduction), ZeRO 3 and BF16_Optimizer import
    deepspeed.runtime.zero.muon, whose original_muon wraps three functions in `@compiler.compile()` (torch.compile)
    at import: that pulls in torch._inductor, aot_autograd and sympy, ~1 CPU-second in every rank of every run, for
    an optimizer this pipeline never builds (a DeepSpeed JSON's "optimizer" section is refused: recipe.dsconfig;
    use_muon is pipeline.train.muon's own). Imported here with DeepSpeed's compile() returning the function itself,
    its functions stay eager: the same arithmetic if anything ever called them, only not compiled. Call before
    deepspeed.initialize; a no-op once the module is imported."""
    if MUON_MODULE in sys.modules:
        return
    from deepspeed.runtime import compiler

    _require(callable(getattr(compiler, "compile", None)), "eager_muon",
             "deepspeed.runtime.compiler.compile is gone (original_muon's decorator)")
    compile_ = compiler.compile
    compiler.compile = lambda *args, **kwargs: (lambda fn: fn)
    try:
        import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401  (MUON_MODULE: importing it is the point)
    finally:
        compiler.compile = compile_


def destroy_process_groups() -> None:
    """torch's process groups destroyed, and DeepSpeed's references to them (deepspeed.comm keeps its own handle
    on the world group once deepspeed.init_distributed ran; its destroy_process_group drops it and calls torch's)."""
    comm = importlib.import_module("deepspeed.comm")
    if comm.is_initialized():
        comm.destroy_process_group()
    else:
        import torch.distributed as tdist

        tdist.destroy_process_group()


# The collectives DeepSpeed's ZeRO calls (deepspeed.comm.torch: reduce_scatter_tensor in every stage-1-3 gradient
# reduction, all_gather_into_tensor in ZeRO-3's parameter gathers) that torch 2.13 deprecates with a FutureWarning,
# attributed to the decorator's frame in torch.distributed.c10d_logger. The user can do nothing about it (DeepSpeed
# makes the call), and it reached stderr again and again: 40 times in the 2 steps of a one-rank ZeRO-3 full run.
# (message regex, category, emitting-module regex): warnings.filterwarnings's own fields, matched together.
DEPRECATED_COLLECTIVES = (
    r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated\. ",
    FutureWarning,
    r"torch\.distributed\.c10d_logger\Z",
)


def quiet_deprecated_collectives() -> bool:
    """Hide DEPRECATED_COLLECTIVES (only that message, category and module: every other warning still shows);
    False, and nothing hidden, when the user chose warning filters themselves (pipeline.library_warnings' rule)."""
    from pipeline.library_warnings import hide_library_warning

    return hide_library_warning(DEPRECATED_COLLECTIVES)


# ---------------------------------------------------------------------------------------------- checkpoints

def checkpoint_engine(save: Callable[[Any, str], None], load: Callable[..., Any]) -> Any:
    """A DeepSpeed CheckpointEngine storing each state dict with `save(state, path)` / `load(path, map_location)`.

    DeepSpeed's own engine pickles (torch.save / torch.load); this one is handed the same state dicts.
    """
    guard()
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

    class SafeCheckpointEngine(CheckpointEngine):
        def __init__(self) -> None:
            super().__init__()
            self.name = "pipeline-safetensors"

        def create(self, info: Any) -> None:
            pass

        def save(self, state_dict: Any, path: str) -> None:
            save(state_dict, path)

        def load(self, path: str, map_location: Any = None) -> Any:
            return load(path, map_location)

        def commit(self, info: Any) -> bool:
            return True

        def makedirs(self, path: str, exist_ok: bool = False) -> None:
            os.makedirs(path, exist_ok=exist_ok)

        def preserves_storage_sharing(self) -> bool:
            return False  # views are copied by the state writer itself; no need for DeepSpeed's defensive clones

    return SafeCheckpointEngine()


def use_checkpoint_engine(engine: Any, checkpoint_engine: Any) -> None:
    """Route engine.save_checkpoint / load_checkpoint through `checkpoint_engine` (a private attribute)."""
    _require(hasattr(engine, "checkpoint_engine"), "use_checkpoint_engine", "the engine has no checkpoint_engine")
    engine.checkpoint_engine = checkpoint_engine


IN_TURN = "trains_in_turn"  # set on parameters an optimizer trains in turn, switching requires_grad (BAdam)


def trains(param: Any) -> bool:
    """Whether the run trains `param`: requires_grad, or requires_grad off only until its turn comes (BAdam,
    pipeline.train.badam, trains one decoder layer at a time). Checkpoints and exports hold what this says: a
    layer BAdam trained and left is trained weight, not the base's."""
    return bool(param.requires_grad or getattr(param, IN_TURN, False))


def module_state_dict(self: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False,
                      exclude_frozen_parameters: bool = False) -> Any:
    """DeepSpeedEngine.module_state_dict, leaving out frozen parameters under every name they have."""
    state = self.module.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
    if exclude_frozen_parameters:
        for name, param in self.module.named_parameters(remove_duplicate=False):
            if not trains(param):
                state.pop(prefix + name, None)
    return state


def exclude_frozen_aliases(engine: Any) -> None:
    """Replace the engine's module_state_dict with `module_state_dict` above.

    DeepSpeed drops frozen parameters by their first name only, so a frozen tied output head
    (lm_head.weight = wte.weight) was written into every LoRA checkpoint.
    """
    _require(callable(getattr(engine, "module_state_dict", None)), "exclude_frozen_aliases",
             "the engine has no module_state_dict")
    engine.module_state_dict = types.MethodType(module_state_dict, engine)


# ZeRO 1-2's partitioned optimizer (stage_1_and_2.DeepSpeedZeroOptimizer): one file per data-parallel rank, named
# with a "bf16_" prefix under bf16 (DeepSpeedEngine._get_zero_ckpt_prefix)
ZERO_OPTIM_FILE = re.compile(r"^(?P<prefix>(?:bf16_)?)zero_pp_rank_(?P<rank>\d+)_mp_rank_00_optim_states\.pt$")
MODEL_STATES_FILE = "mp_rank_00_model_states.pt"  # ZeRO 0-2: the module, counters, scheduler (ZeRO 0: optimizer)
ZERO3_MODEL_STATES_FILE = re.compile(r"^zero_pp_rank_(?P<rank>\d+)_mp_rank_00_model_states\.pt$")  # ZeRO 3: per rank


def offload_problem(offload_optimizer: str) -> str | None:
    """Why an optimizer state offloaded to `offload_optimizer` (none, cpu or nvme) cannot be read by another number
    of ranks (None: it can). The one decision and its wording: check_compatible asks it with the recipe's value
    (which is the DeepSpeed config's: recipe.dsconfig adopts it) before any engine exists, reshard_problem with the
    engine's. NVMe offload swaps the state through DeepSpeed's own files (its swap_optimizer), which resharded_loads
    does not rebuild; cpu offload writes the same per-rank partitions as none."""
    if offload_optimizer != "nvme":
        return None
    return ("the optimizer state offloaded to NVMe (offload_optimizer: nvme) is swapped through DeepSpeed's own "
            "files, which are not rebuilt for another rank count (offload_optimizer: cpu is)")


def offload_device(engine: Any) -> str:
    """Where the engine's ZeRO config offloads the optimizer state (none, cpu or nvme): its offload_optimizer.device,
    the DeepSpeed config's value, which recipe.dsconfig adopts as the recipe's offload_optimizer, so that
    offload_problem is asked the same question by check_compatible (the recipe's) and reshard_problem (this)."""
    device = getattr(engine.zero_offload_optimizer(), "device", None)  # no offload_optimizer section: None
    return "none" if device is None else str(getattr(device, "value", device))  # OffloadDeviceEnum


def reshard_problem(engine: Any) -> str | None:
    """Why this engine cannot read a checkpoint written by another number of ranks (None: resharded_loads can).

    ZeRO 0 keeps the whole optimizer state in the model-states file, the same for any rank count (DeepSpeed's
    unfused fp16/bf16 wrapper too). ZeRO 1-2 cut one flat fp32 buffer per param group into equal partitions, the
    last one padded, and so does DeepSpeed's BF16_Optimizer (bf16 at ZeRO 1 with data_types.grad_accum_dtype fp32:
    its own class, the same bf16_zero_pp_rank_* files, its fp32 partitions saved with their padding); ZeRO 3 cuts
    every parameter on its own: all rebuilt here (zero12_partition, zero3_partition). offload_optimizer: cpu
    changes where the partitions live, not what DeepSpeed writes (the same state_dict, its tensors on the CPU);
    NVMe offload swaps the optimizer state through files of its own, which is not rebuilt (offload_problem)."""
    stage = engine.zero_optimization_stage()
    kind = type(engine.optimizer).__name__
    offloaded = offload_problem(offload_device(engine))
    if offloaded:
        return offloaded
    wanted = {1: ("DeepSpeedZeroOptimizer", "BF16_Optimizer"), 2: ("DeepSpeedZeroOptimizer",),
              3: ("DeepSpeedZeroOptimizer_Stage3",)}
    if stage in wanted and kind not in wanted[stage]:
        return f"zero_stage {stage} with DeepSpeed's {kind} keeps partitions this trainer does not rebuild"
    return None


@contextlib.contextmanager
def resharded_loads(engine: Any, saved_world: int) -> Iterator[None]:
    """Inside, engine.load_checkpoint reads a ZeRO 0-3 checkpoint written by `saved_world` data-parallel ranks as
    if this run's ranks had written it (the engine's checkpoint engine answers in their place; each rank reads the
    saved optimizer files its partition overlaps). DeepSpeed itself refuses another DP world size ("Automatic adjustment of ZeRO's
    optimizer state partitioning with a new world size is not currently supported").

    Each rank's file becomes the rigid state DeepSpeed writes for its partition: the slices of the saved ranks' fp32
    masters and Adam moments that fall into this rank's partition of the flat group, padded as this engine pads it
    (zero12_partition; ZeRO 3: each parameter's pieces, zero3_partition). ZeRO 3 also writes the model states per
    rank (zero_pp_rank_<r>_mp_rank_00_model_states.pt: the same counters, scheduler and client state on every
    rank): a rank the checkpoint did not have reads rank 0's. Exact: values are moved, never recomputed."""
    from deepspeed import comm

    problem = reshard_problem(engine)
    _require(problem is None, "resharded_loads", problem or "")
    store = engine.checkpoint_engine
    plain = store.load
    world = engine.dp_world_size
    rank = comm.get_rank(group=engine.optimizer.dp_process_group) if engine.zero_optimization_stage() else 0
    partition = zero3_partition if engine.zero_optimization_stage() == 3 else zero12_partition
    names = engine._get_all_ckpt_names  # ZeRO 3: globs this rank's model states file, which a new rank lacks

    def saved_names(folder: str, tag: str) -> list[str]:
        return names(folder, tag) or [os.path.join(folder, str(tag), "zero_pp_rank_0_mp_rank_00_model_states.pt")]

    def load(path: str, map_location: Any = None) -> Any:
        folder, name = os.path.split(str(path))
        if name == MODEL_STATES_FILE or ZERO3_MODEL_STATES_FILE.match(name):
            state = plain(path, map_location)
            _require("dp_world_size" in state, "resharded_loads", "the model states have no dp_world_size")
            return {**state, "dp_world_size": world}
        match = ZERO_OPTIM_FILE.match(name)
        if match:  # DeepSpeed reads this rank's file alone: the saved ranks' answer for it
            _require(int(match["rank"]) == rank, "resharded_loads", f"DeepSpeed read {name} on rank {rank}")
            outer: list[dict[str, Any]] = []  # the first file read's other keys (ds_config, ds_version), kept

            def read(saved_rank: int) -> Any:
                saved_name = f"{match['prefix']}zero_pp_rank_{saved_rank}_mp_rank_00_optim_states.pt"
                saved = plain(os.path.join(folder, saved_name), map_location)
                outer.append({k: v for k, v in saved.items() if k != "optimizer_state_dict"})
                return saved["optimizer_state_dict"]  # not kept here: its memory goes once partition is done with it

            state = partition(engine.optimizer, read, saved_world, rank, world)
            return {**outer[0], "optimizer_state_dict": state}
        return plain(path, map_location)

    store.load, engine._get_all_ckpt_names = load, saved_names
    try:
        yield
    finally:
        del store.load, engine._get_all_ckpt_names  # the classes' own methods again


def flat_groups(optimizer: Any) -> list[tuple[int, int, int, int]]:
    """Per param group of a ZeRO 1-2 optimizer (DeepSpeedZeroOptimizer, or BF16_Optimizer: the same flat layout under
    other attribute names, without padding between parameters): this rank's partition size, its padding (the last
    rank's), the group's length without that padding, the flat group's length (partition size x ranks)."""
    if type(optimizer).__name__ == "BF16_Optimizer":
        return [(part.numel(), padding, sum(p.numel() for p in params), flat.numel()) for part, padding, params, flat
                in zip(optimizer.fp32_groups_flat_partition, optimizer.group_paddings, optimizer.bf16_groups,
                       optimizer.bf16_groups_flat)]
    return [(part.numel(), padding, sum(p.numel() for p in params) + sum(gaps), flat.numel())
            for part, padding, params, gaps, flat
            in zip(optimizer.single_partition_of_fp32_groups, optimizer.groups_padding,
                   optimizer.round_robin_bit16_groups, optimizer.round_robin_bit16_padding, optimizer.bit16_groups_flat)]


def zero12_partition(optimizer: Any, read: Callable[[int], dict[str, Any]], saved_world: int, rank: int,
                     world: int) -> dict[str, Any]:
    """Rank `rank` of `world`'s ZeRO 1-2 optimizer state (DeepSpeedZeroOptimizer.state_dict's rigid layout, or
    BF16_Optimizer.state_dict's) from the states saved by the `saved_world` ranks of another run (the same param
    groups, another partition size); `read(s)` gives saved rank s's. `optimizer`: this run's DeepSpeedZeroOptimizer
    or BF16_Optimizer, whose partition sizes and paddings are the layout wanted (flat_groups).

    Only the saved partitions that overlap this rank's are read (each holds one rank's share of the fp32 masters
    and both Adam moments: reading all of them would put the whole optimizer state in every rank's memory). The
    saved partition size follows from DeepSpeed's layout: the flat group padded to a multiple of
    nccl_start_alignment_factor x ranks, cut into equal partitions, the padding on the last."""
    import torch
    from deepspeed.checkpoint import constants as keys

    align = optimizer.nccl_start_alignment_factor
    layout = []  # per param group: this rank's partition size and padding, the group's size, the saved partition size
    for i, (size, padding, whole, flat) in enumerate(flat_groups(optimizer)):
        _require(flat == size * world, "resharded_loads", f"param group {i} is not cut into {world} equal partitions")
        layout.append((size, padding, whole, -(-whole // (align * saved_world)) * align))

    def overlapping(size: int, whole: int, saved_size: int) -> range:
        low, high = rank * size, min((rank + 1) * size, whole)
        return range(low // saved_size, (high - 1) // saved_size + 1) if high > low else range(0)

    needed = sorted({s for size, _, whole, saved_size in layout for s in overlapping(size, whole, saved_size)})
    saved = {s: read(s) for s in needed or [0]}
    first = saved[min(saved)]
    base = first[keys.BASE_OPTIMIZER_STATE]
    _require(isinstance(base, dict) and "state" in base, "resharded_loads",
             "the saved ZeRO state is not the rigid layout (optimizer.state_dict())")
    fp32, states = [], {}
    for i, (size, padding, whole, saved_size) in enumerate(layout):
        lean = {s: sd[keys.SINGLE_PARTITION_OF_FP32_GROUPS][i].flatten() for s, sd in saved.items()}
        _require(all(part.numel() in (min(saved_size, whole - s * saved_size), saved_size)
                     for s, part in lean.items()),
                 "resharded_loads", f"param group {i}: the saved partitions are not DeepSpeed's layout")
        lean = {s: part[:min(saved_size, whole - s * saved_size)] for s, part in lean.items()}  # BF16_Optimizer's pad

        def mine(piece: Callable[[int], Any], dtype: Any) -> Any:
            """This rank's partition of the group, from piece(s): saved rank s's values, without padding."""
            out, low = torch.zeros(size, dtype=dtype), rank * size
            for s in overlapping(size, whole, saved_size):
                part, start = piece(s), s * saved_size
                a, b = max(low, start), min(low + size, start + part.numel())
                out[a - low:b - low] = part[a - start:b - start]
            return out

        fp32.append(mine(lean.__getitem__, lean[min(lean)].dtype)[:size - padding])
        _require(base["param_groups"][i]["params"] == [i], "resharded_loads", "one flat parameter per param group")
        group = {}
        for key, value in base["state"][i].items():  # Adam's exp_avg / exp_avg_sq: partitions (padded); step: not
            cut = torch.is_tensor(value) and value.dim() == 1 and value.numel() == saved_size
            group[key] = mine(lambda s: saved[s][keys.BASE_OPTIMIZER_STATE]["state"][i][key][:lean[s].numel()],
                              value.dtype) if cut else value
        states[i] = group
    return {**first, keys.BASE_OPTIMIZER_STATE: {"state": states, "param_groups": base["param_groups"]},
            keys.SINGLE_PARTITION_OF_FP32_GROUPS: fp32, keys.GROUP_PADDINGS: [padding for _, padding, _, _ in layout],
            keys.PARTITION_COUNT: list(optimizer.partition_count),
            keys.PARAM_SLICE_MAPPINGS: optimizer._param_slice_mappings}


def zero3_partition(optimizer: Any, read: Callable[[int], dict[str, Any]], saved_world: int, rank: int,
                    world: int) -> dict[str, Any]:
    """Rank `rank` of `world`'s ZeRO 3 optimizer state (DeepSpeedZeroOptimizer_Stage3._rigid_state_dict's layout)
    from the states saved by the `saved_world` ranks of another run; `read(s)` gives saved rank s's.

    ZeRO 3 cuts every parameter on its own into `ranks` pieces of ceil(numel / ranks), the last padded, and a rank's
    flat fp32 sub-group is its pieces of the sub-group's parameters one after another (fp32_partitioned_groups_flat;
    the Adam moments alike). Every parameter has a piece on every saved rank, so each rank reads every saved file,
    one at a time (peak: one saved rank's share of the fp32 masters and moments beside this rank's own)."""
    import torch
    from deepspeed.checkpoint import constants as keys

    params = [p for group in optimizer.fp16_groups for p in group]  # the sub-groups' parameters, in order
    numels = [p.ds_numel for p in params]
    mine = [p.partition_numel() for p in params]
    theirs = [-(-n // saved_world) for n in numels]
    groups = [len(group) for group in optimizer.fp16_groups]
    _require([sum(mine[sum(groups[:i]):sum(groups[:i + 1])]) for i in range(len(groups))]
             == [flat.numel() for flat in optimizer.fp32_partitioned_groups_flat], "resharded_loads",
             "the ZeRO 3 sub-groups are not their parameters' partitions one after another")

    def offsets(sizes: list[int]) -> list[int]:
        return [sum(sizes[:k]) for k in range(len(sizes))]

    def flat(value: Any) -> bool:  # Adam's exp_avg / exp_avg_sq are laid out like the masters; its step is not
        return torch.is_tensor(value) and value.dim() == 1

    at_mine, at_theirs = offsets(mine), offsets(theirs)
    kept: dict[str, Any] = {}  # saved rank 0's state less its partitions (loss scaler, param groups, Adam's step)
    out: dict[str, Any] = {}  # "fp32" and each Adam moment: this rank's flat over all sub-groups
    for s in range(saved_world):
        sd = read(s)
        base = sd[keys.OPTIMIZER_STATE_DICT]
        _require(isinstance(base, dict) and sorted(base.get("state", {})) == list(range(len(groups))),
                 "resharded_loads", "the saved ZeRO 3 state is not the rigid layout with this run's sub-groups")
        if not kept:
            kept = {**{k: v for k, v in sd.items() if k not in (keys.OPTIMIZER_STATE_DICT, keys.FP32_FLAT_GROUPS)},
                    "param_groups": base["param_groups"],
                    "state": {i: {k: v for k, v in base["state"][i].items() if not flat(v)} for i in base["state"]}}
        flats = {"fp32": torch.cat([t.flatten() for t in sd[keys.FP32_FLAT_GROUPS]])}
        for key, value in base["state"][0].items():
            if flat(value):
                flats[key] = torch.cat([base["state"][i][key].flatten() for i in range(len(groups))])
        for key, values in flats.items():
            _require(values.numel() == sum(theirs), "resharded_loads",
                     f"saved rank {s}'s {key} is not {saved_world} ranks' ZeRO 3 partitions of these parameters")
            target = out.setdefault(key, torch.zeros(sum(mine), dtype=values.dtype))
            for n, size, at, saved_size, saved_at in zip(numels, mine, at_mine, theirs, at_theirs):
                low, high = max(rank * size, s * saved_size), min((rank + 1) * size, (s + 1) * saved_size, n)
                if high > low:  # the part of this parameter both pieces hold (padding stays zero)
                    target[at + low - rank * size:at + high - rank * size] = \
                        values[saved_at + low - s * saved_size:saved_at + high - s * saved_size]
        del sd, base, flats  # the next saved rank's file replaces this one
    state, param_groups = kept.pop("state"), kept.pop("param_groups")
    cuts = offsets([part.numel() for part in optimizer.fp32_partitioned_groups_flat]) + [sum(mine)]
    moments = {i: {**state[i], **{k: v[cuts[i]:cuts[i + 1]].clone() for k, v in out.items() if k != "fp32"}}
               for i in range(len(groups))}
    return {**kept, keys.OPTIMIZER_STATE_DICT: {"state": moments, "param_groups": param_groups},
            keys.FP32_FLAT_GROUPS: [out["fp32"][cuts[i]:cuts[i + 1]].clone() for i in range(len(groups))],
            keys.PARTITION_COUNT: optimizer.partition_count}


# ---------------------------------------------------------------------------------------------- optimizer state

def fp32_master(engine: Any, param: Any) -> Any:
    """The complete fp32 value of a trainable parameter (a collective under ZeRO-3: every rank calls it)."""
    from deepspeed.utils import safe_get_full_fp32_param

    value = safe_get_full_fp32_param(param)
    if value is not None:
        return value
    optimizer = engine.optimizer  # stage 0 with bf16/fp16: DeepSpeed's unfused wrapper keeps the fp32 copies
    for low, high in zip(getattr(optimizer, "fp16_groups", ()), getattr(optimizer, "fp32_groups", ())):
        for p_low, p_high in zip(low, high):
            if p_low is param:
                return p_high
    return param  # fp32 without ZeRO: the parameter is its own master


def loss_scale(engine: Any) -> float | None:
    """The current fp16 loss scale, or None when the optimizer has none."""
    optimizer = engine.optimizer
    for name in ("cur_scale", "loss_scale"):
        value = getattr(optimizer, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    return None


def reports_grad_norm(engine: Any) -> bool:
    """Whether engine.get_global_grad_norm() gives the pre-clip norm after a step.

    DeepSpeed keeps it under ZeRO and mixed precision; fp32 without ZeRO clips but does not keep the value,
    so the trainer measures the same quantity itself there.
    """
    return bool(engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled())


# ---------------------------------------------------------------------------------------------- ZeRO-3 leaves

def z3_leaf_modules(model: Any, classes: list[type]) -> None:
    """Mark every module of `classes` in `model` a ZeRO-3 leaf: DeepSpeed gathers its parameters (its whole
    subtree's) when it runs, not module by module below it (deepspeed.utils.set_z3_leaf_modules, which LLaMA-Factory
    calls for MoE blocks). Its module path is not one DeepSpeed documents as public. No classes: nothing to do."""
    if not classes:
        return
    try:
        from deepspeed.utils import set_z3_leaf_modules
    except ImportError as err:
        raise IncompatibleDeepSpeed(f"z3_leaf_modules: deepspeed.utils.set_z3_leaf_modules is gone ({err})") from None
    set_z3_leaf_modules(model, classes)


# ---------------------------------------------------------------------------------------------- generation

@contextlib.contextmanager
def gathered_for_generation(engine: Any) -> Iterator[Any]:
    """engine.module with every parameter whole and no DeepSpeed hook on its modules, for decoding (stage ppo's
    rollouts); outside ZeRO-3 the module as it is.

    Why: under ZeRO-3 every module's forward gathers its partitioned weights from all ranks (a collective) and
    releases them after. Decoding runs one forward per new token, and ranks whose responses end at different
    lengths would run different numbers of forwards: the ranks wait on each other's gathers forever, and each
    token pays a gather of every layer. DeepSpeed's unwrap_model_for_generation (deepspeed.runtime.zero.stage3,
    the same steps as TRL 0.9.6's trl/models/utils.py:152-166, which LLaMA-Factory's PPO runs) gathers every
    parameter once (GatheredParameters: a whole copy beside the partitions), removes the module hooks, and on
    exit registers them again and releases the whole copies. Every rank must enter (the gather is a collective);
    inside, each decodes alone."""
    if engine.zero_optimization_stage() != 3:
        yield engine.module
        return
    from deepspeed.runtime.zero import unwrap_model_for_generation

    _require(hasattr(engine.optimizer, "parameter_offload"), "gathered_for_generation",
             "the ZeRO-3 optimizer has no parameter_offload (its module hooks)")
    with unwrap_model_for_generation(engine):
        yield engine.module


# ---------------------------------------------------------------------------------------------- config

def validate_config(config: dict[str, Any], world_size: int = 1) -> None:
    """Run DeepSpeed's own config models over a config; raises pydantic.ValidationError on a bad key or value.
    `world_size`: the ranks of the run the config is for. DeepSpeedConfig checks train_batch_size against micro
    batch x accumulation x the world size of deepspeed.comm, which is 1 before the ranks meet (overwrite_cache's
    checks before the build, pipeline.train.run.check_start), or another process group's where one process met
    others before (a test process whose one-rank train initialised it): there it checks the share of the batch of
    the ranks deepspeed.comm has."""
    guard()
    from deepspeed import comm
    from deepspeed.runtime.config import DeepSpeedConfig

    met = comm.get_world_size() if comm.is_initialized() else 1
    if world_size != met and isinstance(config.get("train_batch_size"), int):
        config = {**config, "train_batch_size": config["train_batch_size"] * met // world_size}
    DeepSpeedConfig(config)


def section_keys(model_title: str) -> list[str] | None:
    """The keys DeepSpeed's config model named `model_title` (a pydantic error's title) accepts, or None."""
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    todo: list[type] = [DeepSpeedConfigModel]
    while todo:
        cls = todo.pop()
        if cls.__name__ == model_title:
            return sorted({f.alias or name for name, f in cls.model_fields.items()})
        todo.extend(cls.__subclasses__())
    return None
