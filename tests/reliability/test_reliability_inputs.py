"""The bad-input corpus: every kind of file a user hands the pipeline, broken in the ways real files break.

Each case: exit code 2, one `error:` line naming the file and its line/row/key (the fragments below), no
traceback, no line that floods the terminal, and the project folder byte-for-byte unchanged (no partial
output, no temp files). The recipe *schema* mistakes live in tests/recipe/test_recipe_broken.py; this corpus
covers what that one does not: encodings and sizes of recipes, DeepSpeed JSON, registries, raw rows of every
format, built files, checkpoints, adapters, model directories and the command line.

Most cases run the CLI entry point in-process (no interpreter start-up); a representative subset runs
`python -m pipeline` in a subprocess, as a user would.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from tests.reliability.rel_helpers import (BASE, assert_user_error, diff, jsonl, make_project, rows, run_cli,
                                           run_main, snapshot, write)

Setup = Callable[[Path], None]


@dataclass
class Case:
    name: str
    kind: str  # recipe | deepspeed | registry | rows-<format> | built | checkpoint | adapter | model | cli
    setup: Setup | dict[str, str | bytes | dict | list]  # files to write (relative to the project) or a function
    expect: tuple[str, ...]  # fragments of the error lines: the file, the line/row/key, what is wrong
    argv: tuple[str, ...] = ("validate", "r.yaml")
    prebuild: bool = False  # build the data before damaging something
    cli: bool = False  # also run through `python -m pipeline` in a subprocess
    strict_lines: bool = True  # stderr holds only error lines (False: the command printed notes first)


def recipe(extra: str = "", base: str = BASE) -> dict[str, str]:
    return {"r.yaml": base + extra}


def files(**named: str | bytes | dict | list) -> dict:
    return {k.replace("__", "/").replace("_DOT_", "."): v for k, v in named.items()}


def registry(entry: dict, name: str = "a") -> dict:
    return {"data/dataset_info.json": {name: entry}}


def raw(name: str, content: str | bytes, formatting: str = "alpaca", **extra) -> dict:
    """A raw file data/raw/<name> registered as dataset 'a'."""
    return {f"data/raw/{name}": content,
            "data/dataset_info.json": {"a": {"file_name": f"raw/{name}", "formatting": formatting, **extra}}}


GOOD = jsonl(rows(20))
HUGE = "x" * (5 << 20)  # a 5 MB line


def _parquet(path: Path, table: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(table), path)


def parquet_case(table: dict, truncate: bool = False) -> Setup:
    def setup(root: Path) -> None:
        path = root / "data" / "raw" / "a.parquet"
        _parquet(path, table)
        if truncate:
            path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
        write(root, "data/dataset_info.json", {"a": {"file_name": "raw/a.parquet"}})
    return setup


GOOD_TABLE = {"instruction": [r["instruction"] for r in rows(20)], "input": [""] * 20,
              "output": [r["output"] for r in rows(20)]}


# ---------------------------------------------------------------------------------------------- built files

def tamper(file: str, change: Callable[[bytes], bytes], rehash: bool = False) -> Setup:
    """Change a built file; rehash: record the new sha256 in the manifest too (a consistent but bad build)."""
    def setup(root: Path) -> None:
        import hashlib

        path = root / "data" / "build" / "a" / file
        path.write_bytes(change(path.read_bytes()))
        if rehash:
            manifest = json.loads((path.parent / "manifest.json").read_text())
            manifest["files"][file] = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                                       "bytes": path.stat().st_size}
            (path.parent / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return setup


def remove_built(file: str) -> Setup:
    return lambda root: (root / "data" / "build" / "a" / file).unlink()


def manifest_edit(edit: Callable[[dict], None]) -> Setup:
    def setup(root: Path) -> None:
        path = root / "data" / "build" / "a" / "manifest.json"
        manifest = json.loads(path.read_text())
        edit(manifest)
        path.write_text(json.dumps(manifest, indent=2))
    return setup


def _set_row(index: int, row) -> Callable[[bytes], bytes]:
    def change(data: bytes) -> bytes:
        loaded = json.loads(data)
        loaded[index] = row
        return ("[" + ",\n".join(json.dumps(r) for r in loaded) + "]\n").encode()
    return change


# ---------------------------------------------------------------------------------------------- weights

def _tiny_model(preset: str = "tiny"):
    from pipeline.model.weights import load_model

    return load_model(preset, seed=0)


def _adapter(root: Path, name: str = "ad", preset: str = "tiny", rank: int = 4) -> Path:
    from pipeline.model.lora import apply_lora, save_adapter

    model = _tiny_model(preset)
    apply_lora(model, ["c_attn"], rank=rank, alpha=2 * rank, seed=0)
    return save_adapter(model, root / name)


def adapter_case(damage: Callable[[Path], None] | None = None, **kw) -> Setup:
    def setup(root: Path) -> None:
        path = _adapter(root, **kw)
        if damage:
            damage(path)
    return setup


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _json_edit(path: Path, **changes) -> None:
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _model_dir(root: Path, name: str = "m", preset: str = "tiny") -> Path:
    from pipeline.model.weights import save_hf

    return save_hf(_tiny_model(preset), root / name)


def model_case(damage: Callable[[Path], None] | None = None, preset: str = "tiny") -> Setup:
    def setup(root: Path) -> None:
        path = _model_dir(root, preset=preset)
        if damage:
            damage(path)
        write(root, "r.yaml", BASE.replace("model_name_or_path: tiny", "model_name_or_path: m"))
    return setup


class Evil:
    """A pickle whose loading would create a file: proof that it was never unpickled."""

    def __reduce__(self):
        return (open, ("UNPICKLED", "w"))


def _pickle_bytes() -> bytes:
    import pickle

    return pickle.dumps({"transformer.wte.weight": Evil()})


def _swap_shapes(path: Path) -> None:
    """Weights of the `mini` preset under tiny's config.json: every tensor has the wrong shape."""
    from pipeline.model.weights import save_hf

    other = save_hf(_tiny_model("mini"), path.parent / "other")
    shutil.copy(other / "model.safetensors", path / "model.safetensors")
    shutil.rmtree(other)


GEN_ADAPTER = ("generate", "r.yaml", "--prompt", "hi", "--model", "adapter")
GEN_BASE = ("generate", "r.yaml", "--prompt", "hi", "--model", "base")
WITH_ADAPTER = BASE + "adapter_name_or_path: ad\n"


def with_recipe(setup: Setup, text: str) -> Setup:
    def both(root: Path) -> None:
        setup(root)
        write(root, "r.yaml", text)
    return both


# ---------------------------------------------------------------------------------------------- checkpoints

def checkpoint_dir(root: Path, step: int = 2, damage: Callable[[Path], None] | None = None) -> Path:
    """A checkpoint directory as the trainer lays it out (adapter + state + manifest), without training."""
    import hashlib

    ckpt = root / "out" / f"checkpoint-{step}"
    _adapter(ckpt, "adapter")
    write(ckpt, "trainer_state.json", {"global_step": step, "epoch": 0, "batch_in_epoch": 2 * step, "recipe": {}})
    files_ = {str(p.relative_to(ckpt)): {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                                         "bytes": p.stat().st_size}
              for p in sorted(ckpt.rglob("*")) if p.is_file()}
    write(ckpt, "manifest.json", {"format": "pipeline-checkpoint", "version": 1, "step": step, "files": files_})
    if damage:
        damage(ckpt)
    return ckpt


def checkpoint_case(resume: str, damage: Callable[[Path], None] | None = None) -> Setup:
    def setup(root: Path) -> None:
        checkpoint_dir(root, damage=damage)
        write(root, "r.yaml", BASE + f"resume_from_checkpoint: {resume}\n")
    return setup


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


TRAIN = ("train", "r.yaml")

CASES: list[Case] = [
    # ------------------------------------------------------------------ recipes (beyond the schema corpus)
    Case("recipe: UTF-8 BOM, the error keeps its line", "recipe",
         {"r.yaml": b"\xef\xbb\xbf" + (BASE + "lora_rnak: 4\n").encode()},
         ("r.yaml:8:1: lora_rnak: unknown key",)),
    Case("recipe: CRLF line ends, line and column exact", "recipe",
         {"r.yaml": (BASE + "stage: sfft\n").replace("\n", "\r\n")},
         ("r.yaml:8:8: stage: given 'sfft'",), cli=True),
    Case("recipe: a 5 MB line", "recipe", recipe(f"template: {HUGE}\n"), ("r.yaml:8:11: template",)),
    Case("recipe: a 5 MB key", "recipe", recipe(f"{HUGE}: 1\n"), ("r.yaml:8:", "invalid YAML")),
    Case("recipe: NUL bytes", "recipe", {"r.yaml": BASE.encode() + b"seed: 1\x00\n"},
         ("r.yaml:8:8: invalid YAML: control character '\\x00'",)),
    Case("recipe: binary file", "recipe", {"r.yaml": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe"},
         ("r.yaml:1:1:", "not UTF-8")),
    Case("recipe: only comments", "recipe", {"r.yaml": "# nothing here\n# yet\n"},
         ("r.yaml:1:1: the recipe is empty",)),
    Case("recipe: alias bomb", "recipe",
         recipe("a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
                "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\n"),
         ("r.yaml:", "too large or too deeply nested")),
    Case("recipe: a mapping where a number goes (wrong nesting)", "recipe", recipe("learning_rate:\n  value: 1.0e-4\n"),
         ("r.yaml:9:3: learning_rate",)),
    Case("recipe: keys indented under another (wrong nesting)", "recipe",
         {"r.yaml": BASE.replace("max_steps: 2\n", "max_steps:\n  learning_rate: 1.0e-4\n")}, ("max_steps",)),
    Case("recipe: deepspeed points at the recipe itself", "recipe", recipe("deepspeed: r.yaml\n"),
         ("r.yaml:1:", "invalid JSON"), cli=True),
    Case("recipe: model_name_or_path points at the recipe itself", "recipe",
         {"r.yaml": BASE.replace("model_name_or_path: tiny", "model_name_or_path: r.yaml")},
         ("r.yaml:1:21: model_name_or_path", "'r.yaml'")),
    Case("recipe: dataset_dir points at the recipe itself", "recipe",
         {"r.yaml": BASE.replace("dataset_dir: data", "dataset_dir: r.yaml")}, ("r.yaml", "dataset_dir")),
    Case("recipe: the recipe is a folder", "recipe", {"folder.yaml/x": "seed: 1\n"}, ("folder.yaml",),
         argv=("validate", "folder.yaml")),
    # ------------------------------------------------------------------ DeepSpeed JSON
    Case("deepspeed: NaN", "deepspeed",
         {**recipe("deepspeed: ds.json\n"),
          "ds.json": '{\n  "train_batch_size": "auto",\n  "gradient_clipping": NaN\n}\n'},
         ("ds.json:3:", "NaN")),
    Case("deepspeed: Infinity inside a section", "deepspeed",
         {**recipe("deepspeed: ds.json\n"),
          "ds.json": '{\n  "zero_optimization": {\n    "stage": 2,\n    "reduce_bucket_size": Infinity\n  }\n}\n'},
         ("ds.json:4:", "Infinity"), cli=True),
    Case("deepspeed: a section given as a number (wrong nesting)", "deepspeed",
         {**recipe("deepspeed: ds.json\n"), "ds.json": {"zero_optimization": 2}}, ("ds.json:2:", "zero_optimization")),
    Case("deepspeed: a section key at the top level (wrong nesting)", "deepspeed",
         {**recipe("deepspeed: ds.json\n"), "ds.json": {"train_batch_size": "auto", "stage": 2}},
         ("ds.json:3:", "stage", "zero_optimization")),
    Case("deepspeed: ZeRO stage 5", "deepspeed", {**recipe("deepspeed: ds.json\n"),
                                                  "ds.json": {"zero_optimization": {"stage": 5}}},
         ("ds.json:3:", "zero_optimization.stage", "5")),
    Case("deepspeed: empty file", "deepspeed", {**recipe("deepspeed: ds.json\n"), "ds.json": ""},
         ("ds.json:1:1: invalid JSON",)),
    Case("deepspeed: a list, not an object", "deepspeed", {**recipe("deepspeed: ds.json\n"), "ds.json": [1, 2]},
         ("ds.json:1:1:", "JSON object")),
    Case("deepspeed: duplicate key", "deepspeed",
         {**recipe("deepspeed: ds.json\n"),
          "ds.json": '{\n  "train_batch_size": "auto",\n  "train_batch_size": 8\n}\n'},
         ("ds.json", "train_batch_size")),
    Case("deepspeed: not UTF-8", "deepspeed", {**recipe("deepspeed: ds.json\n"),
                                               "ds.json": b'{"train_batch_size": "caf\xe9"}'}, ("ds.json", "UTF-8")),
    Case("deepspeed: an optimizer given as a bare name", "deepspeed",
         {**recipe("deepspeed: ds.json\n"), "ds.json": {"train_batch_size": "auto", "optimizer": "AdamW"}},
         ("ds.json:3:3: optimizer: the optimizer is AdamW built from the recipe", "remove the 'optimizer' section")),
    Case("deepspeed: bf16 enabled as a string", "deepspeed",
         {**recipe("deepspeed: ds.json\n"), "ds.json": {"bf16": {"enabled": "true"}}},
         ("ds.json:3:", "bf16.enabled")),
    # ------------------------------------------------------------------ registries
    Case("registry: missing", "registry", lambda root: (root / "data" / "dataset_info.json").unlink(),
         ("data/dataset_info.json: not found",), cli=True),
    Case("registry: empty file", "registry", {"data/dataset_info.json": ""}, ("data/dataset_info.json:1:",)),
    Case("registry: invalid JSON", "registry",
         {"data/dataset_info.json": '{\n  "a": {"file_name": "raw/a.jsonl",}\n}\n'},
         ("data/dataset_info.json:2:", "invalid JSON")),
    Case("registry: NaN", "registry",
         {"data/dataset_info.json": '{"a": {"file_name": "raw/a.jsonl", "num_samples": NaN}}'},
         ("data/dataset_info.json", "NaN")),
    Case("registry: a list at the top", "registry", {"data/dataset_info.json": [{"file_name": "raw/a.jsonl"}]},
         ("data/dataset_info.json:1:", "a list")),
    Case("registry: UTF-16", "registry",
         {"data/dataset_info.json": json.dumps({"a": {"file_name": "raw/a.jsonl"}}).encode("utf-16")},
         ("data/dataset_info.json", "UTF-8")),
    Case("registry: BOM + CRLF, unknown formatting on line 4", "registry",
         {"data/dataset_info.json": b"\xef\xbb\xbf" + b'{\r\n  "a": {\r\n    "file_name": "raw/a.jsonl",\r\n'
                                    b'    "formatting": "alpacca"\r\n  }\r\n}\r\n'},
         ("data/dataset_info.json:4:", "alpacca", "did you mean 'alpaca'")),
    Case("registry: columns nested wrongly", "registry",
         registry({"file_name": "raw/a.jsonl", "columns": "instruction"}), ("data/dataset_info.json:4:", "columns")),
    Case("registry: file outside dataset_dir", "registry",
         {"secret.jsonl": GOOD, **registry({"file_name": "../secret.jsonl"})},
         ("data/dataset_info.json:3:", "outside dataset_dir", "refused"), cli=True),
    Case("registry: missing file, with a suggestion", "registry", registry({"file_name": "raw/a.jsnl"}),
         ("data/dataset_info.json:3:", "does not exist", "did you mean 'a.jsonl'")),
    Case("registry: unsupported file type", "registry",
         {"data/raw/a.xlsx": b"PK\x03\x04", **registry({"file_name": "raw/a.xlsx"})},
         ("data/dataset_info.json:3:", "unsupported file type '.xlsx'")),
    # ------------------------------------------------------------------ raw rows: alpaca JSON Lines
    Case("jsonl: a Latin-1 byte", "rows-jsonl",
         {"data/raw/a.jsonl": GOOD.encode() + b'{"instruction": "caf\xe9", "output": "x"}\n'},
         ("data/raw/a.jsonl:21:", "not valid UTF-8", "0xe9"), argv=("build", "r.yaml"), cli=True),
    Case("jsonl: NaN", "rows-jsonl", {"data/raw/a.jsonl": GOOD + '{"instruction": "i", "input": "", "output": NaN}\n'},
         ("data/raw/a.jsonl:21:", "NaN"), argv=("build", "r.yaml")),
    Case("jsonl: BOM + CRLF, a bad row keeps its line", "rows-jsonl",
         {"data/raw/a.jsonl": b"\xef\xbb\xbf"
                              + (GOOD + '{"instruction": "i", "output": 3}\n').replace("\n", "\r\n").encode()},
         ("data/raw/a.jsonl:21:", "'output' is a number (3); expected a string"), argv=("build", "r.yaml")),
    Case("jsonl: a 5 MB broken line", "rows-jsonl", {"data/raw/a.jsonl": GOOD + '{"instruction": "' + HUGE + '"\n'},
         ("data/raw/a.jsonl:21:", "invalid JSON"), argv=("build", "r.yaml")),
    Case("jsonl: a 5 MB value of the wrong type", "rows-jsonl",
         {"data/raw/a.jsonl": GOOD + json.dumps({"instruction": "i", "output": [HUGE]}) + "\n"},
         ("data/raw/a.jsonl:21:", "'output' is a list"), argv=("build", "r.yaml")),
    Case("jsonl: empty file", "rows-jsonl", {"data/raw/a.jsonl": ""}, ("a", "no rows"), argv=("build", "r.yaml")),
    Case("jsonl: a column misspelled", "rows-jsonl",
         {"data/raw/a.jsonl": GOOD + '{"instrution": "i", "output": "o"}\n'},
         ("data/raw/a.jsonl:21:", "missing 'instruction'", "did you mean"), argv=("build", "r.yaml")),
    Case("jsonl: truncated last line", "rows-jsonl", {"data/raw/a.jsonl": GOOD + '{"instruction": "i", "outp'},
         ("data/raw/a.jsonl:21:", "invalid JSON"), argv=("build", "r.yaml")),
    Case("jsonl: history nested wrongly", "rows-jsonl",
         {"data/raw/a.jsonl": GOOD + '{"instruction": "i", "output": "o", "history": ["q", "a"]}\n'},
         ("data/raw/a.jsonl:21:", "'history'[0]"), argv=("build", "r.yaml")),
    # ------------------------------------------------------------------ raw rows: alpaca JSON array
    Case("json: truncated array", "rows-json", raw("a.json", json.dumps(rows(5), indent=1)[:-40]),
         ("data/raw/a.json:", "invalid JSON"), argv=("build", "r.yaml")),
    Case("json: Infinity in row 3", "rows-json",
         raw("a.json", "[\n" + ",\n".join(json.dumps(r) for r in rows(2))
             + ',\n{"instruction": "i", "output": Infinity}\n]\n'),
         ("data/raw/a.json:4:", "Infinity"), argv=("build", "r.yaml")),
    Case("json: an object instead of an array (wrong nesting)", "rows-json",
         raw("a.json", json.dumps({"rows": rows(3)}, indent=2)),
         ("data/raw/a.json:1: one JSON object whose 'rows' holds 3 rows", "move the rows to the top level"),
         argv=("build", "r.yaml")),
    Case("json: UTF-16", "rows-json", raw("a.json", json.dumps(rows(3)).encode("utf-16")),
         ("data/raw/a.json:1:", "UTF-16"), argv=("build", "r.yaml")),
    # ------------------------------------------------------------------ raw rows: ShareGPT
    Case("sharegpt: turns do not alternate", "rows-sharegpt",
         raw("s.jsonl", jsonl([{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}] * 2
                              + [{"conversations": [{"from": "human", "value": "a"},
                                                    {"from": "human", "value": "b"}]}]),
             formatting="sharegpt"),
         ("data/raw/s.jsonl:3:", "conversations[1].from is 'human' where 'gpt' was expected"),
         argv=("build", "r.yaml")),
    Case("sharegpt: conversations is a string", "rows-sharegpt",
         raw("s.jsonl", jsonl([{"conversations": "hello"}]), formatting="sharegpt"),
         ("data/raw/s.jsonl:1:", "'conversations' is a string"), argv=("build", "r.yaml")),
    Case("sharegpt: a tool-use turn", "rows-sharegpt",
         raw("s.jsonl", jsonl([{"conversations": [{"from": "human", "value": "a"},
                                                   {"from": "function_call", "value": "{}"}]}]), formatting="sharegpt"),
         ("data/raw/s.jsonl:1:", "conversations[1].from is 'function_call'", "template 'alpaca' does not; use one "
          "that does (chatml, qwen"), argv=("build", "r.yaml")),
    # ------------------------------------------------------------------ raw rows: CSV / TSV
    Case("csv: wrong number of fields", "rows-csv",
         raw("a.csv", "instruction,input,output\nSay hi,,hi\nSay yo,,yo,extra\nSay a,,a\n"),
         ("data/raw/a.csv:3:", "4 fields, but the header has 3"), argv=("build", "r.yaml"), cli=True),
    Case("csv: empty file", "rows-csv", raw("a.csv", ""), ("data/raw/a.csv:1:", "empty file"),
         argv=("build", "r.yaml")),
    Case("csv: missing column", "rows-csv", raw("a.csv", "prompt,output\nSay hi,hi\n"),
         ("data/raw/a.csv:1:", "missing column 'instruction'"), argv=("build", "r.yaml")),
    Case("csv: unterminated quote", "rows-csv", raw("a.csv", 'instruction,input,output\nSay hi,,hi\n"Say yo,,yo\n'),
         ("data/raw/a.csv:", "CSV error"), argv=("build", "r.yaml")),
    Case("csv: CP-1252 bytes", "rows-csv", raw("a.csv", b"instruction,input,output\nSay hi,,hi\nna\xefve,,x\n"),
         ("data/raw/a.csv:3:", "not valid UTF-8"), argv=("build", "r.yaml")),
    Case("tsv: commas where tabs belong", "rows-tsv", raw("a.tsv", "instruction,input,output\nSay hi,,hi\n"),
         ("data/raw/a.tsv:1:", "the file looks comma-separated: a .tsv file separates columns with tabs; name it "
                               ".csv"), argv=("build", "r.yaml")),
    Case("tsv: a 5 MB cell on a short row", "rows-tsv",
         raw("a.tsv", f"instruction\tinput\toutput\nSay hi\t\thi\n{HUGE}\tonly two\n"),
         ("data/raw/a.tsv:3:", "2 fields, but the header has 3"), argv=("build", "r.yaml")),
    # ------------------------------------------------------------------ raw rows: Parquet
    Case("parquet: truncated file", "rows-parquet", parquet_case(GOOD_TABLE, truncate=True),
         ("data/raw/a.parquet:", "not a readable Parquet file"), argv=("build", "r.yaml")),
    Case("parquet: missing column", "rows-parquet", parquet_case({"question": ["q"], "output": ["o"]}),
         ("data/raw/a.parquet:", "missing column 'instruction'"), argv=("build", "r.yaml")),
    Case("parquet: numbers where text belongs", "rows-parquet",
         parquet_case({"instruction": ["a", "b"], "input": ["", ""], "output": [1, 2]}),
         ("data/raw/a.parquet:row 1:", "'output' is a number"), argv=("build", "r.yaml")),
    Case("parquet: a CSV renamed .parquet", "rows-parquet",
         {"data/raw/a.parquet": "instruction,input,output\na,,b\n", **registry({"file_name": "raw/a.parquet"})},
         ("data/raw/a.parquet:", "not a readable Parquet file"), argv=("build", "r.yaml")),
    # ------------------------------------------------------------------ raw rows: text corpora (stage pt)
    Case("text: not UTF-8", "rows-text",
         {**raw("c.txt", b"plain words\nmore words\ncaf\xe9 words\n", formatting="text"), **recipe("stage: pt\n")},
         ("data/raw/c.txt:3:", "not valid UTF-8"), argv=("build", "r.yaml")),
    Case("text: empty corpus", "rows-text", {**raw("c.txt", "", formatting="text"), **recipe("stage: pt\n")},
         ("'a'",), argv=("build", "r.yaml")),
    Case("text: UTF-16 corpus", "rows-text",
         {**raw("c.txt", "words words words\n".encode("utf-16"), formatting="text"), **recipe("stage: pt\n")},
         ("data/raw/c.txt:1:", "UTF-16"), argv=("build", "r.yaml")),
    Case("text: a text corpus for sft", "rows-text", raw("c.txt", "words words\n", formatting="text"),
         ("data/dataset_info.json:", "stage is sft"), argv=("build", "r.yaml")),
    # ------------------------------------------------------------------ built files (tampered after `make data`)
    # (the rebuild named as `python -m pipeline build r.yaml`: the project holds no Makefile, pipeline.rerun)
    Case("built: train.json truncated", "built", tamper("train.json", lambda b: b[: len(b) // 2]),
         ("data/build/a/train.json:", "invalid JSON", "python -m pipeline build"), prebuild=True, cli=True),
    Case("built: a row with a number for output", "built",
         tamper("train.json", _set_row(2, {"instruction": "i", "input": "", "output": 5}), rehash=True),
         ("data/build/a/train.json:3:output", "is a number"), prebuild=True),
    Case("built: a row nested in a list", "built", tamper("train.json", _set_row(0, [rows(1)[0]]), rehash=True),
         ("data/build/a/train.json:1", "is a list"), prebuild=True),
    Case("built: train.json edited by hand (sha256 differs)", "built",
         tamper("train.json", lambda b: b.replace(b"Repeat", b"Ignore", 1)),
         ("data/build/a/train.json: changed after it was built", "python -m pipeline build"), prebuild=True, cli=True),
    Case("built: train.json not UTF-8", "built", tamper("train.json", lambda b: b.replace(b"Repeat", b"R\xe9peat", 1)),
         ("data/build/a/train.json", "UTF-8"), prebuild=True),
    Case("built: train.json deleted", "built", remove_built("train.json"),
         ("data/build/a", "train.json missing", "python -m pipeline build"),
         prebuild=True),
    Case("built: manifest deleted", "built", remove_built("manifest.json"),
         ("data/build/a", "is not built", "python -m pipeline build"),
         prebuild=True),
    Case("built: manifest row count edited", "built", manifest_edit(lambda m: m["splits"].update(train=99)),
         ("data/build/a/train.json", "manifest.json says 99"), prebuild=True),
    Case("built: manifest truncated", "built", tamper("manifest.json", lambda b: b[:100]),
         ("data/build/a/manifest.json: damaged", "python -m pipeline build"), prebuild=True),
    Case("built: manifest splits nested wrongly", "built", manifest_edit(lambda m: m.update(splits=[18, 2])),
         ("data/build/a/manifest.json: damaged",), prebuild=True),
    Case("built: a row deleted from train.json", "built",
         tamper("train.json", lambda b: b"[" + b.split(b"\n", 1)[1]),
         ("data/build/a/train.json: 17 rows, but manifest.json says 18",),
         prebuild=True),
    Case("built: train.json tampered when training", "built", tamper("train.json", lambda b: b[: len(b) // 2]),
         ("data/build/a/train.json:", "invalid JSON"), argv=TRAIN, prebuild=True, strict_lines=False),
    # ------------------------------------------------------------------ adapters
    Case("adapter: truncated safetensors", "adapter",
         with_recipe(adapter_case(lambda p: _truncate(p / "adapter_model.safetensors")), WITH_ADAPTER),
         ("ad/adapter_model.safetensors", "truncated or corrupt"), argv=GEN_ADAPTER, strict_lines=False, cli=True),
    Case("adapter: for another model shape", "adapter", with_recipe(adapter_case(preset="mini"), WITH_ADAPTER),
         ("ad/adapter_model.safetensors", "has shape [4, 128], the model expects [4, 64]"), argv=GEN_ADAPTER,
         strict_lines=False),
    Case("adapter: rank in the config differs from the tensors", "adapter",
         with_recipe(adapter_case(lambda p: _json_edit(p / "adapter_config.json", r=8, lora_alpha=16)), WITH_ADAPTER),
         ("ad/adapter_model.safetensors", "has shape [4, 64], the model expects [8, 64]"), argv=GEN_ADAPTER,
         strict_lines=False),
    Case("adapter: missing adapter_config.json", "adapter",
         with_recipe(adapter_case(lambda p: (p / "adapter_config.json").unlink()), WITH_ADAPTER),
         ("r.yaml:8:23: adapter_name_or_path: 'ad' holds no adapter_config.json",), argv=GEN_ADAPTER,
         strict_lines=False),
    Case("adapter: pickled adapter_model.bin only", "adapter",
         with_recipe(adapter_case(lambda p: ((p / "adapter_model.safetensors").unlink(),
                                             (p / "adapter_model.bin").write_bytes(_pickle_bytes()))), WITH_ADAPTER),
         ("ad/adapter_model.safetensors: missing", "adapter_model.bin holds pickled weights", "never loads"),
         argv=GEN_ADAPTER, strict_lines=False),
    Case("adapter: adapter_config.json with NaN", "adapter",
         with_recipe(adapter_case(lambda p: (p / "adapter_config.json").write_text('{"r": NaN, "lora_alpha": 8, '
                                                                                   '"target_modules": ["c_attn"]}')),
                     WITH_ADAPTER),
         ("ad/adapter_config.json", "NaN"), argv=GEN_ADAPTER, strict_lines=False),
    Case("adapter: a path that is a file", "adapter", {"ad": "not a folder", "r.yaml": WITH_ADAPTER},
         ("ad",), argv=GEN_ADAPTER, strict_lines=False),
    # ------------------------------------------------------------------ HF model directories
    Case("model: missing config.json", "model", model_case(lambda p: (p / "config.json").unlink()),
         ("m", "no config.json"), cli=True),
    Case("model: weights of another shape", "model", model_case(_swap_shapes),
         ("m/model.safetensors: tensor 'wte.weight' has shape [50257, 128], the model expects [50257, 64]",
          "more tensors that do not fit"),
         argv=GEN_BASE, strict_lines=False),
    Case("model: truncated model.safetensors", "model", model_case(lambda p: _truncate(p / "model.safetensors", 0.3)),
         ("m/model.safetensors", "truncated or corrupt"), argv=GEN_BASE, strict_lines=False),
    Case("model: pytorch_model.bin only", "model",
         model_case(lambda p: ((p / "model.safetensors").unlink(),
                               (p / "pytorch_model.bin").write_bytes(_pickle_bytes()))),
         ("m: no model.safetensors", "pytorch_model.bin", "never loads"), argv=GEN_BASE, strict_lines=False),
    Case("model: config.json not JSON", "model", model_case(lambda p: (p / "config.json").write_text("{'n_embd': 64}")),
         ("m/config.json", "not readable as JSON")),
    Case("model: config.json of another architecture", "model",
         model_case(lambda p: _json_edit(p / "config.json", model_type="llama")),
         ("m/config.json", "model_type 'llama'")),
    Case("model: index lists a missing shard", "model",
         model_case(lambda p: ((p / "model.safetensors").rename(p / "model-00001-of-00002.safetensors"),
                               write(p, "model.safetensors.index.json", {"weight_map": {
                                   "transformer.wte.weight": "model-00001-of-00002.safetensors",
                                   "transformer.h.0.ln_1.weight": "model-00002-of-00002.safetensors"}}))),
         ("m/model.safetensors.index.json", "model-00002-of-00002.safetensors", "missing"), argv=GEN_BASE,
         strict_lines=False),
    Case("merge: no trained adapter", "adapter", {}, ("adapter",), argv=("merge", "r.yaml"), prebuild=True,
         strict_lines=False),
    Case("merge: the trained adapter is truncated", "adapter",
         adapter_case(lambda p: _truncate(p / "adapter_model.safetensors"), name="out/adapter"),
         ("out/adapter/adapter_model.safetensors", "truncated or corrupt"), argv=("merge", "r.yaml"), prebuild=True,
         strict_lines=False),
    # ------------------------------------------------------------------ checkpoints (resume_from_checkpoint)
    Case("checkpoint: sha256 mismatch", "checkpoint",
         checkpoint_case("out/checkpoint-2", lambda c: _flip_last_byte(c / "adapter" / "adapter_model.safetensors")),
         ("out/checkpoint-2/adapter/adapter_model.safetensors does not match its sha256",), argv=TRAIN, prebuild=True,
         strict_lines=False),
    Case("checkpoint: half-written (no manifest)", "checkpoint",
         checkpoint_case("out/checkpoint-2", lambda c: (c / "manifest.json").unlink()),
         ("out/checkpoint-2/manifest.json is missing",), argv=TRAIN, prebuild=True, strict_lines=False),
    Case("checkpoint: manifest with NaN", "checkpoint",
         checkpoint_case("out/checkpoint-2", lambda c: (c / "manifest.json").write_text('{"format": NaN}')),
         ("out/checkpoint-2/manifest.json",), argv=TRAIN, prebuild=True, strict_lines=False),
    Case("checkpoint: latest, but the only one is damaged", "checkpoint",
         checkpoint_case("latest", lambda c: _truncate(c / "adapter" / "adapter_model.safetensors")),
         ("every checkpoint in out is damaged", "checkpoint-2"), argv=TRAIN, prebuild=True, strict_lines=False),
    Case("checkpoint: does not exist", "checkpoint", {"r.yaml": BASE + "resume_from_checkpoint: out/checkpoint-9\n"},
         ("r.yaml:8:25: resume_from_checkpoint: directory 'out/checkpoint-9' not found",), argv=TRAIN, prebuild=True,
         strict_lines=False),
    # ------------------------------------------------------------------ command line
    Case("cli: unknown command", "cli", {}, ("argument command: invalid choice: 'trian' (did you mean 'train'?)",),
         argv=("trian", "r.yaml"), cli=True),
    Case("cli: no recipe", "cli", {}, ("the following arguments are required: recipe",), argv=("validate",)),
    Case("cli: missing recipe file", "cli", {}, ("nope.yaml: recipe not found",), argv=("validate", "nope.yaml"),
         cli=True),
    Case("cli: override without a key", "cli", {}, ("command line override '=5': expected key=value",),
         argv=("validate", "r.yaml", "=5")),
    Case("cli: override with a python tag", "cli", {},
         ("command line override seed=!!python/object/apply:os.system ['true']", "refused"),
         argv=("validate", "r.yaml", "seed=!!python/object/apply:os.system ['true']")),
    Case("cli: unknown flag", "cli", {}, ("unrecognized arguments: --fast",), argv=("validate", "r.yaml", "--fast")),
    Case("cli: bad flag value", "cli", {}, ("argument --model: invalid choice: 'best'",),
         argv=("generate", "r.yaml", "--model", "best")),
    Case("cli: flag without its value", "cli", {}, ("argument --num: expected one argument",),
         argv=("inspect", "r.yaml", "--num")),
    Case("cli: recipe that is a YAML list of overrides", "cli", {"o.yaml": "- lora_rank=4\n"},
         ("o.yaml:1:1: the recipe must be a mapping",), argv=("validate", "o.yaml")),
]


def _apply(case: Case, root: Path) -> None:
    if callable(case.setup):
        case.setup(root)
    else:
        for name, content in case.setup.items():
            write(root, name, content)


def _prepare(case: Case, root: Path) -> None:
    make_project(root)
    if case.prebuild:
        result = run_main(["build", "r.yaml"], root)
        assert result.code == 0, result.err
    _apply(case, root)


def _check(case: Case, root: Path, run) -> None:
    before = snapshot(root)
    result = run(list(case.argv), root)
    assert_user_error(result, *case.expect, strict_lines=case.strict_lines)
    assert not diff(before, snapshot(root)), diff(before, snapshot(root))
    assert not (root / "UNPICKLED").exists()


def test_the_corpus_is_large_and_covers_every_input_kind():
    kinds = {c.kind for c in CASES}
    assert len(CASES) >= 60
    assert {"recipe", "deepspeed", "registry", "built", "checkpoint", "adapter", "model", "cli"} <= kinds
    assert {f"rows-{f}" for f in ("jsonl", "json", "sharegpt", "csv", "tsv", "parquet", "text")} <= kinds
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, tmp_path: Path):
    _prepare(case, tmp_path)
    _check(case, tmp_path, run_main)


SUBPROCESS = [c for c in CASES if c.cli]


@pytest.mark.parametrize("case", SUBPROCESS, ids=[c.name for c in SUBPROCESS])
def test_bad_input_through_the_real_cli(case: Case, tmp_path: Path):
    _prepare(case, tmp_path)
    _check(case, tmp_path, lambda argv, root: run_cli(argv, root, timeout=120))


def test_deepspeed_json_with_a_key_deepspeed_does_not_know_is_a_clear_error(tmp_path: Path):
    from pipeline.runtime import dist

    dist.ensure_launch_env()
    make_project(tmp_path, BASE + "deepspeed: ds.json\n")
    write(tmp_path, "ds.json", {"zero_optimization": {"stage": 2, "overlap_comm_typo": True}})
    assert run_main(["build", "r.yaml"], tmp_path).code == 0
    before = snapshot(tmp_path)
    result = run_main(["train", "r.yaml"], tmp_path)
    assert_user_error(result, "ds.json", "overlap_comm_typo", strict_lines=False)
    assert not diff(before, snapshot(tmp_path))
