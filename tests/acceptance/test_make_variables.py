"""The Makefile's variables as a user sets them: ARGS (the named recipe's overrides) and PROMPT (make chat).

`make train RECIPE=down.yaml ARGS='...'`: the overrides are the named recipe's, not its upstream's.

A recipe that starts from another recipe's output makes that one first (a sub-make). GNU make hands command-line
variables to every sub-make, so ARGS reached the upstream too: `ARGS='max_steps=40'` on demo_sft retrained
demo_pt for 40 steps, and a dpo key (`ARGS='pref_beta=0.2'` on demo_dpo) stopped the chain at the sft recipe,
which refuses it. `make -n` runs the sub-make (its line calls $(MAKE)) and prints the commands each would run.
"""
from __future__ import annotations

import re

from tests.acceptance.harness import cli_env, make, scratch_repo, write_data, write_recipe


def test_args_reach_the_named_recipe_only(tmp_path):
    root = scratch_repo(tmp_path / "repo")
    write_data(root / "datasets")
    (root / "recipes").mkdir()
    write_recipe(root / "recipes" / "up.yaml", model_name_or_path="tiny", finetuning_type="full",
                 dataset_dir="datasets", output_dir="saves/up")
    write_recipe(root / "recipes" / "down.yaml", model_name_or_path="saves/up/model", dataset_dir="datasets",
                 output_dir="saves/down")
    env = cli_env(MAKEFLAGS="", MAKELEVEL="")
    done = make("-n", "train", "RECIPE=recipes/down.yaml", "ARGS=learning_rate=0.5", f"VENV={root / 'venv'}",
                cwd=root, env=env)
    lines = [line for line in done.stdout.splitlines() if "-m pipeline" in line]
    upstream = [line for line in lines if "recipes/up.yaml" in line]
    assert upstream and not any("learning_rate" in line for line in upstream), done.stdout
    assert any("train recipes/down.yaml" in line and line.endswith("learning_rate=0.5") for line in lines), done.stdout


def test_make_chat_takes_a_prompt_with_an_apostrophe(tmp_path):
    """The prompt was pasted into the command in single quotes: `PROMPT="What's ..."` was a shell syntax error."""
    root = scratch_repo(tmp_path / "repo")
    write_data(root / "datasets")
    (root / "recipes").mkdir()
    write_recipe(root / "recipes" / "r.yaml", model_name_or_path="tiny", dataset_dir="datasets", max_new_tokens=2)
    done = make("chat", "RECIPE=recipes/r.yaml", "PROMPT=What's `this` $HOME?", f"VENV={root / 'venv'}", cwd=root,
                env=cli_env(MAKEFLAGS="", MAKELEVEL=""))
    assert "unexpected EOF" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert done.stdout.strip(), done.stdout  # the completion (from the untrained base, with a note)


def test_make_plan_counts_the_hosts_of_a_hostfile(tmp_path):
    """DeepSpeed gives every host of the hostfile --num_gpus (NPROC) ranks (runner.apply_num_nodes_and_gpus); plan
    showed NPROC ranks, one node's numbers. NNODES (a job without ssh) counts the same way."""
    root = scratch_repo(tmp_path / "repo")
    write_data(root / "datasets")
    (root / "recipes").mkdir()
    write_recipe(root / "recipes" / "r.yaml", model_name_or_path="tiny", dataset_dir="datasets")
    (root / "hostfile").write_text("node1 slots=2\n# spare: node3 slots=2\n\nnode2 slots=2\n", encoding="utf-8")
    env = cli_env(MAKEFLAGS="", MAKELEVEL="")
    done = make("plan", "RECIPE=recipes/r.yaml", "NPROC=2", "HOSTFILE=hostfile", f"VENV={root / 'venv'}", cwd=root,
                env=env)
    assert any(line.split()[:2] == ["world_size", "4"] for line in done.stdout.splitlines()), done.stdout
    # the command make echoes is the one that runs, on one line (it was `WORLD_SIZE=$(( 2 * $(grep ...) )) \`), with
    # the launch `make train` would make (pipeline/launched.py; the harness gives make a free MASTER_PORT)
    assert re.search(r"^WORLD_SIZE=4 PYTHON_PIPELINE_LAUNCH=--hostfile%20hostfile%20--master_port%20[0-9]+%20"
                     rf"--num_gpus%202 {re.escape(str(root / 'venv'))}/bin/python -m pipeline plan recipes/r.yaml",
                     done.stdout, re.M), done.stdout
    assert "$((" not in done.stdout, done.stdout
    missing = make("plan", "RECIPE=recipes/r.yaml", "NPROC=2", "HOSTFILE=nope", f"VENV={root / 'venv'}", cwd=root,
                   env=env, expect=2)
    assert "error: HOSTFILE=nope: no such file" in missing.stderr, missing.stderr
    # docs/packing-and-scale.md#several-machines: `make plan NNODES=2 NPROC=8` shows the numbers of 16 ranks
    nodes = make("plan", "RECIPE=recipes/r.yaml", "NPROC=8", "NNODES=2", f"VENV={root / 'venv'}", cwd=root, env=env)
    assert any(line.split()[:2] == ["world_size", "16"] for line in nodes.stdout.splitlines()), nodes.stdout
    assert re.search(r"^WORLD_SIZE=16 PYTHON_PIPELINE_LAUNCH=--nnodes%202%20--node_rank%200%20--master_addr%20%27%27"
                     rf"%20--master_port%20[0-9]+%20--num_gpus%208 {re.escape(str(root / 'venv'))}/bin/python -m "
                     "pipeline plan recipes/r.yaml", nodes.stdout, re.M), nodes.stdout


def test_args_may_hold_a_quote_inside_a_quoted_value(tmp_path):
    """The args stamp was written by `echo '$(ARGS)'`: an apostrophe inside a quoted value (a path) was a
    shell syntax error, and make stopped before validate."""
    root = scratch_repo(tmp_path / "repo")
    write_data(root / "datasets")
    (root / "recipes").mkdir()
    write_recipe(root / "recipes" / "r.yaml", model_name_or_path="tiny", dataset_dir="datasets")
    args = """ARGS=output_dir="saves/it's mine" learning_rate=0.5"""
    make("validate", "RECIPE=recipes/r.yaml", args, f"VENV={root / 'venv'}", cwd=root,
         env=cli_env(MAKEFLAGS="", MAKELEVEL=""))
    assert (root / ".stamps/recipes/r/args").read_text(encoding="utf-8") == args.removeprefix("ARGS=") + "\n"
    again = make("validate", "RECIPE=recipes/r.yaml", args, f"VENV={root / 'venv'}", cwd=root,
                 env=cli_env(MAKEFLAGS="", MAKELEVEL=""))
    assert "pipeline validate" not in again.stdout, again.stdout  # the same ARGS: nothing is stale


def test_make_inspect_takes_the_number_of_samples_from_num(tmp_path):
    """`make inspect ARGS='--num 1'` hands --num to deps, build and validate as well: the first refuses it in one
    message that names the command to type, with the user's recipe, overrides and number (it said `make inspect
    NUM=5`, which inspects the Makefile's default recipe); that command shows the sample."""
    root = scratch_repo(tmp_path / "repo")
    write_data(root / "datasets")
    (root / "recipes").mkdir()
    write_recipe(root / "recipes" / "r.yaml", model_name_or_path="tiny", dataset_dir="datasets")
    env = cli_env(MAKEFLAGS="", MAKELEVEL="")
    mistake = make("inspect", "RECIPE=recipes/r.yaml", "ARGS=--num 1 seed=7", f"VENV={root / 'venv'}", cwd=root,
                   env=env, expect=2)
    suggested = "make inspect RECIPE=recipes/r.yaml ARGS=seed=7 NUM=1"
    assert f"error: --num is an option of `inspect`, not of `validate`: run `{suggested}` (python -m pipeline" \
           " inspect recipes/r.yaml seed=7 --num 1); make hands ARGS to every stage of the chain, and NUM to inspect" \
           " alone\nMakefile:" in mistake.stderr, mistake.stderr
    done = make(*suggested.split()[1:], f"VENV={root / 'venv'}", cwd=root, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("── sample ") == 1 and "── sample 1/1 · " in done.stdout, done.stdout[-3000:]
