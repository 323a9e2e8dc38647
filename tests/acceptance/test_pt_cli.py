"""stage pt as a user runs it: a LLaMA-Factory-style corpus (`columns: {prompt: text}` over a JSON Lines `text`
column, as c4_demo) through `python -m pipeline build / train`."""
from __future__ import annotations

import json
import re

import yaml

from tests.acceptance.harness import cli_env, pipeline, write_recipe


def _c4_like(data, n: int) -> None:
    """data/raw/c4.jsonl: n documents of about ten tokens each, registered as LLaMA-Factory's c4_demo is."""
    (data / "raw" / "c4.jsonl").write_text("".join(json.dumps({"text": f"document {i} says the quick brown fox"}) + "\n"
                                                   for i in range(n)), encoding="utf-8")
    registry = json.loads((data / "dataset_info.json").read_text(encoding="utf-8"))
    registry["c4_demo"] = {"file_name": "raw/c4.jsonl", "columns": {"prompt": "text"}}
    (data / "dataset_info.json").write_text(json.dumps(registry), encoding="utf-8")


def test_held_out_text_too_short_for_one_window_is_an_error_not_a_skipped_evaluation(workdir, hf_checkpoint):
    """The val split held one short document: not one window of cutoff_len + 1 tokens. `train` skipped every
    evaluation without a word (eval_loss null, even with eval_steps set) while `eval` stopped with a message."""
    _c4_like(workdir / "data", 12)
    recipe = write_recipe(workdir / "pt.yaml", model_name_or_path=str(hf_checkpoint("gpt2")), dataset_dir="data",
                          output_dir="saves/pt", stage="pt", dataset="c4_demo", template=None, cutoff_len=16,
                          val_size=1, eval_steps=1)
    pipeline("build", recipe, cwd=workdir)
    # plan counts the windows train makes, by epochs: by hand, 11 documents to train on (GPT-2: 7 tokens each, an
    # EOS between two) are 87 tokens, windows of 17 at starts 0, 16, ..., 64: 5 windows, 2 micro-batches of 2 an
    # epoch. Failed before: num_train_examples, steps_per_epoch and total_steps null
    shown = pipeline("plan", recipe, "max_steps=", "num_train_epochs=2", cwd=workdir, as_typed=False).stdout
    assert [row.split()[:2] for row in shown.splitlines() if row.startswith(("num_train_examples ", "steps_per_epoch ",
                                                                            "total_steps "))] == [
        ["num_train_examples", "5"], ["steps_per_epoch", "2"], ["total_steps", "4"]], shown
    # on 4 ranks (WORLD_SIZE, as the launcher and `make plan NPROC=4` set it) the 5 windows fill no global batch of
    # 2 x 4: plan and validate refuse, as train does, at per_device_train_batch_size's line (failed before: no key)
    line = next(i for i, text in enumerate(recipe.read_text("utf-8").splitlines(), 1)
                if text.startswith("per_device_train_batch_size:"))
    for command in ("plan", "validate"):
        err = pipeline(command, recipe, cwd=workdir, expect=2, as_typed=False, env=cli_env(WORLD_SIZE="4")).stderr
        assert [text for text in err.splitlines() if text.startswith("error:")] == [
            f"error: {recipe}:{line}: per_device_train_batch_size: the train split has 5 windows, fewer than one global "
            "batch of 8 (per_device_train_batch_size 2 x 4 ranks); lower the batch size or add data"], err
    bad = pipeline("train", recipe, cwd=workdir, expect=2)
    assert "the val split has no windows" in bad.stderr and "cutoff_len + 1 = 17" in bad.stderr
    assert "Traceback" not in bad.stderr and not (workdir / "saves/pt").exists()
    # at the key, and validate says it in train's words (failed before: no key, and validate said "data: OK");
    # eval_steps asks for the evaluation, so the fix is to hold out more (val_size 0 would be refused for it)
    at = {key: next(i for i, text in enumerate(recipe.read_text("utf-8").splitlines(), 1) if text.startswith(key + ":"))
          for key in ("cutoff_len", "val_size")}
    said = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert len(said) == 1 and said[0].startswith(f"error: {recipe}:{at['cutoff_len']}: cutoff_len: the val split has "
                                                 "no windows; it has "), said
    assert said[0].endswith(f"tokens and one window needs cutoff_len + 1 = 17; lower cutoff_len or add text, or hold "
                            f"out more rows ({recipe}:{at['val_size']}: val_size is 1)"), said
    validated = pipeline("validate", recipe, cwd=workdir, expect=2)
    assert [line for line in validated.stderr.splitlines() if line.startswith("error:")] == said, validated.stderr
    assert "data: OK" not in validated.stdout

    # the evaluation at the end alone (eval_steps cleared): holding out nothing is a fix too, its command typed as
    # printed; never trained, so train needs no --retrain-finished (failed before: the flag was there)
    assert zero_fix(workdir, recipe) == (f"python -m pipeline build {recipe} eval_steps= val_size=0 && python -m "
                                         f"pipeline train {recipe} eval_steps= val_size=0")
    # validated for a 2-rank run (WORLD_SIZE=2, as the launcher sets it): the fix trains on those 2 ranks
    # (failed before: `python -m pipeline train ...`, one rank)
    assert zero_fix(workdir, recipe, WORLD_SIZE="2") == (
        f"python -m pipeline build {recipe} eval_steps= val_size=0 && python -m pipeline.launch --num_gpus 2 --module "
        f"pipeline train {recipe} eval_steps= val_size=0")

    # no evaluation asked for: the held-out text is not needed, the run trains
    pipeline("train", recipe, "eval_steps=", "do_eval=false", cwd=workdir)
    results = json.loads((workdir / "saves/pt/all_results.json").read_text(encoding="utf-8"))
    assert results["global_step"] == 2 and results["eval_loss"] is None
    # now a finished run of the recipe is in output_dir, which that train refuses unless told to train it again
    assert zero_fix(workdir, recipe) == (f"python -m pipeline build {recipe} eval_steps= val_size=0 && python -m "
                                         f"pipeline train {recipe} --retrain-finished eval_steps= val_size=0")

    # three documents left to train on, fewer than one window: 23 tokens by hand (GPT-2's BPE: 'document', ' 7',
    # ' says', ' the', ' quick', ' brown', ' fox' each, and one EOS between two documents: 3 x 7 + 2). The empty
    # train split is refused at cutoff_len's line too, by train and by validate alike (failed before: no key)
    few = write_recipe(workdir / "pt_few.yaml", yaml.safe_load(recipe.read_text("utf-8")), val_size=9, cutoff_len=64,
                        output_dir="saves/pt_few")
    pipeline("build", few, cwd=workdir, as_typed=False)
    line = next(i for i, text in enumerate(few.read_text("utf-8").splitlines(), 1) if text.startswith("cutoff_len:"))
    for command in ("train", "validate"):
        said = [text for text in pipeline(command, few, cwd=workdir, expect=2, as_typed=command == "train").stderr.splitlines()
                if text.startswith("error:")]
        assert len(said) == 1 and re.fullmatch(
            rf"error: {re.escape(str(few))}:{line}: cutoff_len: the train split has no windows; it has 23 tokens "
            r"and one window needs cutoff_len \+ 1 = 65; lower cutoff_len or add text", said[0]), (command, said)
    assert not (workdir / "saves/pt_few").exists()

    # overwrite_cache: true into saves/pt, which holds pt.yaml's finished run: refused before the build (stale here:
    # val_size 1, built with 9) rewrites a file (failed before: the data rebuilt, then the refusal)
    built = {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in (workdir / "data/build").rglob("*")
             if path.is_file()}
    err = pipeline("train", few, "output_dir=saves/pt", "val_size=1", "overwrite_cache=true", cwd=workdir,
                   expect=2, as_typed=False).stderr  # in this process: refused before torch.distributed is set up
    said = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(said) == 1 and "saves/pt is not empty: it holds a finished run of pt.yaml" in said[0], err
    assert "Traceback" not in err and built == {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in
                                                (workdir / "data/build").rglob("*") if path.is_file()}
    # every other refusal that needs no model and no data comes before that build too (train.run.check_start): a
    # deepspeed JSON's ZeRO 3 with pure_bf16 (preflight), a bad PIPELINE_PROFILE, and eval's nothing trained to
    # evaluate (failed before: the data rebuilt, then the refusal)
    (workdir / "ds3.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}), encoding="utf-8")
    stale = (few, "val_size=1", "overwrite_cache=true", "output_dir=saves/new")
    cases = [(("train", *stale, "deepspeed=ds3.json", "pure_bf16=true"), {}, True,
              "error: ds3.json: zero_optimization.stage is 3 with pure_bf16: true: pure_bf16 does not run under ZeRO 3: "
              "LLaMA-Factory refuses the two (\"`pure_bf16` is incompatible with DeepSpeed ZeRO-3\"); set "
              "zero_optimization.stage to 2 (or lower) there, or use bf16: true (mixed precision: fp32 master weights "
              "and optimizer states) with ZeRO 3"),
             (("train", *stale), {"PIPELINE_PROFILE": "prof.json:0"}, False,
              "error: PIPELINE_PROFILE='prof.json:0': expected FILE.json[:FIRST[:COUNT]] with FIRST and COUNT whole "
              "numbers of at least 1, e.g. profile.json:3:2 (steps 3 and 4)"),
             (("eval", *stale), {}, False,
              f"error: saves/new/adapter: no trained adapter to evaluate; `python -m pipeline train {few} overwrite_cache=true "
              "val_size=1 output_dir=saves/new` produces it")]
    for argv, env, typed, message in cases:
        err = pipeline(*argv, cwd=workdir, expect=2, as_typed=typed, env=cli_env(**env)).stderr
        assert [line for line in err.splitlines() if line.startswith("error:")] == [message], (argv, err)
        assert "Traceback" not in err and built == {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in
                                                    (workdir / "data/build").rglob("*") if path.is_file()}, argv
    assert not (workdir / "saves/new").exists()

    # another run holds saves/pt's lock: that is the refusal, not saves/pt's finished run that the holder is writing
    # (failed before: check_output_dir's 'is not empty'), and the lock is not taken over
    from pipeline.lock import exclusive

    with exclusive(workdir / "saves/pt", "python -m pipeline train pt.yaml", writes=True) as lock:
        holder = json.loads(lock.read_text(encoding="utf-8"))
        err = pipeline("train", few, "output_dir=saves/pt", "val_size=1", "overwrite_cache=true", cwd=workdir,
                       expect=2, as_typed=False).stderr
        assert json.loads(lock.read_text(encoding="utf-8")) == holder
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: command line override output_dir=saves/pt: output_dir: saves/pt is in use by `python -m pipeline train pt.yaml` (pid "
        f"{holder['pid']} on host {holder['host']}, started {holder['started']}); two runs writing it would corrupt each "
        "other. Wait for that run to finish (or stop it), or choose another directory. The lock is saves/.pt.lock"], err
    assert "Traceback" not in err and built == {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in
                                                (workdir / "data/build").rglob("*") if path.is_file()}


def zero_fix(workdir, recipe, **env: str) -> str:
    """The command validate's refusal of held-out text too short for a window gives to hold out nothing, with
    eval_steps cleared (the run evaluates at its end only); `env`: the launcher's variables (WORLD_SIZE)."""
    err = pipeline("validate", recipe, "eval_steps=", cwd=workdir, expect=2, as_typed=False, env=cli_env(**env)).stderr
    said = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(said) == 1 and "or hold out nothing with val_size: 0 (LLaMA-Factory's default; " in said[0], err
    return said[0].rpartition("which evaluates nothing: ")[2].strip("`")


def test_plan_reads_the_count_kept_under_a_tokenizer_until_its_file_changes(workdir):
    """tokenizer_name_or_path: a folder whose tokenizer is a top-level tiktoken tokenizer.model (Meta's Llama 3
    layout, its 256 special tokens). A count kept beside the build (as train, validate or an earlier plan keep it:
    counted here in this process, to spare the suite a command) is what plan reads: the counts folder is as it was,
    no second file. Failed before: the key held the added tokens' repr, a frozenset whose order follows the
    process's string hash seed, so every command missed and wrote a file of its own. Once tokenizer.model holds
    another vocabulary of the same size (same ids for the specials), plan counts the new tokenizer's windows, as
    train would. Failed before: plan said the 12 kept under the first one (the key hashed only the files exports
    copy, without tokenizer.model). Hand counts: "ab" x 50 is 100 byte tokens, windows of cutoff_len 8 at starts 0,
    8, ..., 88: 12; with "ab" one token, 50 tokens: 0, 8, ..., 40: 6."""
    from pipeline.data.build import build
    from pipeline.data.loaders import count_items
    from pipeline.recipe.args import data_args
    from pipeline.recipe.resolve import resolve
    from tests.helpers.tiktoken_vocab import tiktoken_model

    tok = workdir / "tok"
    tok.mkdir()
    (tok / "tokenizer.model").write_text(tiktoken_model(b"xy"), encoding="utf-8")
    (workdir / "data" / "raw" / "ab.txt").write_text("ab" * 50, encoding="utf-8")
    registry = json.loads((workdir / "data" / "dataset_info.json").read_text(encoding="utf-8"))
    registry["ab"] = {"file_name": "raw/ab.txt", "formatting": "text"}
    (workdir / "data" / "dataset_info.json").write_text(json.dumps(registry), encoding="utf-8")
    recipe = write_recipe(workdir / "pt.yaml", model_name_or_path="tiny", tokenizer_name_or_path=str(tok),
                          dataset_dir=str(workdir / "data"), output_dir="saves/pt", stage="pt", dataset="ab",
                          template=None, cutoff_len=8, val_size=0, per_device_train_batch_size=1, max_steps=None,
                          num_train_epochs=1)
    data = data_args(resolve(recipe, command="plan"))
    build(data)
    assert count_items(data, "train") == 12
    counts = workdir / "data" / "build" / "ab" / "counts"

    def kept() -> list[tuple[str, int]]:
        return [(path.name, path.stat().st_ino) for path in sorted(counts.iterdir())]

    first = kept()

    def windows() -> int:
        shown = pipeline("plan", "pt.yaml", cwd=workdir).stdout
        return int(re.search(r"num_train_examples\s+(\d+)", shown).group(1))

    assert windows() == 12 and kept() == first
    (tok / "tokenizer.model").write_text(tiktoken_model(b"ab"), encoding="utf-8")
    assert windows() == 6
