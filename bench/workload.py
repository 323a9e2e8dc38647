"""Generated workloads: an Alpaca-like dataset with a realistic length spread, its registry and recipe, and a
model checkpoint with gpt2-small widths.

Lengths are log-normal (a few long answers, many short ones), as in Alpaca: 40% of the rows have an
input, instructions are short, responses vary most. Text is drawn from a fixed word list, so every run
of a given size and seed is the same dataset.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

WORDS = tuple((
    "the of and to in is for that on with as are this be by it from at an or not have can which will more "
    "water energy system process data model example describe explain write list give provide summary answer "
    "question research important different between people number function value result analysis language "
    "computer program learning network information history science student teacher company product market "
    "customer service health environment climate change economic social political cultural technology "
    "develop create improve increase reduce understand consider identify evaluate compare classify translate "
    "sentence paragraph article story poem essay letter email report review recipe ingredient method step "
    "because however therefore although while during after before through without within around against "
    "quickly carefully especially generally usually significantly approximately particularly effectively "
    "algorithm database software hardware internet website application security privacy government policy "
    "beautiful difficult interesting necessary possible available traditional international professional "
    "mountain river forest ocean island city village country government university hospital restaurant"
).split())
NAME = "bench_alpaca"


def _lognormal(rng: np.random.Generator, median: float, sigma: float, cap: int, n: int) -> np.ndarray:
    return np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), 1, cap).astype(np.int64)


def _texts(rng: np.random.Generator, counts: np.ndarray) -> list[str]:
    words = np.array(WORDS)[rng.integers(0, len(WORDS), int(counts.sum()))]
    ends = np.cumsum(counts)
    return [" ".join(words[e - c:e]) for c, e in zip(counts.tolist(), ends.tolist())]


@dataclass(frozen=True)
class Lengths:
    """Words per field of a generated instruction row: log-normal (median, sigma, cap) per field, and the share
    of rows that have an input."""

    instruction: tuple[float, float, int]
    input: tuple[float, float, int]
    output: tuple[float, float, int]
    input_share: float


ALPACA = Lengths(instruction=(11, 0.45, 60), input=(14, 0.8, 200), output=(45, 0.85, 400), input_share=0.4)
# The book's 1,100 instructions (rasbt/LLMs-from-scratch ch07/01_main-chapter-code/instruction-data.json, measured in
# words per field: instruction median 7 (log sd 0.31, max 22), input in 29.5% of rows, median 5 (log sd 0.56,
# max 12), output median 7 (log sd 0.58, max 38)). The file itself is not in this repository and cannot be
# downloaded here, so benchmarks generate rows with its length distribution.
BOOK = Lengths(instruction=(7, 0.31, 22), input=(5, 0.56, 12), output=(7, 0.58, 38), input_share=0.295)


def instruction_rows(n: int, lengths: Lengths, seed: int = 0) -> list[dict[str, str]]:
    """n distinct instruction rows whose field lengths (in words) follow `lengths`."""
    rng = np.random.default_rng(seed)
    instruction = _texts(rng, _lognormal(rng, *lengths.instruction, n))
    has_input = rng.random(n) < lengths.input_share
    inputs = _texts(rng, np.where(has_input, _lognormal(rng, *lengths.input, n), 0))
    output = _texts(rng, _lognormal(rng, *lengths.output, n))
    return [{"instruction": f"{ins.capitalize()} ({i}).", "input": inp, "output": f"{out.capitalize()}."}
            for i, (ins, inp, out) in enumerate(zip(instruction, inputs, output))]


def alpaca_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """n distinct Alpaca rows; in words: instruction ~ 11 (median), input ~ 14 in 40% of rows, output ~ 45."""
    return instruction_rows(n, ALPACA, seed)


def book_rows(n: int = 1100, seed: int = 0) -> list[dict[str, str]]:
    """n rows shaped like the book's instruction-data.json (short: ~7-word instructions and answers)."""
    return instruction_rows(n, BOOK, seed)


def write_dataset(dataset_dir: Path, rows: list[dict[str, str]], name: str = NAME) -> Path:
    """raw/<name>.jsonl + dataset_info.json registering it (alpaca formatting)."""
    raw = dataset_dir / "raw" / f"{name}.jsonl"
    raw.parent.mkdir(parents=True, exist_ok=True)
    with open(raw, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    registry = {name: {"file_name": f"raw/{name}.jsonl", "formatting": "alpaca"}}
    (dataset_dir / "dataset_info.json").write_text(json.dumps(registry, indent=2) + "\n", encoding="utf-8")
    return raw


def write_recipe(path: Path, keys: Mapping[str, Any]) -> Path:
    """A recipe file (JSON values are valid YAML)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in keys.items()), encoding="utf-8")
    return path


def one_rank_env() -> dict[str, str]:
    return {**os.environ, "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}


def resolve_recipe(path: Path, overrides: list[str] | tuple[str, ...] = (), command: str = "train") -> Any:
    from pipeline.recipe import resolve

    return resolve(path, list(overrides), command=command, env=one_rank_env())


TEMPLATES = {"gpt2": "alpaca", "qwen3": "qwen3", "qwen2": "qwen", "llama": "llama3"}  # the family's chat template
VOCAB_FAMILY = {"qwen3": "qwen3", "qwen2": "qwen2", "llama": "llama3"}  # tests.helpers.hf_vocab's names


@dataclass(frozen=True)
class Shape:
    """A preset's published widths, heads, KV heads, MLP and vocabulary (pipeline.model.config.PRESETS) with
    `n_layers` blocks: the depth is cut so that a benchmark fits its time budget on 2 cores."""

    preset: str = "gpt2-small"
    n_layers: int = 4

    @property
    def cfg(self) -> Any:
        from pipeline.model.config import PRESETS

        return PRESETS[self.preset].replace(n_layers=self.n_layers)

    @property
    def family(self) -> str:
        return self.cfg.family

    @property
    def template(self) -> str:
        return TEMPLATES[self.family]

    @property
    def slug(self) -> str:
        return f"{self.preset}-{self.n_layers}l"

    def describe(self) -> str:
        """e.g. 'qwen3-0.6b shape (1024 wide, 16 heads, 8 KV heads of 128, MLP 3072, vocab 151936), 4 of 28 layers'."""
        from pipeline.model.config import PRESETS

        c, full = self.cfg, PRESETS[self.preset].n_layers
        kv = f", {c.kv_heads} KV heads" if c.kv_heads != c.n_heads else ""
        return (f"{self.preset} shape ({c.emb_dim} wide, {c.n_heads} heads{kv} of {c.head_dim}, MLP {c.hidden_dim}, "
                f"vocab {c.vocab_size}{', tied head' if c.tie_weights else ''}), {c.n_layers} of {full} layers")

    def save(self, directory: Path, seed: int = 0) -> Path:
        """A checkpoint of this shape with random weights, once: GPT-2 in our own format (its tokenizer is
        built in); other families as the hub ships them, in the HF layout (written by our save_hf) in bf16
        with the family's tokenizer files (real Llama 3 / Qwen vocabularies, fetched from PyPI by
        `make setup` into .cache/vocab)."""
        from pipeline.model.gpt import GPTModel
        from pipeline.model.weights import save_hf, save_model

        if (directory / "config.json").exists():
            return directory
        model = GPTModel(self.cfg, seed=seed)
        if self.family == "gpt2":
            return save_model(model, directory)
        from pipeline.data.tokenizer_files import read_tokenizer
        from tests.helpers.hf_vocab import write_tokenizer_dir

        vocab = write_tokenizer_dir(directory.with_name(directory.name + "-tokenizer"), VOCAB_FAMILY[self.family])
        tok = read_tokenizer(vocab)
        save_hf(model, directory, dtype="bf16",
                special={"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id})
        write_tokenizer_dir(directory, VOCAB_FAMILY[self.family])
        return directory

    def hf_config(self) -> dict[str, Any]:
        from pipeline.model.config import to_hf_config

        return to_hf_config(self.cfg)

    def hf_lora_targets(self) -> list[str]:
        """PEFT target_modules for LoRA on every block Linear (`lora_target: all`), in the family's HF names:
        c_attn, c_proj, c_fc (GPT-2); q/k/v/o_proj, gate/up/down_proj (Llama, Qwen)."""
        from pipeline.model.config import lora_target_modules

        cfg = self.cfg
        return list(dict.fromkeys(cfg.hf.to_hf(m.name).rsplit(".", 1)[-1] for m in lora_target_modules(cfg, "all")))


# The shapes of issue 13's benchmarks: preset -> blocks {full run, --quick}. Cut from 28 and 16 blocks so that a
# benchmark fits in a few minutes on 2 cores; the 130-150k-wide output head then weighs most (see bench/README.md).
FAMILY_LAYERS = {"qwen3-0.6b": {False: 2, True: 1}, "llama-3.2-1b": {False: 2, True: 1}}


def save_gpt2_small_widths(directory: Path, n_layers: int, seed: int = 0) -> Path:
    """Our checkpoint format: gpt2-small's widths (768, 12 heads, vocab 50257, context 1024), n_layers blocks."""
    return Shape("gpt2-small", n_layers).save(directory, seed)


def sft_recipe_keys(workdir: Path, *, model: str, cutoff_len: int, batch_size: int, val_size: float,
                    template: str = "alpaca") -> dict[str, Any]:
    """LoRA sft as the benchmark runs it: r=16, alpha 32 on every attention and MLP Linear, bf16."""
    return {
        "model_name_or_path": model, "stage": "sft", "finetuning_type": "lora", "lora_rank": 16, "lora_alpha": 32,
        "lora_target": "all", "dataset": NAME, "dataset_dir": str(workdir / "data"), "template": template,
        "cutoff_len": cutoff_len, "val_size": val_size, "per_device_train_batch_size": batch_size,
        "per_device_eval_batch_size": batch_size, "gradient_accumulation_steps": 1, "learning_rate": 1e-4,
        "max_steps": 1000, "warmup_steps": 0, "lr_scheduler_type": "constant", "bf16": True,
        "group_by_length": True, "logging_steps": 1, "save_steps": 100000, "plot_loss": False,
        "output_dir": str(workdir / "saves" / "sft"), "overwrite_output_dir": True, "seed": 42,
    }
