"""`python -m pipeline <command> RECIPE [key=value ...]`: the one entry point the Makefile calls.

Commands are imported lazily so that `validate` and `plan` never import torch.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Any

from pipeline.errors import UserError, did_you_mean, print_errors
from pipeline.launched import first_rank, job_of, stray_rank

# command -> (module, function, one-line help). Each function takes (Resolved, argparse.Namespace).
COMMANDS: dict[str, tuple[str, str, str]] = {
    "build": ("pipeline.prepare", "build", "raw sources -> Alpaca-format JSON + manifest (make data)"),
    "validate": ("pipeline.validate", "run", "recipe + built data against their schemas; prints a report"),
    "inspect": ("pipeline.prepare", "inspect", "render samples with trainable tokens marked; length histogram"),
    "plan": ("pipeline.recipe.plan", "run", "resolved recipe with provenance, derived steps, DeepSpeed JSON, memory"),
    "train": ("pipeline.train.run", "run", "DeepSpeed training (pt, sft, dpo, kto or rm; lora, oft, full or freeze)"),
    "merge": ("pipeline.merge", "run", "fold the adapter into the base, verify, export the Hugging Face layout"),
    "export": ("pipeline.merge", "export_run", "LLaMA-Factory merge recipe: adapter_name_or_path + export_dir"),
    "eval": ("pipeline.evaluate.run", "run", "loss/perplexity + generation metrics, base vs tuned, report"),
    "generate": ("pipeline.chat", "run", "complete --prompt TEXT (or chat interactively)"),
    "chat": ("pipeline.chat", "run", "same as generate (LLaMA-Factory's verb)"),
    "deps": ("pipeline.recipe.deps", "run", "print the files a recipe depends on (used by the Makefile)"),
}
# commands without a recipe, each with its own options: (module, function taking argv, one-line help)
TOOLS: dict[str, tuple[str, str, str]] = {
    "expand": ("pipeline.model.expand", "main",
               "LLaMA Pro: --model X --output-dir Y --num-expand N adds zeroed blocks (then use_llama_pro: true)"),
}


def _count(text: str) -> int:
    """--num: a whole number of samples, 0 or more (a negative one was taken as 0 without a word; 0 is kept, for
    the counts and the length histogram alone)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"given {text!r}, expected a whole number of samples (0 or more)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"given {value}, expected 0 or more samples (0: only the counts and the "
                                         "length histogram)")
    return value


def build_parser() -> argparse.ArgumentParser:
    listed = {**COMMANDS, **TOOLS}
    epilog = ("commands:\n" + "\n".join(f"  {name:<9} {help_}" for name, (_, _, help_) in listed.items())
              + "\n\nexamples:\n"
                "  python -m pipeline validate recipes/demo_sft.yaml\n"
                "  python -m pipeline plan recipes/demo_sft.yaml learning_rate=5e-5 lora_target=[c_attn,c_fc]\n"
                "  python -m pipeline expand --model models/llama3 --output-dir models/llama3-pro --num-expand 8\n"
                "\noverrides are YAML values applied after the recipe and everything it extends.\n"
                "exit codes: 0 success, 2 a mistake in the recipe, data or arguments (no traceback), 1 a bug.")
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        usage="%(prog)s command recipe [key=value ...] [options]",  # command and recipe are required (see main)
        description="Recipe-driven fine-tuning of the book's GPT on DeepSpeed.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # both optional to argparse so that a missing one is named alone (main checks them; see there)
    # no argparse choices: an unknown command is one line naming the closest one (unknown_command)
    parser.add_argument("command", nargs="?", metavar="command", help="one of the commands below")
    parser.add_argument("recipe", nargs="?", help="path to a YAML recipe")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, values parsed as YAML")
    # the deepspeed launcher passes --local_rank=N (LOCAL_RANK is in the environment too, which resolve reads)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    tr = parser.add_argument_group("train")
    tr.add_argument("--dry-run", action="store_true",
                    help="one optimizer step and a checkpoint write into a temporary folder; reports step time and "
                         "memory; output_dir is left untouched")
    tr.add_argument("--retrain-finished", action="store_true",
                    help="when output_dir holds a finished run of this same recipe (all_results.json; resolved.yaml "
                         "names the recipe), train it again from scratch: what `make train` does for a stale run")
    gen = parser.add_argument_group("generate")
    gen.add_argument("--prompt", help="text to complete; without it, an interactive chat")
    gen.add_argument("--model", choices=["base", "adapter", "merged"], default=None,
                     help="which weights to use (default: the tuned model eval uses, else base)")
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, without the recipe's template")
    insp = parser.add_argument_group("inspect")
    insp.add_argument("--num", type=_count, default=3,
                      help="number of samples to render (0: only the counts and the length histogram)")
    return parser


def steps(command: str, r: Any, args: argparse.Namespace) -> list[str]:
    """The commands one invocation runs. A LLaMA-Factory train recipe may evaluate instead of training
    (do_train: false) or after it (do_predict: true, into output_dir/eval/); with overwrite_cache: true, train and
    eval first build what is stale (a no-op when every build is current); the stages stay independent."""
    if command != "train" or getattr(args, "dry_run", False):
        run = [command]
    elif not r.get("do_train", True):
        run = ["eval"]
    else:
        run = ["train", "eval"] if r.get("do_predict") else ["train"]
    return ["build", *run] if r.get("overwrite_cache") and command in ("train", "eval") else run


def lock_targets(command: str, r: Any, dry_run: bool = False) -> list[tuple[Path, str]]:
    """The directories this process locks while `command` runs (pipeline.lock): those the job writes
    (written_dirs), train's output_dir on rank 0 alone, which holds it for every rank."""
    if command == "train" and not first_rank():
        return []
    return written_dirs(command, r, dry_run)


def written_dirs(command: str, r: Any, dry_run: bool = False) -> list[tuple[Path, str]]:
    """The directories `command` writes that no other run may write meanwhile (pipeline.lock), each with where
    its name came from: train's output_dir, merge's merged/ or export_dir, the datasets a build writes. `train
    --dry-run` writes only to a temporary folder of its own: none (it says what the real run would meet in
    output_dir itself, pipeline.train.dryrun.real_run_problem)."""
    from pipeline.train.checkpoint import where

    if command == "train" and dry_run:
        return []
    if command == "train":
        return [(Path(r["output_dir"]), where(r, "output_dir"))]
    if command in ("merge", "export"):
        if r.get("export_dir"):
            return [(Path(r["export_dir"]), where(r, "export_dir"))]
        return [(Path(r["output_dir"]) / "merged", where(r, "output_dir"))] if command == "merge" else []
    if command == "build":
        from pipeline.data.build import all_specs
        from pipeline.data.built import built_dir
        from pipeline.recipe.args import data_args

        return [(built_dir(r["dataset_dir"], spec.name), where(r, "dataset")) for spec in all_specs(data_args(r))]
    return []


def refuse_before_build(command: str, r: Any, args: argparse.Namespace) -> None:
    """overwrite_cache's build runs before train or eval (steps): every refusal of that command that needs no model
    and no data is asked first, without writing anything, so that a refused run leaves the built data as it was
    (it was rebuilt, then the run refused). train: pipeline.train.run.check_start, the list train asks itself; eval:
    pipeline.evaluate.run.check_start (nothing trained to evaluate, the benchmark's own). The lock on what the
    command writes is asked first, without taking it (pipeline.lock.in_use, unwritable): when another run holds it,
    that is what the user needs to hear, not that run's files in output_dir; the lock itself is taken only around
    the command, after the build, so a refusal here leaves no lock behind. Every rank asks it of the job's folders
    (written_dirs), not only rank 0, which takes train's lock: each then refuses with the same message, which
    print_errors says once, where rank 1 went on to say that output_dir was not empty beside rank 0's refusal. A lock
    its own rank 0 took meanwhile (through the build already, waiting for the ranks to meet) is the job's
    (pipeline.launched.job_of), not another run's; rank 0 itself takes it only later, so a lock it finds is another
    run's even where it names the same job (a second DeepSpeed launch on this machine's default MASTER_PORT)."""
    from pipeline.lock import in_use, unwritable

    job = None if first_rank() else job_of()
    for target, at in written_dirs(command, r, getattr(args, "dry_run", False)):
        held = in_use(target, at, job)
        if held is not None:
            raise UserError(held)
        refusal = unwritable(target, at)
        if refusal is not None:
            raise refusal
    if command == "train" and not getattr(args, "dry_run", False):
        from pipeline.train.run import check_start

        check_start(r, args, warn=False)  # train asks again after the build and says which checkpoints it skipped
    elif command == "eval":
        from pipeline.evaluate.run import check_start as check_eval

        check_eval(r, args)


def misplaced_options(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> str:
    """An option of another command ('validate r.yaml --num 3'), which would be ignored without a word: the
    groups of build_parser are named after the command their options belong to."""
    given = {arg.split("=", 1)[0] for arg in argv if arg.startswith("--")}
    for group in parser._action_groups:  # argparse keeps no public list of a group's actions
        if group.title not in COMMANDS or COMMANDS[group.title][:2] == COMMANDS[args.command][:2]:  # chat = generate
            continue
        for action in group._group_actions:
            used = given & set(action.option_strings)
            if used:
                option = min(used)
                return f"{option} is an option of `{group.title}`, not of `{args.command}`" + \
                    make_variable_hint(option, getattr(args, action.dest), args)
    return ""


def key_as_option(parser: argparse.ArgumentParser, argv: list[str]) -> str:
    """A recipe key typed as an option (`--max_steps 2`, `--do_predict`): llamafactory-cli's argv form, which
    HfArgumentParser reads, where overrides here are key=value (as llamafactory-cli takes them after a YAML). argparse
    alone says "unrecognized arguments" without the form to type; "" when no option names a recipe key. The recipe's
    schema is read only for an option the parser lacks: a Python without the pipeline's packages (no yaml) is told
    which environment to run in further on, not given a traceback here (test_newcomer_first_hour)."""
    options = {name for action in parser._actions for name in action.option_strings}
    unknown = [i for i, arg in enumerate(argv) if arg.startswith("--") and arg.partition("=")[0] not in options]
    if not unknown:
        return ""
    try:
        from pipeline.recipe.spec import properties
    except ImportError:  # argparse's own message, after the environment's
        return ""
    for i in unknown:
        arg = argv[i]
        flag, eq, value = arg.partition("=")
        key = flag[2:].replace("-", "_")
        if key not in properties():
            continue
        if not eq:  # HfArgumentParser's `--key value`, or a bare boolean flag that means true
            taken = i + 1 < len(argv) and not argv[i + 1].startswith("-") and "=" not in argv[i + 1]
            value = argv[i + 1] if taken else "true"
            arg = f"{arg} {value}" if taken else arg
        return (f"{arg}: recipe keys are given as key=value after the recipe (as in `llamafactory-cli train x.yaml "
                f"{key}={value}`), not as options: write {key}={value}")
    return ""


def make_variable_hint(option: str, value: object, args: argparse.Namespace) -> str:
    """Where the Makefile passes `option` from a variable of its own (rerun.MAKE_VARIABLES: `make inspect ARGS='--num
    5'` gave it to deps, build and validate too, which refused it), the command with the user's recipe, overrides and
    value: ": run `make inspect RECIPE=r.yaml ARGS='k=v' NUM=5` (python -m pipeline inspect r.yaml k=v --num 5)...";
    "" for an option the Makefile gives no variable."""
    from pipeline.rerun import MAKE_VARIABLES, make_runs_here, run_this

    for variable, (goal, flag) in MAKE_VARIABLES.items():
        if flag == option:
            command = run_this(goal, args.recipe, args.overrides, variables={variable: str(value)})
            why = f"; make hands ARGS to every stage of the chain, and {variable} to {goal} alone" \
                if make_runs_here() else ""
            return f": run {command}{why}"
    return ""


def unknown_command(parser: argparse.ArgumentParser, command: str) -> None:
    """`trian`: one line with the closest command (errors.did_you_mean, as for recipe keys), exit 2; argparse's
    choices printed the usage and every command instead, and suggested nothing."""
    hint = did_you_mean(command, [*COMMANDS, *TOOLS]) or f" (commands: {', '.join([*COMMANDS, *TOOLS])})"
    parser.exit(2, f"{parser.prog}: error: argument command: invalid choice: {command!r}{hint}\n")


def missing_dependency(err: ModuleNotFoundError) -> str | None:
    """The message for a Python without the pipeline's packages, or None when the project's own environment lacks
    one (a bug or a broken setup: the traceback says which import). The docs write `python -m pipeline ...` for the
    project's environment; typed with another Python (the system's, a conda env's) it ended in a traceback about
    `tiktoken` or `yaml` that named neither the environment nor `make setup`."""
    top = (err.name or "").partition(".")[0]
    venv = Path(__file__).resolve().parents[1] / ".venv"
    if not top or top in ("pipeline", "tests") or Path(sys.prefix).resolve() == venv.resolve():
        return None
    return (f"this Python ({sys.executable}) has no module {top!r}, one of the pipeline's dependencies "
            "(requirements.txt): run the pipeline with the environment `make setup` makes, `.venv/bin/python -m "
            "pipeline ...` (or `source .venv/bin/activate` first, then `python -m pipeline ...`), or install "
            "requirements.txt into this Python")


def run_tool(name: str, argv: list[str]) -> int:
    """A command without a recipe (TOOLS): its own options, the same exit codes (2 for a user's mistake)."""
    module_name, func_name, _ = TOOLS[name]
    try:
        return int(getattr(importlib.import_module(module_name), func_name)(argv) or 0)
    except UserError as err:
        print_errors(err)
        return 2
    except ModuleNotFoundError as err:
        if (message := missing_dependency(err)) is None:
            raise
        print_errors(UserError(message))
        return 2


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    if given and given[0] in TOOLS:
        return run_tool(given[0], given[1:])
    parser = build_parser()
    if as_option := key_as_option(parser, given):
        parser.error(as_option)
    args = parser.parse_intermixed_args(argv)  # flags may sit among key=value overrides
    if args.command is not None and args.command not in COMMANDS:
        unknown_command(parser, args.command)
    if args.command is None or args.recipe is None:
        # parse_intermixed_args lists the optional key=value overrides as required too when these are missing
        parser.error(f"the following arguments are required: {'command, ' if args.command is None else ''}recipe")
    misplaced = misplaced_options(parser, args, sys.argv[1:] if argv is None else argv)
    if misplaced:
        parser.error(misplaced)
    if stray_rank(args.command):  # one process, rank 0 of one, whatever RANK a shell or a pod kept (see there)
        del os.environ["RANK"]
    try:
        from pipeline.recipe import resolve

        resolved = resolve(args.recipe, args.overrides, command=args.command)
        if args.command != "deps":
            from pipeline.recipe.notices import print_notices

            print_notices(resolved, args.command)
        from pipeline.lock import holding

        code = 0
        planned = steps(args.command, resolved, args)
        if planned[0] == "build" and len(planned) > 1:
            refuse_before_build(planned[1], resolved, args)
        for command in planned:
            module_name, func_name, _ = COMMANDS[command]
            what = f"python -m pipeline {command} {args.recipe}"
            # one writer per output directory; a build that train/eval run themselves (overwrite_cache) waits for
            # one under way (another rank of the job, a `make data`) and then finds it current
            wait = command == "build" and args.command != "build"
            # every other command writes into its folders: one it may not write is refused now, before the model
            # loads (a build may only read an up-to-date dataset in a read-only place)
            with holding(lock_targets(command, resolved, getattr(args, "dry_run", False)), what, wait,
                         writes=command != "build", job=job_of()):
                code = getattr(importlib.import_module(module_name), func_name)(resolved, args)
            if code:
                break
            if wait:  # the counts and step numbers of the fresh build, checked before the model loads
                resolved = resolve(args.recipe, args.overrides, command=args.command, built=True)
    except UserError as err:
        print_errors(err)
        return 2
    except ModuleNotFoundError as err:
        if (message := missing_dependency(err)) is None:
            raise
        print_errors(UserError(message))
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `python -m pipeline plan r.yaml | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as err:  # a full disk met outside pipeline.io's atomic writes (e.g. inside DeepSpeed)
        from pipeline.io import disk_full

        if not disk_full(err):
            raise
        where = getattr(err, "filename", None) or "a file"
        print(f"error: {where}: no space left on device ({err}); files are written to a temporary name first, "
              "so nothing finished was replaced. Free some space or write elsewhere, then run again",
              file=sys.stderr)
        return 2
    return int(code or 0)


if __name__ == "__main__":
    from pipeline.runtime.dist import end_process

    end_process(main)  # a rank that set up torch.distributed leaves without finalization: see there
