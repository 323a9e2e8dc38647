"""Merge: broken merges are caught and named; the export is GPT-2 for transformers and PEFT; files are atomic.

Through the CLI, merge, export (a success and a refusal) and generate each run as typed once; the further exports
and generates run main(argv) in this process (as_typed=False: the same command line without an interpreter start;
merge and generate keep no process state: their random generators are private, no torch.distributed)."""
from __future__ import annotations

import copy
import json
import os
import shutil
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from pipeline import merge
from pipeline.data.model_tokenizer import recipe_tokenizer
from pipeline.errors import UserError
from pipeline.model import lora as L
from pipeline.model.families import GPT2
from pipeline.model.weights import load_model, save_hf
from pipeline.recipe.args import GenerationArgs, data_args, export_args

SAMPLES = [[464, 3290, 318, 257, 1332, 13], [15496, 11, 466, 345, 588, 8887, 30]]  # real GPT-2 token ids


def adapted_model(seed: int = 0, b_std: float = 0.05, **lora_kwargs) -> nn.Module:
    """tiny base + LoRA on every Linear with a random (trained-looking) B."""
    model = load_model("tiny", seed=seed).eval()
    L.apply_lora(model, lora_kwargs.pop("targets", "all"), rank=4, alpha=8, seed=seed, **lora_kwargs)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for wrapper in L.lora_modules(model).values():
            wrapper.lora.B.copy_(torch.randn(wrapper.lora.B.shape, generator=gen) * b_std)
    return model


def fold_with(monkeypatch, model: nn.Module, wrong: dict[str, str], also=None) -> None:
    """lora.fold_lora replaced by an independent fold W + s (A B)^T, except the layers in `wrong` (our name ->
    'scale' | 'transpose' | 'skip'); `also` is called on each fold (a fold with a side effect)."""
    names = {id(wrapper): name for name, wrapper in L.lora_modules(model).items()}

    def fold(wrapper: L.LinearWithLoRA) -> nn.Linear:
        a, b, s = wrapper.lora.A, wrapper.lora.B, wrapper.lora.scaling
        delta = {"scale": (a @ b).t() * wrapper.lora.alpha, "transpose": s * (a @ b), "skip": 0 * a.sum()}.get(
            wrong.get(names[id(wrapper)]), s * (a @ b).t())
        base = wrapper.linear
        linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
        linear.weight, linear.bias = nn.Parameter(base.weight + delta), base.bias
        if also:
            also()
        return linear

    monkeypatch.setattr(L, "fold_lora", fold)


def test_merge_folds_in_place_and_proves_it():
    model = adapted_model()
    reference = copy.deepcopy(model)
    gone = weakref.ref(L.lora_modules(model)["layers.0.self_attn.qkv_proj"].linear.weight)
    check = merge.merge_verified(model, SAMPLES, "bf16")
    assert len(check.report["layers"]) == 8  # tiny: 2 blocks x (c_attn, attn.c_proj, c_fc, mlp.c_proj)
    assert check.report["logits"]["fp32"] < 1e-5
    assert check.report["logits"]["bf16"] < merge.LOGIT_RTOL["bf16"]
    # a real update survives the bf16 cast: rounding noise is a small part of it
    assert max(layer["update_lost_bf16"] for layer in check.report["layers"].values()) < 0.1
    # the model itself was merged and cast: no wrapper is left, and no base weight is held beside the merged one
    assert check.model is model and not L.lora_modules(model) and gone() is None
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids = torch.tensor([SAMPLES[1]])
    with torch.no_grad():
        want, got = reference(ids), model(ids).float()
    assert (got - want).abs().max() <= merge.LOGIT_RTOL["bf16"] * want.abs().max()


def test_the_independent_fold_of_these_tests_agrees(monkeypatch):
    # so that the fakes below are only wrong where told
    model = adapted_model()
    fold_with(monkeypatch, model, {})
    assert merge.merge_verified(model, SAMPLES, "fp32").report["logits"]["fp32"] < 1e-5


@pytest.mark.parametrize(
    "layer, how, words",
    [
        ("h.1.mlp.c_fc", "scale", "wrong scale"),  # alpha instead of alpha / r
        ("h.0.attn.c_proj", "transpose", "transposed delta"),  # square layer: (A B) instead of (A B)^T
        ("h.1.attn.c_attn", "skip", "equals the base weight"),  # the incumbents' "merged == base"
    ],
)
def test_broken_merge_is_caught_and_named(monkeypatch, layer, how, words):
    model = adapted_model()
    fold_with(monkeypatch, model, {GPT2.from_hf(layer): how})
    with pytest.raises(UserError) as err:
        merge.merge_verified(model, SAMPLES, "fp32")
    assert len(err.value.messages) == 1
    assert f"layer {layer}:" in err.value.messages[0] and words in err.value.messages[0]


def test_all_zero_b_is_an_untrained_adapter():
    model = adapted_model()
    with torch.no_grad():
        L.lora_modules(model)["layers.0.mlp.down_proj"].lora.B.zero_()
    with pytest.raises(UserError) as err:
        merge.merge_verified(model, SAMPLES, "fp32")
    (message,) = err.value.messages
    layers = len(L.lora_modules(model))
    assert f"lora_B is all zero in 1 of its {layers} adapted layers (h.0.mlp.c_proj)" in message, message
    assert "no gradient reached them" in message and "lora_target" in message, message


def test_an_adapter_zero_in_every_layer_is_one_message_with_the_general_causes():
    """No run beside it to name the cause (cause=None): the general ones, once for the whole adapter."""
    model = adapted_model()
    wrappers = L.lora_modules(model)
    with torch.no_grad():
        for wrapper in wrappers.values():
            wrapper.lora.B.zero_()
    with pytest.raises(UserError) as err:
        merge.merge_verified(model, SAMPLES, "fp32", source="a/adapter")
    (message,) = err.value.messages
    assert message.startswith(f"a/adapter: the adapter is untrained: lora_B is all zero in all {len(wrappers)} of its"
                              " adapted layers"), message
    assert "saved before any optimizer step" in message and "Fix: train again" in message, message


def test_a_merge_touching_a_non_lora_weight_is_caught_by_the_logits(monkeypatch):
    model = adapted_model()
    fold_with(monkeypatch, model, {}, also=lambda: model.norm.weight.data.mul_(1.01))
    with pytest.raises(UserError) as err:
        merge.merge_verified(model, SAMPLES, "fp32")
    (message,) = err.value.messages
    assert message.startswith("merged model: logits differ from the adapter model") and "every LoRA layer" in message


def test_the_logit_error_is_the_centred_relative_error_by_hand():
    """_rel_error (computed blockwise without centred copies) is max |centred got - centred want| / max |centred
    want| over every position of every sample; a shift of a position's logits is no error; inf, -inf or nan in
    got is inf. Golden: the definition written out in float64 on 37 positions (more than one block)."""
    gen = torch.Generator().manual_seed(0)
    want = [torch.randn(37, 11, generator=gen) * 4, torch.randn(5, 11, generator=gen)]
    shift = torch.randn(37, 1, generator=gen) * 10  # softmax-invariant, per position
    got = [want[0] + shift + torch.randn(37, 11, generator=gen) * 1e-2, want[1] + 3]
    centred = [(t.double() - t.double().mean(-1, keepdim=True)) for t in (*got, *want)]
    golden = max((centred[0] - centred[2]).abs().max(), (centred[1] - centred[3]).abs().max()) / max(
        centred[2].abs().max(), centred[3].abs().max())
    assert merge._rel_error(got, want) == pytest.approx(golden.item(), rel=1e-3)
    assert merge._rel_error([want[0] + shift], want[:1]) < 1e-5
    for bad in (float("inf"), float("-inf"), float("nan")):
        broken = got[1].clone()
        broken[4, 7] = bad
        assert merge._rel_error([got[0], broken], want) == float("inf")


def test_a_reward_models_scores_are_compared_as_they_are():
    """A reward model gives one score per position (T, 1): no softmax, so a shift is an error (centring one value
    would make every error 0). Golden: max |got - want| / max |want| by hand."""
    want = [torch.tensor([[1.0], [-4.0]]), torch.tensor([[2.0]])]
    assert merge._rel_error([want[0] + 0.5, want[1]], want) == pytest.approx(0.5 / 4)
    assert merge._rel_error([want[0], torch.tensor([[float("nan")]])], want) == float("inf")


def test_update_below_bf16_resolution_is_refused():
    # B ~ 1e-7: in fp32 the weights move (|W| ~ 0.02, ulp ~ 2e-9) but bf16 (ulp ~ 1e-4) rounds them back
    merge.merge_verified(adapted_model(b_std=1e-7), SAMPLES, "fp32")  # fine in fp32
    with pytest.raises(UserError) as err:
        merge.merge_verified(adapted_model(b_std=1e-7), SAMPLES, "bf16")
    (message,) = err.value.messages
    assert message.startswith("export_dtype bf16: casting the merged model loses") and "worst layers: h." in message
    assert "Use export_dtype: fp32" in message


# ---------------------------------------------------------------- export
transformers = pytest.importorskip("transformers")
RECIPE = {"model_name_or_path": "tiny", "export_dtype": "fp32", "export_size": 5, "max_new_tokens": 32, "do_sample": False,
          "temperature": 1.0, "top_k": 0, "top_p": 1.0}


def _export(tmp_path, dtype="fp32", size=5, model=None):
    """(the adapter model, as it was before merging; the exported directory)."""
    model = model or adapted_model()
    adapter_model = copy.deepcopy(model)
    check = merge.merge_verified(model, SAMPLES, dtype)
    recipe = {**RECIPE, "export_dtype": dtype, "export_size": size}
    tokenizer = recipe_tokenizer(data_args(recipe))
    generation = merge.generation_config(GenerationArgs.from_recipe(recipe), tokenizer)
    target = merge.export(check, tmp_path / "merged", export_args(recipe), merge.ExportFiles(tokenizer, generation))
    assert check.model is None  # export let the model go before reading its files back
    return adapter_model, target


def test_export_loads_in_transformers_with_the_adapter_logits(tmp_path):
    model, target = _export(tmp_path)
    assert {p.name for p in target.iterdir()} >= {"config.json", "model.safetensors", "generation_config.json",
                                                    "tokenizer_config.json", "vocab.json", "merges.txt",
                                                    "special_tokens_map.json", "verification.json"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left
    hf = transformers.GPT2LMHeadModel.from_pretrained(target).eval()
    ids = torch.tensor([SAMPLES[1]])
    with torch.no_grad():
        want = model(ids)
        got = hf(ids).logits
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    gen = json.loads((target / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 50256 and gen["max_new_tokens"] == 32 and gen["do_sample"] is False
    verification = json.loads((target / "verification.json").read_text())
    assert verification["logits"]["written"] < 1e-4 and len(verification["layers"]) == 8


def test_export_matches_peft_merge_and_unload(tmp_path):
    """Independent reference: PEFT loads our adapter onto transformers' GPT-2 and merges it itself."""
    peft = pytest.importorskip("peft")
    model, target = _export(tmp_path)
    base = load_model("tiny", seed=0)
    save_hf(base, tmp_path / "base")
    L.save_adapter(model, tmp_path / "adapter")
    hf_base = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    reference = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").merge_and_unload().eval()
    ours = transformers.GPT2LMHeadModel.from_pretrained(target).eval()
    ids = torch.tensor([SAMPLES[0]])
    with torch.no_grad():
        want, got = reference(ids).logits, ours(ids).logits
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    for name, tensor in reference.state_dict().items():  # weight by weight, in HF's Conv1D layout
        assert torch.allclose(ours.state_dict()[name], tensor, atol=1e-6), name


def test_export_bf16_writes_bf16_tensors(tmp_path):
    _, target = _export(tmp_path, dtype="bf16")
    with safe_open(target / "model.safetensors", framework="pt") as handle:
        dtypes = {handle.get_tensor(key).dtype for key in handle.keys()}
    assert dtypes == {torch.bfloat16}
    hf = transformers.GPT2LMHeadModel.from_pretrained(target, dtype="auto")
    assert hf.transformer.h[0].attn.c_attn.weight.dtype == torch.bfloat16  # config.json says bf16 too


def test_export_shards_with_an_index(tmp_path):
    # tiny fp32 is ~13 MB (wte alone 50257 x 64 x 4 = 12.9 MB); 0.004 GB = 4 MB shards -> wte alone, then the rest
    model, target = _export(tmp_path, size=0.004)
    index = json.loads((target / "model.safetensors.index.json").read_text())
    shards = sorted({name for name in index["weight_map"].values()})
    assert len(shards) >= 2 and not (target / "model.safetensors").exists()
    assert all((target / name).is_file() for name in shards)
    assert "transformer.h.0.attn.c_attn.weight" in index["weight_map"]
    hf = transformers.GPT2LMHeadModel.from_pretrained(target).eval()
    ids = torch.tensor([SAMPLES[0]])
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, model(ids), atol=1e-4)


def test_tokenizer_files_make_gpt2s_tokenizer(tmp_path):
    from pipeline.data.tokenizer import gpt2

    merge.write_tokenizer_files(tmp_path, gpt2(), 128)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    enc = gpt2()
    texts = ["Hello, do you like tea? In the sunlit terraces", "café 中文 naïve  spaces\n\nü 😀 ### Response:"]
    for text in texts:
        assert tok.encode(text) == enc.encode(text)
    # GPT-2's known ids (tiktoken docs): "Hello, do you like tea?" -> 15496, 11, 466, 345, 588, 8887, 30
    assert tok.encode("Hello, do you like tea?") == [15496, 11, 466, 345, 588, 8887, 30]
    assert tok.eos_token_id == 50256 and tok.model_max_length == 128


def test_gpt2s_rebuilt_tokenizer_files_are_kept_beside_the_ranks_and_read_back(tmp_path, monkeypatch):
    """The rebuild (BPE over 50,000 tokens) runs once per ranks file; later processes read its result back, each
    file durably written (pipeline.io.write_text: fsync, then rename) and checked against the sha256 written after
    them. A short file (what a power loss after an un-fsynced rename leaves, which the cache once was) is rebuilt,
    not copied into every export. That the text is GPT-2's tokenizer: test_tokenizer_files_make_gpt2s_tokenizer
    (transformers vs tiktoken)."""
    from pipeline import io
    from pipeline.data.tokenizer import ranks_path

    ranks = tmp_path / "gpt2.tiktoken"
    shutil.copyfile(ranks_path(), ranks)
    monkeypatch.setenv("PIPELINE_GPT2_RANKS", str(ranks))
    durable: list[str] = []
    monkeypatch.setattr(io, "_sync", lambda handle, path: durable.append(path.name) or os.fsync(handle.fileno()))
    merge.hf_tokenizer_files.cache_clear()  # a later process: nothing in memory
    try:
        rebuilt = merge.hf_tokenizer_files()
        (kept,) = tmp_path.glob("gpt2-hf-*")
        assert sorted(p.name for p in kept.iterdir()) == ["merges-v0.2.txt", "sha256.json", "vocab.json"]  # no temp
        assert durable == ["vocab.json", "merges-v0.2.txt", "sha256.json"]  # each fsynced before its rename
        assert rebuilt[1].startswith("#version: 0.2\nĠ t\n") and len(rebuilt[1].splitlines()) == 50001

        def no_rebuild() -> None:
            raise AssertionError("rebuilt although kept")

        with monkeypatch.context() as kept_only:
            kept_only.setattr(merge, "_rebuild_hf_tokenizer_files", no_rebuild)
            merge.hf_tokenizer_files.cache_clear()
            assert merge.hf_tokenizer_files() == rebuilt

        merges = kept / "merges-v0.2.txt"
        with open(merges, "r+b") as handle:  # cut at a line end: still a well-formed merges file, hundreds of merges short
            handle.truncate(merges.read_bytes().index(b"\n", merges.stat().st_size - 8000) + 1)
        merge.hf_tokenizer_files.cache_clear()
        assert merge.hf_tokenizer_files() == rebuilt  # detected and rebuilt
        assert merges.read_text(encoding="utf-8") == rebuilt[1]  # and kept whole again
    finally:
        merge.hf_tokenizer_files.cache_clear()


def test_generation_config_carries_the_recipes_repetition_penalty():
    """repetition_penalty applies to greedy decoding too (transformers' generate reads it from generation_config.json);
    a recipe's explicit 1.0 overrides a base checkpoint's own penalty (Qwen2.5-Instruct ships 1.05)."""
    tokenizer = recipe_tokenizer(data_args(RECIPE))
    config = merge.generation_config(GenerationArgs.from_recipe({**RECIPE, "repetition_penalty": 1.2}), tokenizer,
                                     explicit={"repetition_penalty"})
    assert config["repetition_penalty"] == 1.2 and config["do_sample"] is False
    base = {"repetition_penalty": 1.05}
    assert merge.generation_config(GenerationArgs.from_recipe(RECIPE), tokenizer, base)["repetition_penalty"] == 1.05
    assert merge.generation_config(GenerationArgs.from_recipe({**RECIPE, "repetition_penalty": 1.0}), tokenizer, base,
                                   explicit={"repetition_penalty"})["repetition_penalty"] == 1.0
    assert "repetition_penalty" not in merge.generation_config(GenerationArgs.from_recipe(RECIPE), tokenizer)


def test_generation_config_carries_beam_search_only_when_searching():
    """num_beams / length_penalty / early_stopping reach generation_config.json, so that transformers' generate on
    the export searches beams as `generate` here does; with num_beams 1 they are left out (transformers' defaults)."""
    tokenizer = recipe_tokenizer(data_args(RECIPE))
    beams = {**RECIPE, "num_beams": 3, "length_penalty": 0.5, "early_stopping": "never"}
    config = merge.generation_config(GenerationArgs.from_recipe(beams), tokenizer, explicit={"num_beams"})
    assert transformers.GenerationConfig(**config).num_beams == 3
    assert (config["num_beams"], config["length_penalty"], config["early_stopping"]) == (3, 0.5, "never")
    assert not {"num_beams", "length_penalty", "early_stopping"} & set(
        merge.generation_config(GenerationArgs.from_recipe(RECIPE), tokenizer))


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory) -> Path:
    """A project whose r.yaml (tiny, LoRA, one step, a default_system) was built and trained through the CLI; the
    tests below each work on a copy (one training for the module, not one per test)."""
    from tests.acceptance.harness import pipeline, write_data, write_recipe

    root = tmp_path_factory.mktemp("trained_tiny")
    write_data(root / "datasets")
    write_recipe(root / "r.yaml", model_name_or_path="tiny", output_dir="saves/r", max_steps=1,
                 default_system="Answer with one word.")
    for command in ("build", "train"):
        pipeline(command, "r.yaml", cwd=root)
    return root


def test_export_of_a_trained_recipe_without_an_adapter_does_not_write_the_base(trained_tiny, tmp_path):
    """`python -m pipeline export r.yaml` on the recipe that trained (export_dir added, no adapter_name_or_path)
    wrote model_name_or_path unchanged, "verified", while the run's adapter sat in output_dir: the fine-tune was
    silently left out. It is now refused with what to run instead."""
    from tests.acceptance.harness import pipeline

    tmp_path = Path(shutil.copytree(trained_tiny, tmp_path / "project"))
    err = pipeline("export", "r.yaml", "export_dir=exports/r", cwd=tmp_path, expect=2).stderr
    assert "saves/r/adapter" in err and "python -m pipeline merge" in err and "adapter_name_or_path: saves/r" in err
    assert "Traceback" not in err and not (tmp_path / "exports/r").exists()
    pipeline("export", "r.yaml", "export_dir=exports/r", "adapter_name_or_path=saves/r", cwd=tmp_path)
    assert "saves/r/adapter" in (tmp_path / "exports/r/verification.json").read_text()


@pytest.mark.parametrize("eos", [[379, 382, 383], 383], ids=["instruct-list", "scalar-not-first-stop"])
def test_export_keeps_the_base_configs_eos_token_id(tmp_path, eos):
    """config.json's eos_token_id is the base's own, a list as Llama-3.x-Instruct ships it or a scalar that is not
    the first stop id (a transformers-saved Llama: <|eot_id|>): code reading model.config.eos_token_id sees what
    the original model said. The stop ids for generation are generation_config.json's list, as before."""
    from tests.acceptance.harness import pipeline, write_hf_checkpoint

    # the small Llama 3 vocabulary: 379 <|end_of_text|>, 382 <|eom_id|>, 383 <|eot_id|>
    write_hf_checkpoint(tmp_path / "base", "llama", small_vocab=True, eos_token_id=eos)
    (tmp_path / "export.yaml").write_text("model_name_or_path: base\ntemplate: llama3\nexport_dir: out\n")
    pipeline("export", "export.yaml", cwd=tmp_path, as_typed=False)
    assert transformers.AutoConfig.from_pretrained(tmp_path / "out").eos_token_id == eos
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["eos_token_id"] == [379, 382, 383]


def test_an_export_of_a_base_stops_after_the_answer_as_generate_does(tmp_path):
    """A Qwen base whose only stop is <|endoftext|> (as Qwen2.5 / Qwen3-Base ship it), exported for the qwen
    template, whose answers end with <|im_end|>: transformers' generate on the export (chat template, greedy,
    generation_config.json as written) stops at the <|im_end|> the model emits, as `pipeline generate --model
    merged` does, instead of running on to max_new_tokens."""
    from tests.acceptance.harness import always_answer, pipeline, write_hf_checkpoint

    base = tmp_path / "base"
    # the small Qwen3 vocabulary: 379 <|endoftext|>, 380 <|im_start|>, 381 <|im_end|>
    model = write_hf_checkpoint(base, "qwen3", small_vocab=True, eos_token_id=379)
    always_answer(model, 381).save_pretrained(base, safe_serialization=True)
    for name, key, value in (("generation_config.json", "eos_token_id", 379),
                             ("tokenizer_config.json", "eos_token", "<|endoftext|>")):
        config = json.loads((base / name).read_text())
        (base / name).write_text(json.dumps({**config, key: value}))
    (tmp_path / "export.yaml").write_text("model_name_or_path: base\ntemplate: qwen\nexport_dir: out\n"
                                          "max_new_tokens: 4\ndo_sample: false\n")
    pipeline("export", "export.yaml", cwd=tmp_path, as_typed=False)
    out = tmp_path / "out"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [381, 379]
    tok = transformers.AutoTokenizer.from_pretrained(out)
    exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_dict=True,
                                  return_tensors="pt")
    answer = exported.generate(**ids)[0, ids["input_ids"].shape[1]:].tolist()
    assert answer == [381]  # one <|im_end|>, not four
    printed = pipeline("generate", "export.yaml", "--model", "merged", "--prompt", "Hi", cwd=tmp_path).stdout
    assert printed == tok.decode(answer, skip_special_tokens=True) + "\n"


# ---------------------------------------------------------------- the chat template of the export
def test_merge_cli_writes_the_recipes_chat_template(trained_tiny, tmp_path):
    """`python -m pipeline merge r.yaml` as a user types it: merged/ carries the recipe's template (its default_system
    included) as chat_template, and transformers prompts the model with the ids training and chat use."""
    from pipeline.data.templates import recipe_template
    from pipeline.data.tokenize import encode_prompt
    from pipeline.data.tokenizer import gpt2
    from tests.acceptance.harness import pipeline

    tmp_path = Path(shutil.copytree(trained_tiny, tmp_path / "project"))
    pipeline("merge", "r.yaml", cwd=tmp_path)
    merged = tmp_path / "saves/r/merged"
    tok = transformers.AutoTokenizer.from_pretrained(merged)
    chat = [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "red"},
            {"role": "user", "content": "Another?"}]
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        "Answer with one word.\n\n### Instruction:\nName a color.\n\n### Response:\nred<|endoftext|>"
        "\n\n### Instruction:\nAnother?\n\n### Response:\n")
    want = encode_prompt(recipe_template("alpaca", "Answer with one word."), "Another?",
                         history=[("Name a color.", "red")], tokenizer=gpt2())
    assert tok.apply_chat_template(chat, add_generation_prompt=True)["input_ids"] == want
    with_system = [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "Name a color."}]
    assert tok.apply_chat_template(with_system, add_generation_prompt=True)["input_ids"] == \
        encode_prompt("alpaca", "Name a color.", system="Be exact.", tokenizer=gpt2())
    config = json.loads((merged / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "GPT2Tokenizer" and config["eos_token"] == "<|endoftext|>"
    assert tok.eos_token == "<|endoftext|>"  # alpaca ends answers with the tokenizer's own EOS: unchanged
    # transformers' greedy generate on merged/ (its chat template, its generation_config.json as written: EOS 50256,
    # max_new_tokens) answers what `python -m pipeline generate --model merged` prints, token for token
    model = transformers.GPT2LMHeadModel.from_pretrained(merged).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "Another?"}], add_generation_prompt=True,
                                  return_dict=True, return_tensors="pt")
    answer = model.generate(**ids, do_sample=False)[0, ids["input_ids"].shape[1]:]
    printed = pipeline("generate", "r.yaml", "--model", "merged", "--prompt", "Another?", cwd=tmp_path,
                       as_typed=False).stdout
    assert printed == tok.decode(answer, skip_special_tokens=True) + "\n"


def test_export_replaces_the_bases_chat_template_and_keeps_the_rest(tmp_path):
    """A base with its own chat template (in tokenizer_config.json and in chat_template.jinja, which transformers
    reads first): the export holds the recipe's template instead, says so, and keeps every other tokenizer key."""
    from pipeline.data.model_tokenizer import load_tokenizer
    from pipeline.data.templates import recipe_template
    from pipeline.data.tokenize import encode_prompt
    from tests.acceptance.harness import pipeline, write_hf_checkpoint

    base = tmp_path / "base"
    write_hf_checkpoint(base, "llama", small_vocab=True)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ 'the base config template' }}"
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    (base / "chat_template.jinja").write_text("{{ 'the base jinja template' }}")
    (tmp_path / "export.yaml").write_text("model_name_or_path: base\ntemplate: llama3\ndefault_system: Be brief.\n"
                                          "export_dir: out\n")
    err = pipeline("export", "export.yaml", cwd=tmp_path, as_typed=False).stderr
    assert "in place of the base model's own chat template" in err
    out = tmp_path / "out"
    assert not (out / "chat_template.jinja").exists()
    written = json.loads((out / "tokenizer_config.json").read_text())
    assert {k: v for k, v in written.items() if k != "chat_template"} == \
        {k: v for k, v in config.items() if k != "chat_template"}
    tok = transformers.AutoTokenizer.from_pretrained(out)
    chat = [{"role": "user", "content": "Hi there"}]
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tok.apply_chat_template(chat, add_generation_prompt=True)["input_ids"] == \
        encode_prompt(recipe_template("llama3", "Be brief."), "Hi there", tokenizer=load_tokenizer(base))


def test_a_pt_recipe_keeps_the_bases_tokenizer_config():
    """pt trains on plain text, in no chat format: its export's tokenizer files stay the base's."""
    from pipeline.data.chat_template import recipe_chat_template

    tokenizer = recipe_tokenizer(data_args(RECIPE))
    assert recipe_chat_template(data_args({**RECIPE, "stage": "pt"}), tokenizer) is None
    assert "### Instruction:" in recipe_chat_template(data_args({**RECIPE, "stage": "sft"}), tokenizer)


def test_export_with_a_template_the_vocabulary_lacks_is_refused_first(tmp_path):
    from tests.acceptance.harness import pipeline

    (tmp_path / "export.yaml").write_text("model_name_or_path: tiny\ntemplate: chatml\nexport_dir: out\n")
    err = pipeline("export", "export.yaml", cwd=tmp_path, expect=2, as_typed=False).stderr
    assert "template" in err and "<|im_start|>" in err and "alpaca" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_pure_bf16_models_update_is_measured_from_the_base_it_trained_from(tmp_path):
    """model/ of a pure_bf16 run holds the base rounded to bf16 where nothing moved: that rounding is neither a change
    nor an update the bf16 export loses (measured from the fp32 base, every tensor changed and lost all of it, and the
    export was refused). Here one weight moved one bf16 step; the rest is the bf16 base."""
    from pipeline.model.build import load_base
    from pipeline.model.weights import save_model
    from pipeline.recipe.args import recipe_args
    from pipeline.runtime.layout import RunLayout

    keys = {"model_name_or_path": "tiny", "finetuning_type": "full", "export_dtype": "bf16"}
    model = load_base(recipe_args(keys).model, dropout=False, dtype=torch.bfloat16)  # as train builds it
    with torch.no_grad():
        weight = next(p for p in model.layers[0].parameters() if p.dim() == 2)
        weight[0, 0] = (weight[0, 0].float() * (1 + 2 ** -7)).bfloat16()  # at least one bf16 step
    save_model(model, tmp_path / "model", "bf16")
    check = merge.reexport_full(recipe_args(keys), data_args(keys), export_args(keys), RunLayout(tmp_path), "r.yaml",
                                torch.bfloat16)
    assert check.report["changed_tensors"] == 1 and check.report["update_lost"] == {"bf16": 0.0}
    with pytest.raises(UserError, match="loses"):  # from the fp32 base: the bf16 rounding read as a lost update
        merge.reexport_full(recipe_args(keys), data_args(keys), export_args(keys), RunLayout(tmp_path), "r.yaml")


def test_a_checkpoint_adapter_goes_by_its_runs_resolved_yaml(tmp_path):
    """A merge recipe naming saves/x/checkpoint-N of a pure_bf16 run: the base is folded in bf16, as that run held it
    (its resolved.yaml is in the run's folder; a checkpoint holds none: before, the checkpoint's adapter was folded
    onto the fp32 base, another model than the one trained, without a word)."""
    (tmp_path / "run/checkpoint-3/adapter").mkdir(parents=True)
    (tmp_path / "run/resolved.yaml").write_text("pure_bf16: true  # cli\n", encoding="utf-8")
    assert merge._adapter_base_dtype({}, tmp_path / "run/checkpoint-3/adapter") == "bf16"
    assert merge._adapter_base_dtype({}, tmp_path / "run/adapter") == "bf16"
    assert merge._adapter_base_dtype({}, tmp_path / "elsewhere/adapter") == "fp32"
