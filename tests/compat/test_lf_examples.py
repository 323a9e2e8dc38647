"""LLaMA-Factory's own example recipes, unchanged but for model_name_or_path, through our CLI.

tests/compat/lf_examples/train_lora/ (but qwen3_lora_sft.yaml, which test_lf_recipes.py runs) and extras/ are
verbatim copies of LLaMA-Factory's examples/ (Apache-2.0; main after v0.9.5, see lf_examples/NOTICE.md).
docs/coming-from-llama-factory.md, "LLaMA-Factory's examples", says what each does here; this file reads that
table and holds every copy to it, so the table cannot drift. Runs are cut short only by command-line overrides,
each one said at its call. Golden values come from PEFT (the adapters load there and give our logits).
build runs as typed in the preprocess test; before a training run it runs in this process (as_typed=False: the same
code, no interpreter start); training, merge and eval runs stay typed.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.acceptance.harness import assert_close, pipeline, trained_model, write_hf_checkpoint
from tests.compat.test_lf_recipes import EXAMPLES, lf_checkout
from tests.reliability.rel_helpers import run_main

PAGE = Path(__file__).resolve().parents[2] / "docs" / "coming-from-llama-factory.md"
TABLED = ("train_lora", "extras")  # the example folders the table covers


def table() -> dict[str, str]:
    """example path -> its "here" cell, read from the page's section."""
    section = PAGE.read_text("utf-8").split("## LLaMA-Factory's examples", 1)[1].split("\n## ", 1)[0]
    return {m[1]: m[2].strip() for m in re.finditer(r"^\| `([^`]+)` \| ([^|]+) \|", section, re.M)}


ROWS = table()


def test_the_table_lists_every_copied_example_and_only_those():
    copies = {str(p.relative_to(EXAMPLES)) for folder in TABLED for p in (EXAMPLES / folder).rglob("*")
              if p.is_file()}
    tabled = {path for path, here in ROWS.items() if here != "not a recipe"}
    assert tabled == copies
    assert all(not (EXAMPLES / path).exists() for path, here in ROWS.items() if here == "not a recipe")
    assert all(re.fullmatch(r"trains|builds|not a recipe|refused: `\w+`(, `\w+`)*", here) for here in ROWS.values())


def tiny_model(directory: Path, family: str, **overrides: int) -> Path:
    """The family's tokenizer markup (the recipes' llama3 / qwen templates need it) and a 2,048-token context
    (their cutoff_len): a small vocabulary keeps it tiny."""
    write_hf_checkpoint(directory, family, small_vocab=True, max_position_embeddings=2048, **overrides)
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lf_models")
    # llama_pro: the block count of an expanded model (8 + 8), which freeze_trainable_layers: 8 must divide; the
    # expansion and the training are tests/compat/test_llama_pro.py's
    return {"llama": tiny_model(root / "llama", "llama"), "qwen": tiny_model(root / "qwen", "qwen3"),
            "llama_pro": tiny_model(root / "llama_pro", "llama", num_hidden_layers=16)}


@pytest.fixture(scope="module")
def checkouts(tmp_path_factory, models) -> dict[str, Path]:
    """LLaMA-Factory-like working copies whose recipes all name one model: a llama or a qwen one."""
    return {family: lf_checkout(tmp_path_factory.mktemp(f"lf_{family}"), str(path)) for family, path in models.items()}


def family(example: str) -> str:
    return "llama_pro" if "llama_pro/" in example else "llama" if "llama3" in example else "qwen"


@pytest.mark.parametrize("example", sorted(p for p, here in ROWS.items() if here != "not a recipe"))
def test_validate_does_what_the_table_says(example, checkouts):
    here = ROWS[example]
    done = run_main(["validate", f"examples/{example}"], checkouts[family(example)])
    assert "Traceback" not in done.err
    errors = [line for line in done.err.splitlines() if line.startswith("error: ")]
    unknown = {m[1] for line in errors if (m := re.search(r"(\w+): unknown key", line))}
    assert not unknown, f"LLaMA-Factory keys reported as unknown: {unknown}"
    if here in ("trains", "builds"):
        assert f"recipe: OK (examples/{example};" in done.out, done.err
        assert all("is not built" in line for line in errors), errors  # validate before build: only that
        return
    assert done.code == 2
    for key in re.findall(r"`(\w+)`", here):  # each named key at its file and line, with a reason after it
        assert any(re.match(rf"error: \S+?(:\d+:\d+: |:\d+: \"\w+\"\.columns\.|: ){key}: \S.{{20,}}", line)
                   for line in errors), (key, errors)  # a dataset's column: at its dataset_info.json line
    if example.startswith("train_lora/") and any(".columns." not in line for line in errors):  # the recipe's own
        # file and line (a dataset's column is refused at its dataset_info.json line alone)
        assert any(line.startswith(f"error: examples/{example}:") for line in errors), errors


def test_an_extras_feature_is_refused_once_and_its_companion_keys_print_a_notice(checkouts):
    """fp8 (a feature not here) is the error, at its line; fp8_backend says it only matters with it (the example's
    DeepSpeed JSON forces DeepSpeed's CPU Adam, refused on its own: a ZeRO-3 JSON in its place). Qwen3-VL's template
    is known (its decoder trains on text); the example's image dataset is what is refused."""
    work, fp8 = checkouts["llama"], "examples/extras/fp8/llama3_fp8_deepspeed_sft.yaml"
    zero3 = "deepspeed=examples/deepspeed/ds_z3_config.json"
    err = run_main(["validate", fp8, zero3], work).err
    assert f"error: {fp8}:39:6: fp8: given true: FP8 training is not implemented here" in err, err
    assert "fp8_backend:" not in err
    err = run_main(["validate", fp8, zero3, "fp8=false"], work).err
    assert not any(line.startswith("error: examples/") for line in err.splitlines())  # data not built: no file
    assert (f"notice: {fp8}:40:14: fp8_backend: accepted without effect: it only matters with fp8 (FP8 training), "
            "which is not implemented here") in err, err
    err = run_main(["validate", "examples/train_lora/qwen3vl_lora_sft.yaml"], checkouts["qwen"]).err
    assert "template:" not in err and '"mllm_demo".columns.images: multimodal data (images) is not supported' in err


def test_dataset_dir_forms_of_llama_factory_that_are_not_folders_say_what_to_do(checkouts):
    ray = "examples/train_lora/qwen3_lora_sft_ray.yaml"  # dataset_dir: REMOTE:llamafactory/demo_data
    err = run_main(["validate", ray], checkouts["qwen"]).err
    assert (f"error: {ray}:14:14: dataset_dir: given 'REMOTE:llamafactory/demo_data': LLaMA-Factory's REMOTE:<repo> "
            "reads dataset_info.json from a hub dataset repository; here dataset_dir is a local folder. Download the "
            "repository (`hf download --repo-type dataset llamafactory/demo_data --local-dir data_remote`) and set "
            "dataset_dir: data_remote") in err
    assert "is not a folder" not in err
    err = run_main(["validate", ray, "dataset_dir=ONLINE"], checkouts["qwen"]).err
    assert "dataset_dir: given 'ONLINE': LLaMA-Factory's ONLINE (every dataset name is a hub repository)" in err


def test_preprocess_example_builds_the_data_and_says_what_tokenized_path_does_here(tmp_path, models):
    """LLaMA-Factory tokenizes into tokenized_path and exits; `build` is that step here."""
    work = lf_checkout(tmp_path, str(models["qwen"]))
    done = pipeline("build", "examples/train_lora/qwen3_preprocess.yaml", cwd=work)
    assert ("qwen3_preprocess.yaml:18:17: tokenized_path: accepted without effect" in done.stderr
            and "preprocess-only run (tokenize, save to tokenized_path, exit) is `python -m pipeline build RECIPE` "
                "here" in done.stderr)
    for name in ("identity", "alpaca_en_demo"):
        assert (work / "data/build" / name / "manifest.json").is_file()
    assert not (work / "saves").exists()  # nothing trained, nothing written at tokenized_path


def test_pretrain_example_with_too_little_held_out_text_is_refused_by_validate_in_trains_words(tmp_path, models):
    """LLaMA-Factory's pt example holds nothing out (its val_size default is 0); ours holds out 0.1 of the corpus, and
    train evaluates it at the end. Too little of it for one window was 'data: OK' from validate, then train stopped
    without naming a key or val_size (failed before). cutoff_len=40: our demo c4_demo holds out 38 tokens here, the
    9 other documents fill windows (the example's 2,048 would leave the train split without one)."""
    work = lf_checkout(tmp_path, str(models["qwen"]))
    example, used = "examples/train_lora/qwen3_lora_pretrain.yaml", ["max_samples=16", "cutoff_len=40"]
    pipeline("build", example, *used, cwd=work, as_typed=False)
    done = pipeline("validate", example, *used, cwd=work, expect=2)
    again = (f"python -m pipeline build {example} cutoff_len=40 max_samples=16 val_size=0 && python -m pipeline train "
             f"{example} cutoff_len=40 max_samples=16 val_size=0")  # the overrides in key order
    assert [line for line in done.stderr.splitlines() if line.startswith("error:")] == [
        "error: command line override cutoff_len=40: cutoff_len: the val split has no windows; it has 38 tokens and "
        "one window needs cutoff_len + 1 = 41; lower cutoff_len or add text, or hold out nothing with val_size: 0 "
        "(LLaMA-Factory's default; val_size 0.1 is the default here), which evaluates nothing: "
        f"`{again}`"], done.stderr


def assert_adapter_loads_in_peft(work: Path, example: str, base: Path, run: Path, overrides: list[str]) -> None:
    """PEFT loads the adapter onto the checkpoint transformers wrote, and gives the logits our loader gives."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    config = json.loads((run / "adapter/adapter_config.json").read_text("utf-8"))
    assert config["r"] == 8 and config["peft_type"] == "LORA"
    tensors = load_file(run / "adapter/adapter_model.safetensors")
    assert any(name.endswith("lora_B.weight") and value.abs().max() > 0 for name, value in tensors.items())  # trained
    ids = torch.tensor([[3, 17, 42, 99, 120, 7]])
    if config["task_type"] == "SEQ_CLS":  # stage rm: a reward model, its score at the last token (batch of one)
        assert "reward" in example and config["modules_to_save"] == ["score"]
        hf_base = transformers.AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
        theirs = peft.PeftModel.from_pretrained(hf_base, run / "adapter")
        with torch.no_grad():
            want = theirs.eval()(ids).logits[:, 0]
            got = trained_model(f"examples/{example}", work, overrides)(ids)[:, -1, 0]
        assert torch.allclose(want, got, rtol=1e-5, atol=1e-5), (want, got)
        return
    theirs = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), run / "adapter")
    with torch.no_grad():
        want = theirs.eval()(ids).logits
        got = trained_model(f"examples/{example}", work, overrides)(ids)
    assert_close(want, got)


# max_steps=2 (test time): the recipes' warmup_ratio 0.1 makes step 1's learning rate 0 (as in LLaMA-Factory), and
# PEFT's LoRA init (B = 0) would leave the adapter the identity; step 2 moves it.
TRAINED = [  # example, overrides beyond max_steps, its output_dir, the ZeRO stage of its deepspeed JSON
    # (train_lora/qwen3_lora_dpo.yaml: tests/compat/test_ref_model_adapters_example.py trains that file through the
    # CLI, with a reference added, and loads its adapter in PEFT; DPO from a fresh adapter is
    # tests/acceptance/test_dpo_cli.py's)
    # gradient_accumulation_steps=1: our demo kto_en_demo holds 4 rows, fewer than the example's 8 micro-batches;
    # per_device_train_batch_size 1 as the example: a KL estimate of one row
    ("train_lora/qwen3_lora_kto.yaml", ["gradient_accumulation_steps=1"], "saves/qwen3-4b/lora/kto", None),
    ("train_lora/qwen3_lora_reward.yaml", ["gradient_accumulation_steps=1"], "saves/qwen3-4b/lora/reward", None),
    # cutoff_len=32: our demo c4_demo holds 362 train and 38 val tokens here, less than one 2,049-token window
    ("train_lora/qwen3_lora_pretrain.yaml", ["cutoff_len=32"], "saves/qwen3-4b/lora/pretrain", None),
    ("train_lora/qwen3_lora_sft_ds3.yaml", [], "saves/qwen3-4b/lora/sft", 3),
    ("extras/loraplus/llama3_lora_sft.yaml", [], "saves/llama3-8b/lora/sft", None),
]


@pytest.mark.slow  # ~10-15 s each: builds and trains two steps through the CLI
@pytest.mark.parametrize("example, overrides, output_dir, zero_stage", TRAINED)
def test_example_trains_and_its_adapter_loads_in_peft(tmp_path, models, example, overrides, output_dir, zero_stage):
    assert ROWS[example] == "trains"
    work = lf_checkout(tmp_path, str(models[family(example)]))
    used = ["max_steps=2", *overrides]
    pipeline("build", f"examples/{example}", *overrides, cwd=work, as_typed=False)
    pipeline("train", f"examples/{example}", *used, cwd=work, timeout=600)
    run = work / output_dir
    assert json.loads((run / "all_results.json").read_text("utf-8"))["global_step"] == 2
    if zero_stage is not None:
        assert json.loads((run / "ds_config.json").read_text("utf-8"))["zero_optimization"]["stage"] == zero_stage
    assert_adapter_loads_in_peft(work, example, models[family(example)], run, used)


# full fine-tuning on LLaMA-Factory's weighted sft losses (their loss against LLaMA-Factory's formula is
# tests/acceptance/test_sft_loss_cli.py's): the example, its output_dir, the key all_results.json records
FULL = [("extras/dft/qwen2_full_sft.yaml", "saves/qwen2-1_5b/full/sft", "use_dft_loss"),
        ("extras/eaft/qwen25_05b_eaft_full.yaml", "qwen2.5-0_5b/full/sft_eaft", "use_eaft_loss")]


@pytest.mark.slow  # ~15 s each: builds, trains two steps (one micro-batch each: the suite's time) and merges
@pytest.mark.parametrize("example, output_dir, key", FULL)
def test_full_example_trains_on_its_loss_and_its_merged_model_loads_in_transformers(tmp_path, models, example, output_dir,
                                                                              key):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    assert ROWS[example] == "trains"
    work = lf_checkout(tmp_path, str(models["qwen"]))
    used = ["max_steps=2", "gradient_accumulation_steps=1"]
    pipeline("build", f"examples/{example}", cwd=work, as_typed=False)
    err = pipeline("train", f"examples/{example}", *used, cwd=work, timeout=600).stderr
    assert f"loss: {key[4:].split('_')[0].upper()}-weighted cross-entropy" in err, err
    run = work / output_dir
    results = json.loads((run / "all_results.json").read_text("utf-8"))
    assert results["global_step"] == 2 and results[key] is True
    pipeline("merge", f"examples/{example}", *used, cwd=work)
    ids = torch.tensor([[3, 17, 42, 99, 120, 7]])
    with torch.no_grad():
        want = transformers.AutoModelForCausalLM.from_pretrained(run / "merged").eval()(ids).logits
        got = trained_model(f"examples/{example}", work, used)(ids)
    assert_close(want, got)


@pytest.mark.slow  # ~7 s: builds and generates through the CLI
def test_nlg_eval_example_predicts_with_the_loraplus_adapter_once_told_not_to_train(tmp_path, models):
    """LLaMA-Factory's do_train defaults to false, ours to true, and `dataset` is required here: the example is
    refused (the table), and with do_train=false and a dataset it evaluates the adapter on its eval_dataset. The
    train split of `dataset` (7 rows of identity) is smaller than its batch of 8, which does not matter when
    nothing trains. The adapter at the loraplus example's output_dir is written by PEFT, as a user's adapter from
    elsewhere would be (training that example is test_example_trains_and_its_adapter_loads_in_peft's)."""
    import peft
    import transformers

    work = lf_checkout(tmp_path, str(models["llama"]))
    base = transformers.AutoModelForCausalLM.from_pretrained(models["llama"])
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    peft.get_peft_model(base, config).save_pretrained(work / "saves/llama3-8b/lora/sft")
    predict = ["examples/extras/nlg_eval/llama3_lora_predict.yaml", "do_train=false", "dataset=identity",
               "max_new_tokens=4"]  # max_new_tokens: test time
    pipeline("build", *predict, cwd=work, as_typed=False)
    pipeline("train", *predict, cwd=work)
    metrics = json.loads((work / "saves/llama3-8b/lora/predict/eval/metrics.json").read_text("utf-8"))
    assert "tuned" in metrics["results"] and (work / "saves/llama3-8b/lora/predict/eval/predictions.jsonl").is_file()
