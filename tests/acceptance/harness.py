"""The acceptance harness: artifacts in the formats users bring, and the CLI driven as a user types it.

Reused by every acceptance test (and by other test folders): import from `tests.acceptance.harness`.

- `write_hf_checkpoint(family, directory)`: a tiny random model written by transformers' own
  save_pretrained (safetensors), the layout `hf download` gives. FAMILIES maps a family name
  to how transformers builds it; add a family by adding an entry (config class, model class, tiny sizes).
- `write_data(directory)`: a dataset registry (dataset_info.json) with tiny sft and pt sources.
- `write_recipe(path, **keys)`: a YAML recipe (plain values, one per line).
- `write_ranking_data(directory)`: LLaMA-Factory ranking (preference) data beside write_data's; `DPO`: a tiny
  dpo recipe on it.
- `pipeline(*args, cwd=...)` / `make(*targets, cwd=...)`: run `python -m pipeline ...` or `make ...` in a
  subprocess and assert the exit code; the result keeps stdout and stderr for further asserts. `refused(...)`:
  the stderr of a command that must exit 2, as typed or (as_typed=False) in-process.
- `scratch_repo(root)`: a scratch copy of the repository (Makefile, code, a venv shim) for `make` runs.
- `crash_copy(straight, crashed, step)`: what a run killed after its step-N checkpoint leaves; `assert_same_run`:
  the resumed run ended bitwise where the uninterrupted one did.
- `trained_model(recipe, cwd)` / `assert_close(theirs, mine)`: our trained model as generate loads it, and the
  logit comparison against transformers / PEFT.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tests.train.helpers import WORDS, corpus, sft_rows  # noqa: F401  (re-exported for the acceptance tests)

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


# ---------------------------------------------------------------------------------------------- checkpoints

@dataclass(frozen=True)
class Family:
    """How transformers builds a tiny random model of one family (all sizes tiny: 2 layers)."""

    config_class: str  # transformers attribute names, imported lazily (transformers is test-only)
    model_class: str
    tiny: dict[str, Any] = field(default_factory=dict)
    context_key: str = "max_position_embeddings"  # the config key of the longest sequence
    hints: tuple[str, ...] = ()  # lower-case substrings of a model line (hub id, preset, folder) naming the family
    tokenizer: str | None = None  # tests.helpers.hf_vocab family whose real tokenizer files go beside the weights


_DECODER = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=256)
FAMILIES: dict[str, Family] = {
    "gpt2": Family("GPT2Config", "GPT2LMHeadModel",
                   dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=50257),
                   context_key="n_positions", hints=("gpt2", "gpt-2")),
    # the real vocabularies (Llama 3: 128,256 ids; Qwen: 151,936), GQA, Llama 3.1's rope scaling, Qwen2's q/k/v
    # biases, Qwen3's explicit head_dim and q/k norms; tokenizer files from tests/helpers/hf_vocab.py
    "llama": Family("LlamaConfig", "LlamaForCausalLM",
                    dict(_DECODER, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                         bos_token_id=128000, eos_token_id=128009),
                    hints=("llama",), tokenizer="llama3"),
    "qwen2": Family("Qwen2Config", "Qwen2ForCausalLM", dict(_DECODER, vocab_size=151936, tie_word_embeddings=True),
                    hints=("qwen2",), tokenizer="qwen2"),
    "qwen3": Family("Qwen3Config", "Qwen3ForCausalLM",
                    dict(_DECODER, vocab_size=151936, head_dim=16, tie_word_embeddings=False),
                    hints=("qwen3",), tokenizer="qwen3"),
    # Mistral-7B-v0.1's shape of config: no biases, GQA, a sliding window in every layer (shorter than cutoff_len);
    # only with small_vocab (a byte-level stand-in: the real sentencepiece vocabulary is another helper's)
    "mistral": Family("MistralConfig", "MistralForCausalLM", dict(_DECODER, vocab_size=32000, sliding_window=8),
                      hints=("mistral",), tokenizer="mistral"),
    # Qwen3-30B-A3B's shape in small: Qwen3's attention and a sparse MoE MLP in every layer (4 experts, top-2)
    "qwen3_moe": Family("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                        dict(_DECODER, vocab_size=151936, head_dim=16, tie_word_embeddings=False, num_experts=4,
                             num_experts_per_tok=2, moe_intermediate_size=16),
                        hints=("qwen3",), tokenizer="qwen3"),
}


def hf_model(family: str = "gpt2", *, seed: int = 0, noise: float = 0.1, **overrides: Any) -> Any:
    """A random transformers model of `family` in eval mode (fp32).

    Every tensor gets N(0, noise) added: biases and norms leave their init values (a loader that skipped
    them could not pass) and greedy decoding does not collapse into one repeated token, so token-for-token
    parity with transformers means something.
    """
    import transformers

    spec = FAMILIES[family]
    config = getattr(transformers, spec.config_class)(**{**spec.tiny, **overrides})
    return random_model(getattr(transformers, spec.model_class), config, seed=seed, noise=noise)


def random_model(model_class: Any, config: Any, *, seed: int = 0, noise: float = 0.1) -> Any:
    """model_class(config) drawn from `seed`, in eval mode, N(0, noise) added to every tensor (hf_model says why)."""
    import torch

    torch.manual_seed(seed)
    model = model_class(config).eval()
    if noise:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * noise)
    return model


def assert_outputs_compute_ours(recipe: str | Path, cwd: str | Path, base: str | Path, merged: Any,
                                vocab_size: int) -> Any:
    """A LoRA run's outputs as transformers and PEFT load them compute our trained model's logits (fp32): `merged`
    (transformers' model of merged/) and PEFT's reading of cwd/saves/r/adapter on the checkpoint `base`. Returns
    (input ids, our logits)."""
    import peft
    import torch
    import transformers

    adapted = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base),
                                             Path(cwd) / "saves/r/adapter").eval()
    ours = trained_model(recipe, cwd)
    x = torch.randint(0, vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours(x)
        assert torch.allclose(merged(x).logits, want, atol=1e-4, rtol=0)
        assert torch.allclose(adapted(x).logits, want, atol=1e-4, rtol=0)
    return x, want


def assert_image_text_outputs(recipe: str | Path, cwd: str | Path, base: str | Path, source: Any,
                              towers: tuple[str, ...], x: Any) -> None:
    """An image-text checkpoint's LoRA run (output_dir saves/r): merged/, loaded as the source's class, and adapter/,
    by PEFT on the source, compute our trained model's logits on the ids `x` (input_ids only; 1e-4); the run trained;
    every tensor of the carried `towers` (module-tree prefixes) is the source's, equal."""
    import peft
    import torch

    cls = type(source)
    theirs = cls.from_pretrained(Path(cwd) / "saves/r/merged").eval()
    adapted = peft.PeftModel.from_pretrained(cls.from_pretrained(base), Path(cwd) / "saves/r/adapter").eval()
    ours = trained_model(recipe, cwd)
    with torch.no_grad():
        want = ours(x)
        assert torch.allclose(theirs(input_ids=x).logits, want, atol=1e-4, rtol=0)
        assert torch.allclose(adapted(input_ids=x).logits, want, atol=1e-4, rtol=0)
        assert (want - source(input_ids=x).logits).abs().max() > 1e-3  # the run trained
    before, after = source.state_dict(), theirs.state_dict()
    carried = [k for k in before if k.startswith(towers)]
    assert len(carried) > 10 and all(torch.equal(before[k], after[k]) for k in carried)


def exported_prompt(merged: str | Path, base: str | Path, template: str) -> str:
    """The generation prompt of a short conversation (a system prompt, one question) by the chat template merge wrote
    into `merged`, rendered by transformers' apply_chat_template; asserted to be the ids training builds with
    `template` on the base checkpoint's tokenizer. Returns its text (for the caller to check the template's markup)."""
    import transformers

    from pipeline.data.model_tokenizer import load_tokenizer
    from pipeline.data.tokenize import encode_prompt

    tokenizer = transformers.AutoTokenizer.from_pretrained(merged)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    prompt = tokenizer.apply_chat_template(msgs, add_generation_prompt=True)["input_ids"]
    assert prompt == encode_prompt(template, "Name a colour.", system="Be brief.", tokenizer=load_tokenizer(base))
    return tokenizer.decode(prompt)


def build_train_merge(recipe: str | Path, cwd: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """`build`, `train` and `merge` of a LoRA recipe whose output_dir is saves/r, as typed; returns merged/config.json
    and adapter/adapter_config.json as read back."""
    for stage in ("build", "train", "merge"):
        pipeline(stage, recipe, cwd=cwd)
    out = Path(cwd) / "saves/r"
    return (json.loads((out / "merged/config.json").read_text()),
            json.loads((out / "adapter/adapter_config.json").read_text()))


def write_hf_checkpoint(directory: str | Path, family: str = "gpt2", *, seed: int = 0, small_vocab: bool = False,
                        instruct: bool = True, **overrides: Any) -> Any:
    """save_pretrained(directory) of a tiny random `family` model (safetensors) with the family's tokenizer files
    (Llama 3 / Qwen: their real vocabularies, with the Instruct checkpoint's configs or with instruct=False the
    base's, or with small_vocab a 384-token byte-level BPE holding the family's template markup; GPT-2's comes
    from the pipeline's own ranks); returns the model."""
    name, generation = FAMILIES[family].tokenizer, {}
    if small_vocab and name:
        from tests.helpers.hf_vocab import write_small_tokenizer_dir

        size = write_small_tokenizer_dir(directory, name)
        generation = json.loads((Path(directory) / "generation_config.json").read_text())
        overrides = {"vocab_size": size, "bos_token_id": generation.get("bos_token_id"),
                     "eos_token_id": eos[0] if isinstance(eos := generation["eos_token_id"], list) else eos,
                     **overrides}
    model = hf_model(family, seed=seed, **overrides)
    model.save_pretrained(Path(directory), safe_serialization=True)  # writes its own generation_config.json
    gen_path = Path(directory) / "generation_config.json"
    if generation:
        gen_path.write_text(json.dumps({**json.loads(gen_path.read_text()), **generation}, indent=2))
    elif name:
        from tests.helpers.hf_vocab import write_tokenizer_dir

        write_tokenizer_dir(directory, name, instruct=instruct)
    return model


def save_pretrained_small(folder: Path, vocab: str, model_class: str, config_class: str, special: Sequence[str],
                          **config: Any) -> Any:
    """A random tiny transformers `model_class` (noise on every tensor) saved in `folder` with tests.helpers.hf_vocab's
    small byte-level tokenizer of `vocab`; the config gets its vocabulary size and the `special` ids of that
    tokenizer's generation_config.json (a list's first), which is kept as the tokenizer wrote it. Returns the model."""
    import transformers

    from tests.helpers.hf_vocab import write_small_tokenizer_dir

    size = write_small_tokenizer_dir(folder, vocab)
    generation = json.loads((folder / "generation_config.json").read_text())
    ids = {key: value[0] if isinstance(value := generation[key], list) else value for key in special}
    model = random_model(getattr(transformers, model_class),
                         getattr(transformers, config_class)(**config, vocab_size=size, **ids))
    model.save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps(generation))
    return model


def always_answer(model: Any, token: int) -> Any:
    """`model` (a transformers Llama / Qwen with an untied head, in place) made to score `token` highest at every
    position, whatever the input: every token embeds as the same vector, attention and MLP add only 1/1000 of
    their output to it, and only `token`'s head row is non-zero. Training still reaches every weight, and one step
    does not move the answer. For tests of where generation stops."""
    import torch

    _untied(model)
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(1.0)
        _quiet_blocks(model)
        model.lm_head.weight.zero_()
        model.lm_head.weight[token] = 1.0
    return model


def answer_in_turn(model: Any, tokens: list[int]) -> Any:
    """`model` (as always_answer's) made to answer tokens[0] after any token not in tokens[:-1], and tokens[i + 1]
    after tokens[i], whatever came before: every other token embeds as the first unit vector, tokens[i] as unit
    vector i + 1; the head row of tokens[0] is the first unit vector, that of tokens[i + 1] unit vector i + 1. A
    model that says a given sequence, for tests of what generation prints and where it stops."""
    import torch

    _untied(model)
    with torch.no_grad():
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        embed.zero_()
        embed[:, 0] = 1.0
        head.zero_()
        head[tokens[0], 0] = 1.0
        for i, (token, answer) in enumerate(zip(tokens, tokens[1:])):
            embed[token] = 0.0
            embed[token, i + 1] = 1.0
            head[answer, i + 1] = 1.0
        _quiet_blocks(model)
    return model


def _untied(model: Any) -> None:
    if model.config.tie_word_embeddings:
        raise ValueError("a model made to answer given tokens needs an untied head (tie_word_embeddings=False)")


def _quiet_blocks(model: Any) -> None:
    """Attention and MLP add only 1/1000 of their output to the residual stream: the next token is the current
    token's head row."""
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight.mul_(1e-3)
        layer.mlp.down_proj.weight.mul_(1e-3)


def family_of(model_line: str) -> str | None:
    """The family a recipe's model line names: a preset's own family, else the first FAMILIES hint in it.

    Presets without a family of their own (tiny, mini, ...) are the book's GPT-2. None when nothing matches
    (a path to another run's output: see family_of_recipe).
    """
    from pipeline.model.config import PRESETS

    if model_line in PRESETS:
        cfg = PRESETS[model_line]
        named = getattr(cfg, "family", None) or getattr(cfg, "model_type", None)
        return str(named) if named in FAMILIES else "gpt2"
    lowered = model_line.lower()
    hits = [(lowered.find(h), name) for name, fam in FAMILIES.items() for h in fam.hints if h in lowered]
    return min(hits)[1] if hits else None


def recipe_chain_value(path: Path, key: str) -> Any:
    """A key's value as the recipe or a file it extends writes it (plain safe YAML, no resolution)."""
    import yaml

    seen = set()
    while path not in seen:
        seen.add(path)
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if key in data:
            return data[key]
        if not data.get("extends"):
            return None
        path = (path.parent / data["extends"]).resolve()
    return None


def family_of_recipe(path: Path, recipes: list[Path]) -> str:
    """The family of a recipe's model; a model that is another recipe's output (saves/x/model) takes that
    recipe's family. Unknown: an AssertionError asking to add a hint to FAMILIES."""
    model = str(recipe_chain_value(path, "model_name_or_path"))
    family = family_of(model)
    if family is None:
        for other in recipes:
            out = recipe_chain_value(other, "output_dir")
            if other != path and out and Path(model).parts[:len(Path(out).parts)] == Path(out).parts:
                return family_of_recipe(other, [r for r in recipes if r != path])
    assert family is not None, (f"{path}: model_name_or_path {model!r} names no family of "
                                f"tests/acceptance/harness.py FAMILIES; add its hint there")
    return family


# ---------------------------------------------------------------------------------------------- data, recipes

def write_data(directory: str | Path, n_sft: int = 24, n_pt: int = 12) -> Path:
    """directory/dataset_info.json naming `tiny_sft` (alpaca rows) and `tiny_pt` (plain text)."""
    data = Path(directory)
    (data / "raw").mkdir(parents=True, exist_ok=True)
    (data / "raw" / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft_rows(n_sft)), encoding="utf-8")
    (data / "raw" / "corpus.txt").write_text(corpus(n_pt), encoding="utf-8")
    registry = {"tiny_sft": {"file_name": "raw/sft.jsonl", "formatting": "alpaca"},
                "tiny_pt": {"file_name": "raw/corpus.txt", "formatting": "text"}}
    (data / "dataset_info.json").write_text(json.dumps(registry, indent=2), encoding="utf-8")
    return data


# A tiny LoRA sft run: every key a user would set; tests override what they vary.
SFT: dict[str, Any] = {
    "stage": "sft",
    "dataset": "tiny_sft",
    "template": "alpaca",
    "cutoff_len": 48,
    "val_size": 0.1,
    "finetuning_type": "lora",
    "lora_rank": 4,
    "lora_target": "all",
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "learning_rate": 5.0e-3,
    "max_steps": 2,
    "lr_scheduler_type": "constant",
    "logging_steps": 1,
    "save_steps": 1000,
    "plot_loss": False,
    "bf16": False,
    "seed": 7,
    "max_new_tokens": 4,
    "max_eval_samples": 2,
}


def write_recipe(path: str | Path, base: dict[str, Any] | None = None, **keys: Any) -> Path:
    """A YAML recipe at `path` from `base` (default SFT) updated with `keys`; a None value drops the key.

    LoRA keys are dropped for full/freeze runs (the resolver rejects them without LoRA).
    """
    values = {**(SFT if base is None else base), **keys}
    values = {k: v for k, v in values.items() if v is not None}
    if values.get("finetuning_type", "lora") != "lora":
        values = {k: v for k, v in values.items() if not k.startswith("lora_")}
    path = Path(path)
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()), encoding="utf-8")
    return path


# LLaMA-Factory's dataset_info.json entries for ranking data (its data/README.md)
RANKING_ENTRIES = {
    "prefs_alpaca": {"file_name": "raw/prefs_alpaca.json", "ranking": True,
                     "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}},
    "prefs_sharegpt": {"file_name": "raw/prefs_sharegpt.json", "formatting": "sharegpt", "ranking": True,
                       "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
}
DPO = {**SFT, "stage": "dpo", "dataset": "prefs_alpaca,prefs_sharegpt", "val_size": 0.25,
       "learning_rate": 1e-2, "max_steps": 4, "pref_beta": 0.5, "max_new_tokens": 3, "max_eval_samples": 2}


def write_ranking_data(data: Path, n: int = 16) -> None:
    """Both LLaMA-Factory ranking forms: alpaca (chosen/rejected strings), sharegpt (message objects)."""
    rng = random.Random(3)
    alpaca, sharegpt = [], []
    for i in range(n):
        a, b, c = rng.sample(WORDS, 3)
        alpaca.append({"instruction": f"Repeat: {a} {b}", "input": "", "chosen": f"{a} {b}", "rejected": f"{c} ({i})"})
        sharegpt.append({"conversations": [{"from": "human", "value": f"Say {c} twice"}],
                         "chosen": {"from": "gpt", "value": f"{c} {c}"},
                         "rejected": {"from": "gpt", "value": f"{a} ({i})"}})
    (data / "raw" / "prefs_alpaca.json").write_text(json.dumps(alpaca, indent=1), encoding="utf-8")
    (data / "raw" / "prefs_sharegpt.json").write_text(json.dumps(sharegpt, indent=1), encoding="utf-8")
    registry = json.loads((data / "dataset_info.json").read_text())
    (data / "dataset_info.json").write_text(json.dumps({**registry, **RANKING_ENTRIES}, indent=2), encoding="utf-8")


# ---------------------------------------------------------------------------------------------- the CLI

def cli_env(**extra: str) -> dict[str, str]:
    """The environment a user's shell would give: offline, no launcher variables or warning filters (PYTHONWARNINGS)
    left from the test runner."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR",
                        "MASTER_PORT", "PYTHON_PIPELINE_LAUNCH", "PYTHONWARNINGS")}
    # the repository first, then what the caller's PYTHONPATH held (bench/gpu_check.sh --wheels puts the wheels
    # a machine without network lacks there)
    path = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(REPO)])
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=path, OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    env.update(extra)
    return env


def _run(argv: list[str], *, cwd: Path, expect: int | None, timeout: float, env: dict[str, str] | None,
         input: str | None = None) -> subprocess.CompletedProcess:
    """A job past `timeout` fails with every process's stack and leaves none running (tests/ports.run_to_end): make
    and the launcher start children that subprocess.run's timeout would leave behind."""
    from tests.ports import run_to_end

    proc = run_to_end(argv, timeout=timeout, env=env or cli_env(), input=input, cwd=cwd)
    return _expect(proc, expect, cwd)


def _expect(proc: subprocess.CompletedProcess, expect: int | None, cwd: Path) -> subprocess.CompletedProcess:
    if expect is not None and proc.returncode != expect:
        raise AssertionError(f"{' '.join(proc.args)} (in {cwd}) exited {proc.returncode}, expected {expect}\n"
                             f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def pipeline(*args: str, cwd: str | Path, expect: int | None = 0, timeout: float = 300,
             env: dict[str, str] | None = None, input: str | None = None,
             as_typed: bool = True) -> subprocess.CompletedProcess:
    """`python -m pipeline ARGS` in `cwd`, as a user types it; asserts the exit code unless expect=None.

    as_typed=False: main(argv) in this process instead (rel_helpers.run_main: cwd, sys.argv and the environment
    `env` (default cli_env()) set for the call and put back after it), the same result without an interpreter start
    (0.3-0.5 CPU-s a call). For a command whose as-typed run the test or its file already drives, where a fresh
    interpreter proves nothing more: never a training run (torch.distributed and DeepSpeed stay set up in the
    process), nor an `env` whose variables a library reads once at import (HF_HOME for huggingface_hub)."""
    if as_typed:
        return _run([PYTHON, "-m", "pipeline", *map(str, args)], cwd=Path(cwd), expect=expect, timeout=timeout,
                    env=env, input=input)
    from tests.reliability.rel_helpers import run_main

    assert input is None, "in-process runs read no stdin: run it as typed"
    argv = list(map(str, args))
    done = run_main(argv, Path(cwd), env=env or cli_env())
    proc = subprocess.CompletedProcess([PYTHON, "-m", "pipeline", *argv], done.code, done.out, done.err)
    return _expect(proc, expect, Path(cwd))


def refused(*args: str, cwd: str | Path, as_typed: bool = True) -> str:
    """The stderr of `python -m pipeline ARGS` in `cwd`, asserting exit 2 and no traceback: as a user types it (a
    fresh interpreter), or with as_typed=False in this process (main(argv): the same refusal without an
    interpreter start and torch's import, for the further cases of a table whose first case ran as typed)."""
    stderr = pipeline(*args, cwd=cwd, expect=2, as_typed=as_typed).stderr
    assert "Traceback" not in stderr, stderr
    return stderr


def make(*args: str, cwd: str | Path, expect: int | None = 0, timeout: float = 600,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`make ARGS` in `cwd` (a scratch_repo), asserting the exit code unless expect=None.

    Several ranks (NPROC=N, N > 1) get a free MASTER_PORT in make's environment (make reads its variables from
    there too; the command stays as the user types it): without one the launcher takes DeepSpeed's fixed 29500,
    and two such jobs at once (pytest-xdist workers) clashed. A launch that lost its port is retried on a new one
    (tests/ports.py)."""
    from tests.ports import run_on_free_port

    argv = ["make", "--no-print-directory", *map(str, args)]
    if not any(a.startswith("NPROC=") and a != "NPROC=1" for a in argv):
        return _run(argv, cwd=Path(cwd), expect=expect, timeout=timeout, env=env)
    proc = run_on_free_port(lambda _port: argv, port_env="MASTER_PORT", env=env or cli_env(), cwd=cwd,
                            timeout=timeout)
    return _expect(proc, expect, Path(cwd))


def refused_before_any_stage(proc: subprocess.CompletedProcess) -> list[str]:
    """The lines a make that stopped at deps / validate printed before make's own stop line, which must end stderr:
    the Makefile's $(error) (exit 2, a user mistake), after our message."""
    *ours, last = proc.stderr.splitlines()
    assert proc.returncode == 2 and last.startswith("Makefile:"), proc.stderr
    assert last.endswith("*** stopped by the message above; nothing ran.  Stop."), proc.stderr
    return ours


def make_stages(proc: subprocess.CompletedProcess) -> list[tuple[str, str]]:
    """(command, recipe) of every `python -m pipeline` line make printed (or, under -n, would run), in order: make
    echoes $(PY), a path to the environment's python, before ` -m pipeline`; a message that names a command for the
    user (validate's "`make eval RECIPE=r` (python -m pipeline eval r)") is no stage."""
    runs = [after.split()[:2] for before, sep, after in (line.partition(" -m pipeline ") for line in proc.stdout.splitlines())
            if sep and before.split()[-1:] and before.split()[-1].endswith("/python")]
    return [(command, recipe) for command, recipe in runs]


def link_makefile(folder: str | Path) -> Path:
    """`folder` as a checkout's root for the messages: the pipeline's Makefile linked there. A "run this" message
    gives the make form only where `make` reads that Makefile (pipeline.rerun.make_runs_here); elsewhere (a
    recipes/ folder, a tmp_path) the python -m form alone."""
    link = Path(folder) / "Makefile"
    if not link.exists():
        link.symlink_to(REPO / "Makefile")
    return Path(folder)


def scratch_repo(root: str | Path) -> Path:
    """A scratch repository for `make`: Makefile, pipeline/ and requirements linked, a venv whose python is
    the one running the tests, datasets/ empty (tests write their own registry with write_data)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name in ("Makefile", "pipeline", "requirements.txt", ".cache"):
        if (REPO / name).exists() and not (root / name).exists():
            (root / name).symlink_to(REPO / name)
    venv = root / "venv"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{PYTHON}" "$@"\n', encoding="utf-8")
    python.chmod(0o755)
    (venv / ".setup-done").touch()  # newer than requirements.txt: make does not re-run setup
    if not (root / ".venv").exists():  # make's default VENV: a `make` typed without VENV= must not build a real
        (root / ".venv").symlink_to("venv")  # 1.5 GB venv per test (it filled CI's disk)
    return root


def trained_with_make(root: str | Path, name: str, **keys: Any) -> tuple[Path, str, dict[str, tuple[int, int]]]:
    """A scratch_repo with the demo-shaped data and recipes/<name>.yaml (tiny, one step, output_dir
    saves/<name>, `keys` on top) trained by `make train`: (repo, the VENV= argument for make, files_under the
    run). For tests of what a later make does to a finished run."""
    repo = scratch_repo(root)
    venv = f"VENV={repo / 'venv'}"
    write_data(repo / "datasets")
    (repo / "recipes").mkdir()
    write_recipe(repo / "recipes" / f"{name}.yaml", **{"model_name_or_path": "tiny", "output_dir": f"saves/{name}",
                                                       "max_steps": 1, "plot_loss": False, **keys})
    make("train", f"RECIPE=recipes/{name}.yaml", venv, cwd=repo)
    return repo, venv, files_under(repo / "saves" / name)


def files_under(directory: str | Path) -> dict[str, tuple[int, int]]:
    """relative path -> (size, mtime_ns) of every file below `directory` (to prove nothing changed)."""
    directory = Path(directory)
    if not directory.exists():
        return {}
    return {p.relative_to(directory).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}



# ---------------------------------------------------------------------------------------------- outputs

def crash_copy(straight: str | Path, crashed: str | Path, step: int) -> Path:
    """`crashed` as a run killed after its step-`step` checkpoint leaves it (what `kill -9` or a lost node
    leaves): that checkpoint, resolved.yaml, ds_config.json and the log up to the step, copied from the
    uninterrupted run `straight`."""
    a, b = Path(straight), Path(crashed)
    b.mkdir(parents=True)
    shutil.copytree(a / f"checkpoint-{step}", b / f"checkpoint-{step}")
    for kept in ("resolved.yaml", "ds_config.json"):
        shutil.copy(a / kept, b / kept)
    lines = (a / "trainer_log.jsonl").read_text(encoding="utf-8").splitlines()
    (b / "trainer_log.jsonl").write_text("".join(line + "\n" for line in lines
                                                 if json.loads(line).get("step", 0) <= step), encoding="utf-8")
    return b


def log_losses(out: str | Path) -> dict[int, float]:
    """step -> logged training loss of a run's trainer_log.jsonl."""
    lines = (Path(out) / "trainer_log.jsonl").read_text(encoding="utf-8").splitlines()
    return {e["step"]: e["loss"] for e in map(json.loads, lines) if "loss" in e}


def assert_same_run(expected: str | Path, got: str | Path, final: str) -> None:
    """Two runs ended with bitwise equal `final` tensors (a file under output_dir), equal logged losses and step."""
    from safetensors.torch import load_file
    import torch

    a, b = Path(expected), Path(got)
    want, have = load_file(a / final), load_file(b / final)
    assert want.keys() == have.keys()
    for key in want:
        assert torch.equal(want[key], have[key]), key
    assert log_losses(b) == log_losses(a)
    assert (json.loads((b / "all_results.json").read_text())["global_step"]
            == json.loads((a / "all_results.json").read_text())["global_step"])


def trained_model(recipe: str | Path, cwd: str | Path, overrides: Sequence[str] = ()) -> Any:
    """Our trained model as `generate --model adapter` loads it (in-process, fp32, eval mode); `overrides`: the
    command-line ones the run was trained with."""
    from pipeline.chat import chosen_weights
    from pipeline.model.build import load_for_inference
    from pipeline.recipe import resolve
    from pipeline.recipe.args import recipe_args
    from pipeline.runtime.layout import RunLayout

    here = Path.cwd()
    os.chdir(cwd)
    try:
        r = resolve(Path(recipe), list(overrides), command="generate", env=cli_env(WORLD_SIZE="1"))
        model, finetune = recipe_args(r)
        weights = chosen_weights(RunLayout.of(r["output_dir"]), finetune, "adapter")
        return load_for_inference(model, weights.kind, weights.path, device="cpu")
    finally:
        os.chdir(here)


def assert_close(theirs: Any, mine: Any, rel: float = 1e-4) -> None:
    """max |diff| of two logit tensors within `rel` of the logits' spread (the softmax does not see a constant
    shift)."""
    theirs = theirs - theirs.mean(-1, keepdim=True)
    mine = mine - mine.mean(-1, keepdim=True)
    err = (theirs - mine).abs().max().item() / mine.abs().max().item()
    assert err < rel, f"relative logit error {err:.2e} >= {rel:.0e}"


def peft_size_line(model: Any) -> str:
    """The "trainable params: T || all params: A || trainable%: P" line PEFT's print_trainable_parameters prints for
    `model` (a PeftModel; LLaMA-Factory prints the same format): the golden for train's first line."""
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        model.print_trainable_parameters()
    return printed.getvalue().strip()
