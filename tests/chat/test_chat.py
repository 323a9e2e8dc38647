"""`python -m pipeline generate`: only the completion on stdout, template or --raw, interactive loop."""
from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys


from pipeline import chat
from pipeline.data.tokenizer import gpt2
from pipeline.model.build import load_for_inference
from pipeline.recipe.args import GenerationArgs, recipe_args
from pipeline.runtime.layout import RunLayout
from pipeline.model.generate import generate_text
from pipeline.model.weights import load_model


def recipe(tmp_path, **kw):
    return {"model_name_or_path": "tiny", "finetuning_type": "lora", "template": "alpaca", "seed": 1,
            "output_dir": str(tmp_path / "out"), "max_new_tokens": 6, "do_sample": False, "temperature": 1.0,
            "top_k": 0, "top_p": 1.0, "stop_strings": None, "adapter_name_or_path": None, **kw}


def args(**kw):
    return argparse.Namespace(**{"prompt": None, "model": None, "raw": False, **kw})


def expected(r, text):
    model = load_for_inference(recipe_args(r).model, "base", device="cpu")
    return generate_text(model, gpt2(), text, **chat.generation_kwargs(GenerationArgs.from_recipe(r), [50256]))


def test_prompt_prints_only_the_templated_completion(tmp_path, capsys):
    """The expected completion is transformers' greedy decoding of the same checkpoint (not our generate)."""
    from tests.acceptance.harness import write_hf_checkpoint

    hf = write_hf_checkpoint(tmp_path / "gpt2")
    r = recipe(tmp_path, model_name_or_path=str(tmp_path / "gpt2"))
    capsys.readouterr()  # transformers' own start-up lines (it imports deepspeed) are not ours
    assert chat.run(r, args(prompt="Name a colour.")) == 0
    out, err = capsys.readouterr()
    tok = gpt2().encoding.tiktoken  # tiktoken's GPT-2 encoding itself
    prompt = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
              "request.\n\n### Instruction:\nName a colour.\n\n### Response:\n")  # the book's Alpaca format
    ids = tok.encode_ordinary(prompt)
    import torch

    with torch.no_grad():
        new = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=6, do_sample=False, eos_token_id=50256, pad_token_id=50256)[0, len(ids):]
    golden = tok.decode([t for t in new.tolist() if t != 50256][:6])
    assert out == golden + "\n" and golden.strip()
    assert "random weights" not in err


def test_a_preset_has_random_weights_and_says_so(tmp_path, capsys):
    assert chat.run(recipe(tmp_path), args(prompt="Name a colour.")) == 0
    assert "random weights" in capsys.readouterr().err


def test_a_pure_bf16_run_generates_with_its_bf16_weights(tmp_path, capsys, monkeypatch):
    """As eval computes after a pure_bf16 run (pipeline.recipe.precision.weights_dtype): the base in bf16 (an adapter
    on it fp32, as it trained: tests/train/test_pure_bf16.py), the model that trained; a bf16 mixed-precision run's fp32 masters stay fp32."""
    import torch

    loaded = []
    import pipeline.model.build

    monkeypatch.setattr(pipeline.model.build, "load_for_inference", lambda *a, **kw: loaded.append(load_for_inference(*a, **kw))
                        or loaded[-1])
    for keys, dtype in (({"pure_bf16": True}, torch.bfloat16), ({"bf16": True}, torch.float32)):
        r = recipe(tmp_path, **keys)
        chat.run(r, args(prompt="Once upon a time", raw=True))
        assert next(loaded[-1].parameters()).dtype == dtype
        golden = generate_text(loaded[-1], gpt2(), "Once upon a time",
                               **chat.generation_kwargs(GenerationArgs.from_recipe(r), [50256]))
        assert capsys.readouterr().out == golden + "\n"


def test_raw_sends_the_text_as_is(tmp_path, capsys):
    r = recipe(tmp_path, do_sample=True, temperature=0.8, top_k=50, seed=3)
    chat.run(r, args(prompt="Once upon a time", raw=True))
    raw_out = capsys.readouterr().out
    assert raw_out == expected(r, "Once upon a time") + "\n"


def test_interactive_loop_until_empty_line(tmp_path, capsys, monkeypatch):
    r = recipe(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\nWhat is 2+2?\n\nnever read\n"))
    assert chat.run(r, args(raw=True)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0] == expected(r, "Hi")


def test_generation_kwargs_carry_stop_strings_and_ids():
    kw = chat.generation_kwargs(GenerationArgs.from_recipe({"stop_strings": ["###", "###"], "max_new_tokens": 3}), (7, 9))
    assert kw["stop_strings"] == ["###"] and kw["stop_ids"] == (7, 9)
    assert kw["max_new_tokens"] == 3 and kw["do_sample"] is False


def test_cli_on_hf_checkpoint(tmp_path, hf_dir, repo):
    path, _ = hf_dir
    (tmp_path / "r.yaml").write_text(f"model_name_or_path: {path}\ndataset: x\nnum_train_epochs: 1\n"
                                     f"max_new_tokens: 5\noutput_dir: {tmp_path / 'out'}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}  # a user's shell: no launcher variables
    env["PYTHONPATH"] = str(repo)
    run = subprocess.run([sys.executable, "-m", "pipeline", "generate", str(tmp_path / "r.yaml"), "--prompt",
                          "The sky is", "--raw"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    tok = gpt2()
    assert run.stdout == generate_text(load_model(path).eval(), tok, "The sky is", max_new_tokens=5) + "\n"
    # the merge that makes it is this recipe's, with the override typed (a bare `make merge` merges the Makefile's
    # default recipe): failed before, the message said "`make merge` (python -m pipeline merge RECIPE)"
    bad = subprocess.run([sys.executable, "-m", "pipeline", "generate", "r.yaml", "--prompt", "x", "--model",
                          "merged", "output_dir=o2"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stdout == "" and "Traceback" not in bad.stderr, bad.stderr
    assert bad.stderr == ("error: --model merged: no merged model at o2/merged; produce it with `python -m pipeline "
                          "merge r.yaml output_dir=o2`, or use --model adapter\n"), bad.stderr  # no Makefile here
    # --model adapter names the recipe's training the same way (in this process: the same main(argv))
    from tests.acceptance.harness import refused

    err = refused("generate", "r.yaml", "--prompt", "x", "--model", "adapter", "output_dir=o2", "seed=3",
                  cwd=tmp_path, as_typed=False)
    assert err == ("error: --model adapter: nothing at o2/adapter; produce it with `python -m pipeline train r.yaml "
                   "output_dir=o2 seed=3`, or set adapter_name_or_path\n"), err


def test_model_choice_follows_the_run_layout(tmp_path, capsys):
    """--model picks by name; without it, chat takes what eval takes: a stale merged/ is passed over."""
    import os

    import pytest

    from pipeline.errors import UserError

    r = recipe(tmp_path)
    out = tmp_path / "out"
    assert chat.chosen_weights(RunLayout.of(r["output_dir"]), recipe_args(r).finetune, None) is None and chat.chosen_weights(RunLayout.of(r["output_dir"]), recipe_args(r).finetune, "base") is None
    with pytest.raises(UserError, match="make train"):
        chat.chosen_weights(RunLayout.of(r["output_dir"]), recipe_args(r).finetune, "adapter")
    with pytest.raises(UserError, match="make merge"):
        chat.chosen_weights(RunLayout.of(r["output_dir"]), recipe_args(r).finetune, "merged")
    (out / "merged").mkdir(parents=True)
    (out / "merged" / "config.json").write_text("{}")
    (out / "adapter").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (out / "adapter" / name).write_text("{}")
    old = (out / "merged" / "config.json").stat().st_mtime - 100
    os.utime(out / "merged" / "config.json", (old, old))  # trained again after the merge
    assert chat.chosen_weights(RunLayout.of(r["output_dir"]), recipe_args(r).finetune, None).kind == "adapter"
    assert "is older than" in capsys.readouterr().err
    # the merge that refreshes it is the recipe's, with the overrides typed (a bare `make merge` before)
    from pipeline.recipe import resolve

    from tests.acceptance.harness import write_data

    write_data(tmp_path / "data")
    (tmp_path / "r.yaml").write_text(f"model_name_or_path: tiny\ndataset: tiny_sft\ndataset_dir: {tmp_path / 'data'}\n"
                                     "template: alpaca\n")
    typed = resolve(tmp_path / "r.yaml", [f"output_dir={out}"], command="generate")
    assert chat.chosen_weights(RunLayout.of(out), recipe_args(typed).finetune, None, typed).kind == "adapter"
    assert (f"(`make merge RECIPE={tmp_path / 'r.yaml'} ARGS=output_dir={out}` (python -m pipeline merge "
            f"{tmp_path / 'r.yaml'} output_dir={out}) refreshes it)") in capsys.readouterr().err
    assert chat.chosen_weights(RunLayout.of(r["output_dir"]), recipe_args(r).finetune, "merged").kind == "merged"
    # asked for by name: used, but not silently (it answered with weights older than the training)
    assert "--model merged: " in capsys.readouterr().err


def test_a_recipes_export_dir_is_its_merged_model_for_chat_and_eval(tmp_path):
    """With export_dir in the recipe, merge writes the merged model there; `generate --model merged` then said
    "no merged model at output_dir/merged; produce it with `make merge`" right after `make merge`, and eval
    passed the merged model over. Both now take export_dir as the run's merged model."""
    from tests.acceptance.harness import pipeline, write_data, write_recipe

    write_data(tmp_path / "datasets")
    write_recipe(tmp_path / "r.yaml", model_name_or_path="tiny", finetuning_type="full", output_dir="saves/r",
                 export_dir="exports/r", max_steps=1)
    pipeline("build", "r.yaml", cwd=tmp_path)
    pipeline("train", "r.yaml", cwd=tmp_path)
    pipeline("merge", "r.yaml", cwd=tmp_path)
    assert (tmp_path / "exports/r/config.json").is_file() and not (tmp_path / "saves/r/merged").exists()
    merged = pipeline("generate", "r.yaml", "--model", "merged", "--prompt", "Say hi", cwd=tmp_path).stdout
    # the adapter's in-process (as_typed=False): generate runs as typed just above; it keeps no process state
    assert merged == pipeline("generate", "r.yaml", "--model", "adapter", "--prompt", "Say hi", cwd=tmp_path,
                              as_typed=False).stdout
    pipeline("eval", "r.yaml", cwd=tmp_path)
    report = (tmp_path / "saves/r/eval/metrics.json").read_text()
    assert '"tuned_model": "exports/r (merged' in report, report
