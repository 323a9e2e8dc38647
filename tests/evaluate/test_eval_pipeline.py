"""merge and eval on a finished-looking tiny run: the files they write hold what is promised, and the numbers
match independent computations (transformers for the export, plain cross-entropy for the loss)."""
from __future__ import annotations

import json
import math
import os
import re
import unicodedata
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from pipeline import merge
from pipeline.recipe.args import data_args
from pipeline.errors import UserError
from pipeline.evaluate import metrics as M
from pipeline.evaluate import run as E


def _merge(r):
    merge.run(r)
    return Path(r["output_dir"]) / "merged"


def _leftovers(out: Path) -> list[str]:
    return [p.name for p in out.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------- merge
def test_merge_writes_a_verified_hf_model(make_run):
    transformers = pytest.importorskip("transformers")
    from pipeline.data.tokenize import tokenized_split
    from pipeline.model.build import load_for_inference
    from pipeline.recipe.args import recipe_args

    r = make_run(command="merge")
    merged = _merge(r)
    verification = json.loads((merged / "verification.json").read_text())
    assert verification["samples"] == 4 and verification["logits"]["fp32"] < 1e-4
    hf = transformers.GPT2LMHeadModel.from_pretrained(merged).eval()
    adapted = load_for_inference(recipe_args(r).model, "adapter", Path(r["output_dir"]) / "adapter", device="cpu")
    ids = torch.tensor([tokenized_split(data_args(r), "val").example(0).input_ids])
    with torch.no_grad():
        want, got = adapted(ids), hf(ids).logits
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    # the tokenizer travels with it
    tok = transformers.AutoTokenizer.from_pretrained(merged)
    assert tok.eos_token_id == 50256 and tok.encode("What is 2 plus 2?") == [2061, 318, 362, 5556, 362, 30]
    assert not _leftovers(Path(r["output_dir"]))


def test_merge_without_adapter_says_how_to_make_one(make_run):
    r = make_run(command="merge")
    adapter = Path(r["output_dir"]) / "adapter"
    for f in adapter.iterdir():
        f.unlink()
    adapter.rmdir()
    with pytest.raises(UserError) as err:
        merge.run(r)
    assert "no adapter here" in err.value.messages[0] and "make train" in err.value.messages[0]
    assert not (Path(r["output_dir"]) / "merged").exists()


def test_merge_refuses_an_adapter_file_with_zero_b_and_writes_nothing(make_run):
    r = make_run(command="merge")
    out = Path(r["output_dir"])
    _merge(r)
    before = (out / "merged" / "model.safetensors").read_bytes()
    weights = out / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = "base_model.model.transformer.h.1.mlp.c_fc.lora_B.weight"
    tensors[key] = torch.zeros_like(tensors[key])  # what an adapter saved before any step looks like
    save_file(tensors, weights)
    with pytest.raises(UserError) as err:
        merge.run(r)
    (message,) = err.value.messages
    assert message.startswith(f"{out / 'adapter'}: lora_B is all zero in 1 of its ") and "(h.1.mlp.c_fc)" in message
    assert (out / "merged" / "model.safetensors").read_bytes() == before  # the previous export is untouched
    assert not _leftovers(out)


def test_merge_with_a_wrong_scale_is_caught(make_run, monkeypatch):
    from pipeline.model import lora

    real = lora.fold_lora

    def doubled(wrapper):  # a fold that puts in 2 x the update of the qkv projections (192 x 64 in tiny)
        linear = real(wrapper)
        if tuple(linear.weight.shape) == (192, 64):
            with torch.no_grad():
                linear.weight += wrapper.lora.delta_weight()
        return linear

    monkeypatch.setattr(lora, "fold_lora", doubled)
    r = make_run(command="merge")
    with pytest.raises(UserError) as err:
        merge.run(r)
    assert err.value.messages[0].startswith("layer h.0.attn.c_attn: merged weight - base weight is not the LoRA")
    assert not (Path(r["output_dir"]) / "merged").exists()


def test_merge_full_finetuning_is_a_reexport(make_run):
    transformers = pytest.importorskip("transformers")
    from pipeline.model.weights import load_model

    r = make_run("export_dtype=bf16", finetuning_type="full", command="merge")
    merged = _merge(r)
    hf = transformers.GPT2LMHeadModel.from_pretrained(merged, dtype="auto").eval()
    assert hf.lm_head.weight.dtype == torch.bfloat16
    trained = load_model(Path(r["output_dir"]) / "model").eval()
    ids = torch.tensor([[464, 2068, 7586, 21831, 318]])
    with torch.no_grad():
        want, got = trained(ids), hf.float()(ids).logits
    assert (got - want).abs().max() <= 5e-2 * want.abs().max()  # bf16 weights
    assert json.loads((merged / "verification.json").read_text())["changed_tensors"] > 0


def test_merge_full_model_equal_to_base_is_refused(make_run):
    from pipeline.model.build import load_base
    from pipeline.recipe.args import recipe_args
    from pipeline.model.weights import save_model

    r = make_run(finetuning_type="freeze", command="merge")
    save_model(load_base(recipe_args(r).model), Path(r["output_dir"]) / "model")  # "trained" but identical to the base
    with pytest.raises(UserError) as err:
        merge.run(r)
    assert "every weight equals the base model" in err.value.messages[0]


# ---------------------------------------------------------------- eval
def _independent_loss(model, r) -> tuple[float, int]:
    """Sum of -log p(target) over trained tokens, from full logits, one example at a time."""
    from pipeline.data.tokenize import tokenized_split

    data = tokenized_split(data_args(r), "val")
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(data)):
            ex = data.example(i)
            ids, labels = torch.tensor(ex.input_ids), torch.tensor(ex.labels)
            logits = model(ids[None, :-1])[0]
            keep = labels[1:] != -100
            total += F.cross_entropy(logits[keep], labels[1:][keep], reduction="sum").item()
            count += int(keep.sum())
    return total, count


ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                 "request.\n\n### Instruction:\n{instruction}{input}\n\n### Response:\n")  # the book's format


def _squad_words(text: str) -> list[str]:
    """The words token F1 compares, written out independently of pipeline.evaluate.metrics: NFKC, case-folded,
    runs of word characters (SQuAD's normalisation without its article removal; punctuation dropped)."""
    return re.findall(r"\w+", unicodedata.normalize("NFKC", text).casefold())


def _hand_exact_match(prediction: str, reference: str) -> float:
    """Equal after NFKC and whitespace collapsing; case matters."""
    def squash(text: str) -> str:
        return " ".join(unicodedata.normalize("NFKC", text).split())

    return float(squash(prediction) == squash(reference))


def _hand_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1 (Rajpurkar et al. 2016, its evaluate-v1.1.py) on _squad_words."""
    from collections import Counter

    pred, ref = _squad_words(prediction), _squad_words(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def test_hand_scores_on_fixed_strings():
    """The hand-written scorers above agree with numbers worked out on paper (and so do ours)."""
    cases = [("4 plus 4 is 8.", "4 plus 4 is 8.", 1.0, 1.0),
             ("4  plus 4 is 8.", "4 plus 4 is 8.", 1.0, 1.0),  # whitespace collapsed
             ("Four plus 4 is 8", "4 plus 4 is 8.", 0.0, 0.8),  # 4 of 5 words each way: P = R = 0.8
             ("is 8", "4 plus 4 is 8.", 0.0, 2 * 1.0 * 0.4 / 1.4),  # P = 2/2, R = 2/5
             ("Cat", "cat", 0.0, 1.0), ("", "x", 0.0, 0.0)]
    for pred, ref, em, f1 in cases:
        assert (_hand_exact_match(pred, ref), _hand_f1(pred, ref)) == (em, pytest.approx(f1))
        assert (M.exact_match(pred, ref), M.token_f1(pred, ref)) == (em, pytest.approx(f1))


def test_eval_writes_base_vs_tuned(make_run, tmp_path):
    """Predictions are transformers' greedy decoding of the same base checkpoint (written by save_pretrained) and of
    PEFT's loading of our adapter on it; scores are computed by hand; losses by plain cross-entropy."""
    import peft
    import transformers

    from pipeline.data.tokenizer import gpt2

    from pipeline.data.load import load_split
    from pipeline.model.build import load_for_inference
    from pipeline.recipe.args import recipe_args
    from tests.acceptance.harness import write_hf_checkpoint

    write_hf_checkpoint(tmp_path / "base", n_positions=128)
    r = make_run("max_eval_samples=4", f"model_name_or_path={tmp_path / 'base'}")
    E.run(r)
    out = Path(r["output_dir"]) / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["results"]) == {"base", "tuned"} and metrics["n_examples"] == 4
    assert "adapter" in metrics["tuned_model"]  # no merged/ yet: base + adapter
    assert metrics["decoding"] == {"do_sample": False, "max_new_tokens": 6, "batch_size": 1}

    tok = gpt2().encoding.tiktoken  # tiktoken's GPT-2 encoding itself (the ranks travel with the pipeline: no download)
    rows = load_split(data_args(r), "val")[:4]
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 4
    references = {"base": transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base").eval(),
                  "tuned": peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base"),
                                                          Path(r["output_dir"]) / "adapter").eval()}
    for name, which in (("base", "base"), ("tuned", "adapter")):
        model = load_for_inference(recipe_args(r).model, which, Path(r["output_dir"]) / which, device="cpu")
        loss_sum, tokens = _independent_loss(model, r)
        res = metrics["results"][name]
        assert res["loss_tokens"] == tokens and res["loss"] == pytest.approx(loss_sum / tokens, rel=1e-5)
        assert res["perplexity"] == pytest.approx(math.exp(loss_sum / tokens), rel=1e-5)
        # predictions: the first 4 val rows, each the greedy completion of its templated prompt
        for row, line in zip(rows, lines):
            assert line["reference"] == row["output"] and row["instruction"] in line["prompt"]
            given = f"\n\n### Input:\n{row['input']}" if row.get("input") else ""
            ids = tok.encode_ordinary(ALPACA_PROMPT.replace("{instruction}", row["instruction"]).replace("{input}", given))
            with torch.no_grad():
                new = references[name].generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                                max_new_tokens=6, do_sample=False, eos_token_id=50256,
                                                pad_token_id=50256)[0, len(ids):].tolist()
            golden = tok.decode([t for t in new if t != 50256])
            assert line[f"{name}_prediction"] == golden
            scores = line[f"{name}_scores"]
            assert scores["exact_match"] == _hand_exact_match(golden, row["output"])
            assert scores["f1"] == pytest.approx(_hand_f1(golden, row["output"]))
        assert res["exact_match"] == pytest.approx(sum(_hand_exact_match(line[f"{name}_prediction"], row["output"])
                                                       for row, line in zip(rows, lines)) / 4)
        assert res["f1"] == pytest.approx(sum(_hand_f1(line[f"{name}_prediction"], row["output"])
                                              for row, line in zip(rows, lines)) / 4)
    assert [line["base_prediction"] for line in lines] != [line["tuned_prediction"] for line in lines]
    md = (out / "report.md").read_text()
    assert "| loss (nats/token) |" in md and "![metrics base vs tuned](metrics.png)" in md


def test_eval_prefers_an_up_to_date_merged_model(make_run):
    r = make_run("eval_base=false")
    _merge(r)
    assert E.tuned_model(r).kind == "merged"
    adapter = Path(r["output_dir"]) / "adapter" / "adapter_config.json"
    later = (Path(r["output_dir"]) / "merged" / "config.json").stat().st_mtime + 10
    os.utime(adapter, (later, later))  # retrained after the merge
    assert E.tuned_model(r).kind == "adapter"
    E.run(r)
    metrics = json.loads((Path(r["output_dir"]) / "eval" / "metrics.json").read_text())
    assert set(metrics["results"]) == {"tuned"} and metrics["delta"] == {}


def test_eval_without_training_says_make_train(make_run):
    import shutil

    r = make_run()
    shutil.rmtree(Path(r["output_dir"]) / "adapter")
    with pytest.raises(UserError) as err:
        E.run(r)
    assert "make train" in err.value.messages[0]


def test_eval_pt_stage_loss_only(make_run):
    from pipeline.data.tokenize import pt_stream
    from pipeline.model.build import load_for_inference
    from pipeline.recipe.args import recipe_args

    r = make_run("cutoff_len=32", stage="pt", finetuning_type="full")
    E.run(r)
    out = Path(r["output_dir"]) / "eval"
    assert {p.name for p in out.iterdir()} == {"metrics.json", "report.md"}
    metrics = json.loads((out / "metrics.json").read_text())
    # the book's windows: starts 0, 32, ... < len - 32; inputs [s, s+32), targets shifted by one
    stream = torch.tensor(pt_stream(data_args(r), "val").astype("int64"))
    starts = range(0, len(stream) - 32, 32)
    model = load_for_inference(recipe_args(r).model, "model", Path(r["output_dir"]) / "model", device="cpu")
    with torch.no_grad():
        losses = [F.cross_entropy(model(stream[s:s + 32][None])[0], stream[s + 1:s + 33], reduction="sum").item()
                  for s in starts]
    tuned = metrics["results"]["tuned"]
    assert tuned["loss_tokens"] == 32 * len(starts)
    assert tuned["loss"] == pytest.approx(sum(losses) / (32 * len(starts)), rel=1e-5)
    assert "f1" not in tuned and metrics["results"]["base"]["loss"] != tuned["loss"]


def test_cli_exit_code_2_for_a_missing_adapter(make_run, capsys):
    from pipeline.__main__ import main

    r = make_run(trained=False)
    assert main(["merge", str(r.recipe_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "make train" in err and "Traceback" not in err


@pytest.mark.multirank
def test_eval_on_two_ranks_equals_one_rank(make_run):
    """Two ranks (the environment the deepspeed launcher sets) shard the examples; rank 0 writes the same files."""
    import subprocess
    import sys

    from pipeline.runtime.dist import free_port
    from tests.ports import ATTEMPTS, port_taken

    r = make_run()
    E.run(r)
    out = Path(r["output_dir"]) / "eval"
    one = json.loads((out / "metrics.json").read_text()), (out / "predictions.jsonl").read_text()
    for attempt in range(ATTEMPTS):  # a port found free may be taken before rank 0 binds it: retry on a clash
        port, procs = str(free_port()), []
        for rank in range(2):
            env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "PYTHONPATH": str(Path.cwd())}
            procs.append(subprocess.Popen([sys.executable, "-m", "pipeline", "eval", str(r.recipe_path)], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        errs = [proc.communicate(timeout=300)[1] for proc in procs]
        if all(proc.returncode == 0 for proc in procs) or not any(map(port_taken, errs)):
            break
    for proc, err in zip(procs, errs):
        assert proc.returncode == 0, err[-2000:]
    two = json.loads((out / "metrics.json").read_text()), (out / "predictions.jsonl").read_text()
    assert two[0]["world_size"] == 2 and two[1] == one[1]  # every example once, in order, same completions
    for name in ("base", "tuned"):
        assert two[0]["results"][name]["loss_tokens"] == one[0]["results"][name]["loss_tokens"]
        assert two[0]["results"][name]["loss"] == pytest.approx(one[0]["results"][name]["loss"], rel=1e-6)


def test_train_zero3_then_merge_then_eval_agree(tmp_path, monkeypatch):
    """The real chain: an adapter trained under ZeRO-3 merges, and eval's tuned loss is the trainer's final eval_loss
    (same examples, same masks), for the merged model and for base + adapter alike."""
    from tests.evaluate.conftest import resolve_run, write_run

    from pipeline.data.build import build
    from pipeline.runtime import dist
    from pipeline.train.run import train

    dist.ensure_launch_env()
    monkeypatch.setenv("WORLD_SIZE", "1")
    recipe = write_run(tmp_path, extra="zero_stage: 3\nlearning_rate: 0.01\nwarmup_steps: 0\n"
                                       "per_device_train_batch_size: 4\nlogging_steps: 1\nplot_loss: false\n")
    build(data_args(resolve_run(recipe, command="train")))
    trained = train(resolve_run(recipe, "max_steps=3", command="train"))
    assert trained.exit_code == 0
    out = Path(trained.output_dir)
    final_eval_loss = json.loads((out / "all_results.json").read_text())["eval_loss"]

    merge.run(resolve_run(recipe, command="merge"))
    r = resolve_run(recipe, "max_eval_samples=2")
    E.run(r)
    merged_metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert "merged" in merged_metrics["tuned_model"]
    assert merged_metrics["results"]["tuned"]["loss"] == pytest.approx(final_eval_loss, rel=1e-5)
    assert merged_metrics["results"]["base"]["loss"] != pytest.approx(final_eval_loss, rel=1e-3)
    assert merged_metrics["training"]["global_step"] == 3
    assert "Trained 3 optimizer steps" in (out / "eval" / "report.md").read_text()

    import shutil

    shutil.rmtree(out / "merged")
    E.run(resolve_run(recipe, "max_eval_samples=2", "eval_base=false"))  # the base's loss: the run above
    adapter_metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert "adapter" in adapter_metrics["tuned_model"]
    assert adapter_metrics["results"]["tuned"]["loss"] == pytest.approx(final_eval_loss, rel=1e-5)


def test_the_trained_adapter_comes_before_adapter_name_or_path(make_run, tmp_path):
    """A recipe that continues training from adapter_name_or_path merges/evaluates what it trained."""
    import shutil

    from tests.evaluate.conftest import resolve_run

    r = make_run()
    out = Path(r["output_dir"])
    start = tmp_path / "start_adapter"
    shutil.copytree(out / "adapter", start)
    r2 = resolve_run(r.recipe_path, f"adapter_name_or_path={start}", command="merge")
    assert merge.adapter_dir(r2) == out / "adapter" and E.tuned_model(r2).path == out / "adapter"
    shutil.rmtree(out / "adapter")  # nothing trained here: merge the given adapter
    assert merge.adapter_dir(r2) == start and E.tuned_model(r2).path == start
    merge.run(r2)
    assert json.loads((out / "merged" / "verification.json").read_text())["source"] == str(start)


def test_a_reasoning_templates_thought_is_not_scored(tmp_path, monkeypatch):
    """qwen3 (enable_thinking: true, the default) trains every answer to open with the empty thought
    "<think>\\n\\n</think>\\n\\n"; eval scored that markup as words of the answer, so a tuned model answering exactly
    right had exact match 0 and F1 0.8. The thought is now removed from prediction and reference before scoring."""
    from tests.acceptance.harness import write_hf_checkpoint
    from tests.evaluate.conftest import resolve_run, write_run
    from pipeline.data.model_tokenizer import recipe_tokenizer
    from pipeline.recipe.args import GenerationArgs, eval_args
    import pipeline.data.load as load
    import pipeline.model.generate as G

    write_hf_checkpoint(tmp_path / "qwen3", "qwen3", small_vocab=True)
    recipe = write_run(tmp_path)
    recipe.write_text(recipe.read_text().replace("model_name_or_path: tiny", f"model_name_or_path: {tmp_path / 'qwen3'}")
                      .replace("template: alpaca", "template: qwen3"))
    r = resolve_run(recipe, "per_device_eval_batch_size=2")
    data, ev = data_args(r), eval_args(r)
    rows = [{"instruction": "What is 2 plus 2?", "input": "", "output": "<think>\nadd them\n</think>\n\n2 plus 2 is 4."},
            {"instruction": "What is 1 plus 1?", "input": "", "output": "1 plus 1 is 2."}]
    monkeypatch.setattr(load, "load_split", lambda data, split: rows)
    refs = [row["output"] for row in E._generation_rows(r, data, ev)]
    assert refs == ["2 plus 2 is 4.", "1 plus 1 is 2."]
    tokenizer = recipe_tokenizer(data)
    said = [tokenizer.encode("<think>\n\n</think>\n\n2 plus 2 is 4."), tokenizer.encode("1 plus 1 is 2.")]
    monkeypatch.setattr(G, "generate", lambda model, prompts, **kw: said[:len(prompts)])
    predictions = E.generate_predictions(torch.nn.Linear(1, 1), data, GenerationArgs.from_recipe(r), ev, rows[:2])
    assert predictions == refs


def test_a_merge_into_a_place_it_cannot_write_is_refused_before_the_work(make_run, monkeypatch):
    """merge/export into a read-only file system loaded, merged and verified the whole model first and only then
    failed on the first write (a traceback before a4f0386); the target's folder is now checked up front."""
    import pipeline.merge as M

    r = make_run(command="merge")
    out = Path(r["output_dir"]).resolve()
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path).resolve() != out and real(path, mode, **kw))
    monkeypatch.setattr(M, "merge_adapter", lambda *a, **k: pytest.fail("merged before checking the target"))
    with pytest.raises(UserError) as err:
        M.run(r)
    (message,) = err.value.messages
    assert f"{out} is not writable" in message and "output_dir" in message, message
    assert not (out / "merged").exists()
