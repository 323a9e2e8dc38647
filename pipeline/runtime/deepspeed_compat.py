"""Every place the pipeline relies on DeepSpeed internals, in one file: a DeepSpeed upgrade reads this.

DeepSpeed's public API (initialize, init_distributed, engine.backward/step/save_checkpoint/load_checkpoint,
get_accelerator) is used directly elsewhere. What is here depends on how one DeepSpeed release is built
inside — private attributes, a method replaced on the engine, a base class subclassed, class names written
into checkpoints — and each item was read against the release in TESTED. `guard()` says so when another
release is installed; `tests/runtime/test_deepspeed_compat.py` has one test per item that fails on a
release where the item no longer holds, naming it.

  item                         why                                                       used by
  skip_shm_build               no ~75 s JIT build of a CPU shared-memory allreduce        runtime dist init
  SafeCheckpointEngine         DeepSpeed's save/load without pickle (CheckpointEngine)   train.checkpoint
  exclude_frozen_aliases       no frozen tied head in LoRA checkpoints (module_state_dict) train.checkpoint
                               (frozen: not `trains`; BAdam's resting layers are kept)
  HELPER_SCRIPTS               recovery scripts DeepSpeed copies into a checkpoint        train.checkpoint
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

def validate_config(config: dict[str, Any]) -> None:
    """Run DeepSpeed's own config models over a config; raises pydantic.ValidationError on a bad key or value."""
    guard()
    from deepspeed.runtime.config import DeepSpeedConfig

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
