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

A command for another rank count than this run's (a checkpoint written by 8 ranks, resumed by a job of 16) is this
launch on its nodes with that count shared between them (Launch.on: `--num_gpus 4` on the same 2 nodes), not
`NPROC=8` on one machine. A command typed node by node (--nnodes without ssh) is shown as node 0 types it
(`--node_rank 0`, the machine MASTER_ADDR names), with the other nodes' NODE_RANK in words (Launch.where): this
node's own value, shown before, was right on this node alone.

Which processes are ranks: RANK is a launcher's only in a process it started. A command no launcher runs
(RANKED: everything but train and eval) in an environment without the launcher's other variables (a Kubeflow pod
sets RANK and WORLD_SIZE for its own reasons; LOCAL_RANK comes with a launcher's ranks) is one process, rank 0 of
one (stray_rank), and says its notes.
"""
from __future__ import annotations

import os
import shlex
import socket
from dataclasses import dataclass
from typing import Mapping
from urllib.parse import quote, unquote

LAUNCH_ENV = "PYTHON_PIPELINE_LAUNCH"
# the commands a launcher starts on ranks (the Makefile's $(LAUNCH) runs train, its dry run and eval); the others run
# in one process (pipeline.rerun.LAUNCHED: the make goals of these)
RANKED = ("train", "eval")
# pipeline.launch's options the Makefile has a variable for (its LAUNCH line), in the order `make` is shown with
MAKE_OPTIONS = {"--num_gpus": "NPROC", "--hostfile": "HOSTFILE", "--nnodes": "NNODES", "--node_rank": "NODE_RANK",
                "--master_addr": "MASTER_ADDR", "--master_port": "MASTER_PORT"}


def first_rank(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process is rank 0 of its job, the one that says what every rank would say (a note, a progress
    bar): RANK, which every launcher sets before the ranks start and a plain process lacks (one a launcher did not
    give this process is gone by now: stray_rank). Asked from the environment, not torch.distributed, because the
    ranks talk before they meet (resolving the recipe, loading the model, train's checks);
    pipeline.runtime.dist.rank agrees with it once they have."""
    return (environ.get("RANK") or "0") == "0"


def among_ranks(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether a launcher started this process as one of several ranks: WORLD_SIZE above 1 and LOCAL_RANK, which
    DeepSpeed's launcher and torchrun give every rank they start (a Kubeflow pod's RANK and WORLD_SIZE come
    without it)."""
    world = environ.get("WORLD_SIZE", "")
    return world.isdigit() and int(world) > 1 and bool(environ.get("LOCAL_RANK"))


def job_of(environ: Mapping[str, str] = os.environ) -> str | None:
    """This job's name, the same on each of its ranks and on no other live job: MASTER_ADDR:MASTER_PORT, where its
    rank 0 serves torch's store for the job's life (a loopback address with this host's name before it: jobs on
    two machines may both use 127.0.0.1:29500). None for a process that is not one of several ranks. Rank 0 writes
    it into the lock it takes on output_dir (pipeline.lock), so that its other ranks, which look at that lock before
    the build, know their own job's."""
    world, address, port = (environ.get(name, "") for name in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
    if not (world.isdigit() and int(world) > 1 and address and port):
        return None
    loopback = address == "localhost" or address.startswith("127.") or address == "::1"
    return f"{socket.gethostname() + '/' if loopback else ''}{address}:{port}"


def stray_rank(command: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether RANK in `environ` is not this process's rank: `command` is one no launcher starts on ranks (RANKED),
    and no launcher started this process among others (among_ranks). `python -m pipeline` then drops it, so that
    resolving the recipe (RANK below WORLD_SIZE), first_rank and dist.rank take the process for rank 0 of one: a
    merge in a shell that kept a RANK of 3 said nothing of its notes (or was refused: RANK=3 is not below
    WORLD_SIZE=1). train and eval believe RANK as they find it: a job may start them without LOCAL_RANK (one process
    per pod), and rank 0 alone takes train's lock."""
    return command not in RANKED and "RANK" in environ and not among_ranks(environ)


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
        """What a message adds after the command: on which nodes it is typed, or how it is launched when unknown.
        Node by node, the command is node 0's (launch_of gives it --node_rank 0: right where MASTER_ADDR is, and
        refused by pipeline.nodes on any other machine) and the other nodes' NODE_RANK is said in words."""
        if self.options is None:
            return f", launched on {self.ranks} ranks as you launched this run (its nodes, its launcher)"
        if not self.node_by_node():
            return ""
        pairs = self.pairs() or {}
        nodes, address = int(pairs["--nnodes"]), pairs.get("--master_addr", "")
        others = ("with NODE_RANK=1 (--node_rank 1) on the other node" if nodes == 2 else
                  f"on each other node with its NODE_RANK, 1 to {nodes - 1} (--node_rank)")
        return f" on node 0 (MASTER_ADDR{' ' + address if address else ''}), and the same {others}"

    def on(self, ranks: int, nodes: int | None) -> Launch:
        """This launch as a command on `ranks` ranks typed on node 0: --node_rank 0 where each node starts its own
        part, and for another rank count its `nodes` with ranks / nodes each (--num_gpus); where that cannot be said
        (options make has no variable for, such as --include, or a count the nodes cannot share), the launch is
        unknown: "launched on N ranks as you launched this run"."""
        if self.options is None or (ranks == self.ranks and self.pairs() is None):
            return self if ranks == self.ranks else Launch(ranks, None)
        options = _set(self.options, "--node_rank", "0") if self.node_by_node() else self.options
        if ranks != self.ranks:
            pairs = self.pairs()
            if pairs is None or any(name not in MAKE_OPTIONS for name in pairs) or not nodes or ranks % nodes:
                return Launch(ranks, None)
            options = _set(options, "--num_gpus", str(ranks // nodes))
        return Launch(ranks, options)

    def nodes(self, environ: Mapping[str, str]) -> int | None:
        """How many nodes this launch's ranks are on: --nnodes, a hostfile's hosts (its ranks / --num_gpus, else
        / this node's), one without either; for an unknown launch its ranks / this node's. None: not known."""
        pairs = self.pairs() if self.options is not None else None
        if pairs is not None and "--nnodes" in pairs:
            return int(pairs["--nnodes"]) if pairs["--nnodes"].isdigit() else None
        if pairs is not None and "--hostfile" not in pairs:
            return 1
        each = (pairs or {}).get("--num_gpus", "") or environ.get("LOCAL_SIZE") or environ.get("LOCAL_WORLD_SIZE") or ""
        return self.ranks // int(each) if each.isdigit() and int(each) and self.ranks % int(each) == 0 else None

    def spans_nodes(self, environ: Mapping[str, str] = os.environ) -> bool:
        """Whether the job is on several nodes: an unknown launch is (launch_of finds one only there), a hostfile's
        where its count is unknown."""
        return self.options is None or (self.nodes(environ) or 2) > 1


def launch_of(ranks: int, environ: Mapping[str, str] = os.environ) -> Launch | None:
    """The launch a command on `ranks` ranks reproduces, as typed on node 0 (Launch.on): this process's
    (LAUNCH_ENV), on its nodes with `ranks` shared between them where that is another count than its WORLD_SIZE (a
    checkpoint's), Launch(options=None) for a run on several nodes whose launch is unknown, and None for the rest
    (one process, or ranks on one node: `NPROC=ranks` is that launch). The variable is believed only where a
    launcher gave this process its WORLD_SIZE and its options start that many ranks (Launch.started): a shell that
    exported it holds another launch's (a process a rank starts inherits WORLD_SIZE too, and is taken for a rank of
    that launch, as resolve takes it)."""
    world = environ.get("WORLD_SIZE", "")
    this = _this_run(int(world), environ) if world.isdigit() and int(world) > 0 else None
    return this.on(ranks, this.nodes(environ)) if this is not None else None


def _this_run(world: int, environ: Mapping[str, str]) -> Launch | None:
    """The launch of this run of `world` ranks, as launch_of believes it (options as given)."""
    launch = _given(world, environ.get(LAUNCH_ENV, ""))
    if launch is not None and launch.started() in (None, world):
        return launch
    local = environ.get("LOCAL_SIZE") or environ.get("LOCAL_WORLD_SIZE") or ""
    if local.isdigit() and 0 < int(local) < world:
        return Launch(world, None)
    return None


def _set(options: tuple[str, ...], name: str, value: str) -> tuple[str, ...]:
    """`options` with option `name` set to `value` where it is (`--name v` or `--name=v`, as typed), else added."""
    out, words = [], list(options)
    found = False
    while words:
        word = words.pop(0)
        if word == name and words:
            out += [word, value]
            words.pop(0)
            found = True
        elif word.startswith(name + "="):
            out.append(f"{name}={value}")
            found = True
        else:
            out.append(word)
    return tuple(out if found else [*out, name, value])


def _given(ranks: int, value: str) -> Launch | None:
    """The Launch LAUNCH_ENV's `value` names; None for none, or for a value encode never writes (unbalanced quotes)."""
    try:
        return Launch(ranks, tuple(shlex.split(unquote(value)))) if value else None
    except ValueError:
        return None
