"""How this process's run was launched, for the command a message tells the user to run (pipeline.rerun).

A run on several nodes has WORLD_SIZE = NPROC x nodes; a command rebuilt from that count alone (`make train
NPROC=16`) starts 16 ranks on one machine, or fails, instead of the job the user launched. pipeline.launch therefore
exports the launcher options it was given (`--hostfile hf --num_gpus 8`, `--nnodes 2 --node_rank R --master_addr A
--num_gpus 8`: those before `--module`, as typed, not the DeepSpeed form pipeline.nodes makes of them) in LAUNCH_ENV,
the one record of the launch, which every rank inherits; `make plan` sets it from what make knows, so plan's messages
name the same command.

The name starts with PYTHON because DeepSpeed's multi-node runners (pdsh over ssh, mpirun, srun) pass the ranks on
the other nodes only the variables whose names start with one of its EXPORT_ENVS (MLFLOW, PYTHON, MV2, UCX) or are
listed in a .deepspeed_env file (which would be the user's file to write); with --no_ssh the runner starts the ranks
with its own environment. pdsh's form writes `export NAME=VALUE;` unquoted into a remote shell, so the value is
percent-encoded (urllib.parse.quote: letters, digits and `_.-~%` only) and survives any shell.

A run whose ranks span several nodes (WORLD_SIZE above this node's LOCAL_SIZE, DeepSpeed's, or LOCAL_WORLD_SIZE,
torchrun's) without the variable was started some other way (DeepSpeed's or torchrun's launcher typed directly, a
scheduler): its launch is unknown, and a message says to run the command "as you launched this run" rather than
print a single-node command that would be another job.
"""
from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from typing import Mapping
from urllib.parse import quote, unquote

LAUNCH_ENV = "PYTHON_PIPELINE_LAUNCH"
# pipeline.launch's options the Makefile has a variable for (its LAUNCH line), in the order `make` is shown with
MAKE_OPTIONS = {"--num_gpus": "NPROC", "--hostfile": "HOSTFILE", "--nnodes": "NNODES", "--node_rank": "NODE_RANK",
                "--master_addr": "MASTER_ADDR", "--master_port": "MASTER_PORT"}


def first_rank(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process is rank 0 of its job, the one that says what every rank would say (a note, a progress
    bar): RANK, which every launcher sets before the ranks start and a plain process lacks. Asked from the
    environment, not torch.distributed, because the ranks talk before they meet (resolving the recipe, loading the
    model, train's checks); pipeline.runtime.dist.rank agrees with it once they have."""
    return (environ.get("RANK") or "0") == "0"


def encode(options: list[str]) -> str:
    """LAUNCH_ENV's value for pipeline.launch's `options` (a shell-safe word: see the module docstring)."""
    return quote(shlex.join(options), safe="")


@dataclass(frozen=True)
class Launch:
    """The launch of a run on `ranks` ranks: pipeline.launch's `options` as given, or None where they are unknown
    (several nodes, started without pipeline.launch)."""
    ranks: int
    options: tuple[str, ...] | None

    def pairs(self) -> dict[str, str] | None:
        """The options as {--name: value} (`--name value` or `--name=value`); None when one is not of that form."""
        found: dict[str, str] = {}
        words = list(self.options or ())
        while words:
            word = words.pop(0)
            if not word.startswith("--") or ("=" not in word and not words):
                return None
            name, value = word.split("=", 1) if "=" in word else (word, words.pop(0))
            found[name] = value
        return found

    def make_variables(self) -> list[str] | None:
        """`NPROC=8 HOSTFILE=hf ...`, the make variables that launch the same job (the Makefile's LAUNCH line), in
        MAKE_OPTIONS's order; None when an option has no make variable (`--include`), or --num_gpus is not given
        (make's NPROC=1 would start one process): the python -m form alone."""
        pairs = self.pairs()
        if pairs is None or "--num_gpus" not in pairs or any(name not in MAKE_OPTIONS for name in pairs):
            return None
        return [f"{variable}={pairs[name]}" for name, variable in MAKE_OPTIONS.items() if name in pairs]

    def started(self) -> int | None:
        """The ranks the options start: --num_gpus on each of --nnodes nodes (one by default); None where they do
        not say (a hostfile's hosts, or options without --num_gpus: DeepSpeed's own count)."""
        pairs = self.pairs()
        if pairs is None or "--hostfile" in pairs or any(name not in MAKE_OPTIONS for name in pairs):
            return None
        gpus, nodes = pairs.get("--num_gpus", ""), pairs.get("--nnodes", "1")
        return int(gpus) * int(nodes) if gpus.isdigit() and nodes.isdigit() else None

    def node_by_node(self) -> bool:
        """Whether each node starts its own part (NNODES > 1, no ssh): the command is typed on every node."""
        nodes = (self.pairs() or {}).get("--nnodes", "1")
        return nodes.isdigit() and int(nodes) > 1

    def where(self) -> str:
        """What a message adds after the command: on which nodes it is typed, or how it is launched when unknown."""
        if self.options is None:
            return f", launched on {self.ranks} ranks as you launched this run (its nodes, its launcher)"
        if self.node_by_node():
            return " on every node, with its NODE_RANK (0 on MASTER_ADDR)"
        return ""


def launch_of(ranks: int, environ: Mapping[str, str] = os.environ) -> Launch | None:
    """The launch a command on `ranks` ranks reproduces: this process's (LAUNCH_ENV) when it runs on as many
    (WORLD_SIZE; a checkpoint's other rank count is another launch), Launch(options=None) for a run on several
    nodes whose launch is unknown, and None for the rest (one process, or ranks on one node: `NPROC=ranks` is that
    launch). The variable is believed only where a launcher gave this process its WORLD_SIZE and its options start
    that many ranks (Launch.started): a shell that exported it holds another launch's
    (a process a rank starts inherits WORLD_SIZE too, and is taken for a rank of that launch, as resolve takes it)."""
    world = environ.get("WORLD_SIZE", "")
    if not world.isdigit() or int(world) != ranks:
        return None
    launch = _given(ranks, environ.get(LAUNCH_ENV, ""))
    if launch is not None and launch.started() in (None, ranks):
        return launch
    local = environ.get("LOCAL_SIZE") or environ.get("LOCAL_WORLD_SIZE") or ""
    if local.isdigit() and 0 < int(local) < ranks:
        return Launch(ranks, None)
    return None


def _given(ranks: int, value: str) -> Launch | None:
    """The Launch LAUNCH_ENV's `value` names; None for none, or for a value encode never writes (unbalanced quotes)."""
    try:
        return Launch(ranks, tuple(shlex.split(unquote(value)))) if value else None
    except ValueError:
        return None
