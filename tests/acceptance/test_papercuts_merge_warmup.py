"""The warmup trap and the merge that follows it, through the CLI: a recipe with `max_steps: 1` and
`warmup_ratio: 0.03` (LLaMA-Factory's examples' warmup) on a transformers-written GPT-2 checkpoint.

transformers' schedule, which ours follows: warmup steps = ceil(total x warmup_ratio) (training_args.py:2154-2161,
get_warmup_steps: ceil(1 x 0.03) = 1) and the linear warmup's factor at step s is s / warmup steps
(optimization.py:101-104, _get_linear_schedule_with_warmup_lr_lambda: 0 / 1 = 0 at the only step). So the run trains
its only step at lr 0 and the adapter's lora_B stays all zero (PEFT's init), which merge must refuse.

`plan` and `train` say it once each as a notice (exit 0: the schedule is transformers'), and merge refuses the adapter
in ONE message naming the adapter, how many of how many layers are all zero, the cause (the run's own warmup, from its
resolved.yaml) and the fix, exit 2, nothing written. The other stages (build, validate, merge) say no notice: the
warmup is train's business, and merge's refusal names it already.

Failed before: every stage said the notice once the data was built (build, validate and merge too; in `make all`
five times: tests/test_make_all.py); before that, no notice, and merge printed one `error: layer h.N...: lora_B is
all zero` line per adapted layer (8 here, 12 on GPT-2 small's c_attn).
"""
from __future__ import annotations

import shlex
import shutil

from tests.acceptance.harness import pipeline, refused, write_recipe

LAYERS = 2 * 4  # the checkpoint's 2 blocks x GPT-2's four Conv1D (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj)


def warmup_notices(stderr: str) -> list[str]:
    return [text for text in stderr.splitlines() if text.startswith("notice:") and "warmup" in text]


def test_a_one_step_warmup_run_is_noticed_and_its_untrained_adapter_refused_in_one_message(workdir, hf_checkpoint):
    from safetensors.torch import load_file

    model = workdir / "gpt2"  # this test's own copy: the refused train below reads it damaged
    shutil.copytree(hf_checkpoint("gpt2"), model)
    write_recipe(workdir / "r.yaml", model_name_or_path=str(model), dataset_dir="data",
                 output_dir="saves/r", max_steps=1, warmup_ratio=0.03, val_size=None)
    line = next(i for i, text in enumerate((workdir / "r.yaml").read_text().splitlines(), 1)
                if text.startswith("warmup_ratio:"))
    notice = (f"notice: r.yaml:{line}:15: warmup_ratio 0.03 of 1 step = 1 warmup step: the run's only step trains at "
              "lr 0, so the weights do not change (a linear warmup starts at lr 0, as transformers' does); set "
              "warmup_ratio: 0 or more steps")
    pipeline("build", "r.yaml", cwd=workdir, as_typed=False)
    plan = pipeline("plan", "r.yaml", cwd=workdir, as_typed=False).stderr
    train = pipeline("train", "r.yaml", "logging_steps=2", cwd=workdir).stderr  # as typed, with an override
    for err in (plan, train):
        assert warmup_notices(err) == [notice], err
    for command in ("build", "validate"):  # the data is built now, so the steps are known: still quiet
        err = pipeline(command, "r.yaml", cwd=workdir, as_typed=False).stderr
        assert warmup_notices(err) == [], (command, err)

    tensors = load_file(workdir / "saves/r/adapter/adapter_model.safetensors")
    b = [t for k, t in tensors.items() if k.endswith("lora_B.weight")]
    assert len(b) == LAYERS and not any(t.any() for t in b)  # lr 0: B as PEFT initialises it
    assert all(t.any() for k, t in tensors.items() if k.endswith("lora_A.weight"))

    # the fix names the run's training: its recipe and override (a bare `make train` trains the Makefile's default
    # recipe), from merge's own recipe, and for an adapter exported from elsewhere from its resolved.yaml. Failed
    # before: "`make train`" in both. workdir holds no Makefile: the python -m form alone (pipeline.rerun)
    again = "`python -m pipeline train r.yaml --retrain-finished logging_steps=2`"
    shutil.rmtree(workdir / "data" / "build")  # the verification's rows: their build is named the same way
    err = refused("merge", "r.yaml", "logging_steps=2", cwd=workdir, as_typed=False)
    assert ("merge: no built data found for the verification (`python -m pipeline build r.yaml logging_steps=2` "
            "builds it); using fixed pseudo-random tokens") in err, err
    errors = [text for text in err.splitlines() if text.startswith("error:")]
    assert warmup_notices(err) == [], err  # the refusal below says it
    assert errors == [
        f"error: saves/r/adapter: the adapter is untrained: lora_B is all zero in all {LAYERS} of its adapted layers,"
        " so merging would change nothing (the merged model would equal the base). Likely cause: its run"
        " (saves/r/resolved.yaml) trained 1 step with warmup_ratio 0.03, which is 1 warmup step: the run's only step"
        " trains at lr 0, so the weights do not change. Fix: train again with steps at a learning rate above 0"
        f" (warmup_ratio: 0, or more steps: max_steps), {again}; nothing was written"], err
    assert not (workdir / "saves/r/merged").exists()
    write_recipe(workdir / "export.yaml", {}, model_name_or_path=str(hf_checkpoint("gpt2")), template="alpaca",
                 adapter_name_or_path="saves/r/adapter", export_dir="saves/exported")
    err = refused("export", "export.yaml", cwd=workdir, as_typed=False)
    assert f"(warmup_ratio: 0, or more steps: max_steps), {again}; nothing was written" in err, err
    assert not (workdir / "saves/exported").exists()
    # from another folder (the run was trained in workdir, whose resolved.yaml names r.yaml and workdir): the command
    # is typed in the folder the run started in, where r.yaml and its relative output_dir mean that run. Failed
    # before: "RECIPE=r.yaml", which is no recipe from sub/ (then its absolute path, whose output_dir saves/r is
    # sub/saves/r from sub/)
    (workdir / "sub").mkdir()
    write_recipe(workdir / "sub/export.yaml", {}, model_name_or_path=str(hf_checkpoint("gpt2")), template="alpaca",
                 adapter_name_or_path=str(workdir / "saves/r/adapter"), export_dir="exported")
    err = refused("export", "export.yaml", cwd=workdir / "sub", as_typed=False)
    assert f"`cd {shlex.quote(str(workdir))} && python -m pipeline train r.yaml --retrain-finished logging_steps=2`" in err, err
    # the fix as the message words it runs: the recipe fixed as it says (warmup_ratio: 0), the command typed as given,
    # in workdir, trains that run again (its output_dir holds the finished run: what `make train` does with
    # --retrain-finished). Failed before: `python -m pipeline train r.yaml logging_steps=2` was refused, "saves/r is
    # not empty: it holds a finished run"
    (workdir / "r.yaml").write_text((workdir / "r.yaml").read_text().replace("warmup_ratio: 0.03", "warmup_ratio: 0"))
    pipeline("build", "r.yaml", cwd=workdir, as_typed=False)  # removed above
    # typed without the flag, the run is refused: its finished run is named, with this same command (the one that
    # trains it again here, where `make` reads no Makefile: rerun.make_runs_here). Failed before: "(`make train` does
    # so itself once the recipe or its ARGS change)", which is no command in this folder
    # The refusal comes before the model is read (a large model loads for minutes first): with its weights file
    # damaged, the output_dir refusal is still the one message. Failed before: "models/...model.safetensors: not a
    # readable safetensors file", and with the file whole the refusal after the load.
    weights = model / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[:1000])
    err = refused("train", "r.yaml", "logging_steps=2", cwd=workdir)
    weights.write_bytes(whole)
    assert err.splitlines()[-1].endswith(
        "output_dir: saves/r is not empty: it holds a finished run of r.yaml (all_results.json), which a new run "
        "neither continues nor replaces unless told: resume_from_checkpoint: latest continues it (with more steps: "
        "raise max_steps or num_train_epochs, it trained all it was asked), overwrite_output_dir: true trains again "
        f"from scratch (its contents are removed) ({again} does so without an edit); or choose another output_dir"), err
    python, dash_m, module, *typed = shlex.split(again.strip("`"))
    assert (python, dash_m, module) == ("python", "-m", "pipeline")
    pipeline(*typed, cwd=workdir)
    tensors = load_file(workdir / "saves/r/adapter/adapter_model.safetensors")
    assert all(t.any() for k, t in tensors.items() if k.endswith("lora_B.weight"))  # trained at lr > 0 this time
