"""Untrusted files never run code: recipes are plain data, weights come only from safetensors, nothing is
unpickled, user text is never evaluated or formatted, and data files stay inside dataset_dir.

Each dynamic test plants a payload whose execution would create a file (MARKER) and checks that it does not
exist afterwards; the static tests read the pipeline's source (AST), and prove on a planted snippet that they
would notice a violation.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
from pathlib import Path

import pytest

from tests.reliability.conftest import Reference
from tests.reliability.rel_helpers import (BASE, REPO, assert_user_error, jsonl, make_project, rows, run_cli,
                                           run_main, write)

MARKER = "MARKER"


class Payload:
    """Unpickling this creates MARKER in the current directory."""

    def __reduce__(self):
        return (open, (MARKER, "w"))


# ---------------------------------------------------------------------------------------------- YAML

@pytest.mark.parametrize("where, files, argv", [
    ("recipe", {"r.yaml": BASE + f"seed: !!python/object/apply:builtins.open ['{MARKER}', 'w']\n"}, ["r.yaml"]),
    ("extended file", {"r.yaml": "extends: base.yaml\n" + BASE,
                       "base.yaml": f"seed: !!python/object/new:builtins.open ['{MARKER}', 'w']\n"}, ["r.yaml"]),
    ("override", {}, ["r.yaml", f"seed=!!python/object/apply:builtins.open ['{MARKER}', 'w']"]),
    ("name tag", {"r.yaml": BASE + "template: !!python/name:os.system\n"}, ["r.yaml"]),
])
def test_yaml_python_tags_are_refused_and_never_run(tmp_path, where, files, argv):
    make_project(tmp_path)
    for name, text in files.items():
        write(tmp_path, name, text)
    result = run_main(["validate", *argv], tmp_path)
    assert_user_error(result, "refused: a recipe is plain data, python tags could run code")
    assert not (tmp_path / MARKER).exists()


# ---------------------------------------------------------------------------------------------- static checks

UNSAFE_CALLS = {  # dotted call -> why it is unsafe on files a user was given
    "pickle.load": "unpickles", "pickle.loads": "unpickles", "pickle.Unpickler": "unpickles",
    "dill.load": "unpickles", "joblib.load": "unpickles", "marshal.loads": "runs bytecode",
    "shelve.open": "unpickles", "pandas.read_pickle": "unpickles", "pd.read_pickle": "unpickles",
    "yaml.load": "may construct objects", "yaml.unsafe_load": "constructs objects",
    "yaml.full_load": "constructs objects", "yaml.load_all": "may construct objects",
    "os.system": "runs a shell", "os.popen": "runs a shell",
}
CODE_BUILTINS = {"eval", "exec", "compile", "__import__"}
# dynamic imports whose argument is not user text: the CLI's command tables (COMMANDS, TOOLS), checkpoint classes on
# an allowlist
DYNAMIC_IMPORT_OK = {("pipeline/__main__.py", "main"), ("pipeline/__main__.py", "run_tool"),
                     ("pipeline/train/safestate.py", "_allowed_class")}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def violations(source: str, file: str) -> list[str]:
    """Every unsafe loading / evaluation call in a module, as `file:line: what`."""
    tree = ast.parse(source)
    parents: dict[ast.AST, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    torch_names = {"torch.load"} | {alias.asname or alias.name for node in ast.walk(tree)
                                    if isinstance(node, ast.ImportFrom) and node.module == "torch"
                                    for alias in node.names if alias.name == "load"}

    def function_of(node: ast.AST) -> str:
        while node in parents:
            node = parents[node]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                return node.name
        return ""

    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        at = f"{file}:{node.lineno}"
        if name in torch_names:
            flag = keywords.get("weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                found.append(f"{at}: {name} without weights_only=True")
        elif name in UNSAFE_CALLS:
            found.append(f"{at}: {name} ({UNSAFE_CALLS[name]})")
        elif name in CODE_BUILTINS:
            found.append(f"{at}: {name}() evaluates code")
        elif name.endswith("numpy.load") or name in ("np.load",):
            flag = keywords.get("allow_pickle")
            if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                found.append(f"{at}: {name} with allow_pickle")
        elif name.startswith("subprocess.") and isinstance(keywords.get("shell"), ast.Constant) \
                and keywords["shell"].value is True:
            found.append(f"{at}: {name}(shell=True)")
        elif name in ("importlib.import_module", "import_module") and node.args \
                and not isinstance(node.args[0], ast.Constant) and (file, function_of(node)) not in DYNAMIC_IMPORT_OK:
            found.append(f"{at}: import_module of a computed name")
    return found


def pipeline_sources() -> list[tuple[str, str]]:
    files = sorted((REPO / "pipeline").rglob("*.py"))
    assert len(files) > 30
    return [(str(p.relative_to(REPO)), p.read_text(encoding="utf-8")) for p in files]


def test_no_unpickling_or_code_evaluation_in_the_pipeline():
    found = [v for file, source in pipeline_sources() for v in violations(source, file)]
    assert found == []


def test_the_static_check_notices_violations():
    planted = (
        "import torch, pickle, yaml, importlib\nfrom torch import load as tload\n"
        "torch.load('x.pt')\ntorch.load('x.pt', weights_only=False)\ntload('y')\n"
        "torch.load('z', weights_only=True)\npickle.loads(b'')\nyaml.load(text)\n"
        "eval(recipe['lr'])\nexec(template)\nimportlib.import_module(user_name)\nnp.load('a', allow_pickle=True)\n"
    )
    found = violations(planted, "planted.py")
    assert [v.split(":")[1] for v in found] == ["3", "4", "5", "7", "8", "9", "10", "11", "12"]


def test_torch_load_is_only_reached_with_weights_only(monkeypatch):
    """Whatever DeepSpeed would load during a resume goes through torch.load with weights_only forced on."""
    import torch

    from pipeline.train import checkpoint

    seen = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: seen.append(os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")))
    with checkpoint._weights_only_loads():
        torch.load("anything")
    assert seen == ["1"] and "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


# ---------------------------------------------------------------------------------------------- pickles on disk

def _torch_pickle(path: Path) -> None:
    import torch

    torch.save({"module": Payload()}, path)


def _rehash(ckpt: Path) -> None:
    """What an attacker who can write the files can also do: make the manifest match."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    for rel in manifest["files"]:
        data = (ckpt / rel).read_bytes()
        manifest["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("victim", ["deepspeed/mp_rank_00_model_states.pt",
                                    pytest.param("rng/rank-0.safetensors", marks=pytest.mark.slow)])
def test_a_pickle_planted_in_a_checkpoint_never_runs(trained: Reference, tmp_path, victim):
    root = trained.copy(tmp_path / "proj", output=True)
    ckpt = root / "out" / "checkpoint-3"
    _torch_pickle(ckpt / victim)
    _rehash(ckpt)
    result = run_cli(["train", "r.yaml", "resume_from_checkpoint=out/checkpoint-3", "max_steps=4"], root)
    assert not (root / MARKER).exists(), "the planted pickle was executed"
    assert result.code != 0


def test_a_pickle_planted_in_a_checkpoint_is_a_clear_error(trained: Reference, tmp_path):
    root = trained.copy(tmp_path / "proj", output=True)
    ckpt = root / "out" / "checkpoint-3"
    _torch_pickle(ckpt / "deepspeed" / "mp_rank_00_model_states.pt")
    _rehash(ckpt)
    result = run_main(["train", "r.yaml", "resume_from_checkpoint=out/checkpoint-3", "max_steps=4"], root)
    assert_user_error(result, "out/checkpoint-3/deepspeed/mp_rank_00_model_states.pt", strict_lines=False)
    assert not (root / MARKER).exists()


def test_weights_only_from_safetensors_even_when_a_pickle_sits_beside_them(tmp_path, monkeypatch):
    from pipeline.model.weights import load_model, save_hf

    monkeypatch.chdir(tmp_path)
    save_hf(load_model("tiny", seed=0), tmp_path / "m")
    _torch_pickle(tmp_path / "m" / "pytorch_model.bin")  # both formats, as hub downloads often have
    model = load_model(tmp_path / "m")
    assert model.cfg.n_layers == 2 and not (tmp_path / MARKER).exists()
    (tmp_path / "m" / "model.safetensors").unlink()
    make_project(tmp_path, BASE.replace("model_name_or_path: tiny", "model_name_or_path: m"))
    result = run_main(["generate", "r.yaml", "--prompt", "hi", "--model", "base"], tmp_path)
    assert_user_error(result, "m: no model.safetensors", "pytorch_model.bin are pickled weights", strict_lines=False)
    assert not (tmp_path / MARKER).exists()


# ---------------------------------------------------------------------------------------------- user text

NASTY = {
    "instruction": "{instruction.__class__.__mro__} {0} {content} {system}",
    "input": "{input!r} %(input)s ${HOME} {{}}",
    "output": "{content.__class__} <|endoftext|> {output}",
    "system": "{system.__init__.__globals__}",
}


@pytest.mark.parametrize("name", ["alpaca", "chatml", "empty"])
def test_template_placeholders_in_user_text_stay_literal(name):
    from pipeline.data.templates import get_template

    template = get_template(name)
    prompt = template.prompt(NASTY["instruction"], NASTY["input"], system=NASTY["system"],
                             history=[[NASTY["instruction"], NASTY["output"]]])
    assert prompt.count(NASTY["instruction"]) == 2  # the history turn and this one, verbatim
    assert prompt.count(NASTY["input"]) == 1
    assert NASTY["system"] in prompt or name == "empty"  # the empty template has no system block
    assert NASTY["output"] in template.response(NASTY["output"])
    assert "<class" not in prompt and "mro" in prompt


def test_end_of_text_typed_by_a_user_is_text_not_the_eos_token():
    from pipeline.data.tokenize import encode_rows
    from pipeline.data.tokenizer import gpt2

    row = {"instruction": "say <|endoftext|>", "input": "", "output": "<|endoftext|> done"}
    split = encode_rows([row], "alpaca", gpt2(), cutoff_len=10_000)
    ids = split.ids[split.offsets[0]:split.offsets[1]].tolist()
    assert ids.count(50256) == 1 and ids[-1] == 50256  # only the EOS that closes the response
    assert gpt2().decode(ids[:-1]).count("<|endoftext|>") == 2


# ---------------------------------------------------------------------------------------------- dataset paths

def test_a_symlink_out_of_dataset_dir_is_refused(tmp_path):
    make_project(tmp_path)
    (tmp_path / "secret.jsonl").write_text(jsonl(rows(20)))
    os.symlink(tmp_path / "secret.jsonl", tmp_path / "data" / "raw" / "link.jsonl")
    write(tmp_path, "data/dataset_info.json", {"a": {"file_name": "raw/link.jsonl"}})
    result = run_main(["build", "r.yaml"], tmp_path)
    assert_user_error(result, "data/dataset_info.json:3:", "outside dataset_dir", "refused")
    assert not (tmp_path / "data" / "build").exists()


def test_a_folder_holding_a_symlink_out_of_dataset_dir_is_refused(tmp_path):
    make_project(tmp_path)
    (tmp_path / "secret.jsonl").write_text(jsonl(rows(5)))
    os.symlink(tmp_path / "secret.jsonl", tmp_path / "data" / "raw" / "zz.jsonl")
    write(tmp_path, "data/dataset_info.json", {"a": {"file_name": "raw"}})
    result = run_main(["build", "r.yaml"], tmp_path)
    assert_user_error(result, "zz.jsonl (in folder 'raw')", "outside dataset_dir", "refused")


def test_an_absolute_path_in_the_registry_is_allowed(tmp_path):
    make_project(tmp_path)
    outside = tmp_path / "elsewhere" / "rows.jsonl"
    outside.parent.mkdir()
    outside.write_text(jsonl(rows(20)))
    write(tmp_path, "data/dataset_info.json", {"a": {"file_name": str(outside)}})
    result = run_main(["build", "r.yaml"], tmp_path)
    assert result.code == 0, result.err
    manifest = json.loads((tmp_path / "data" / "build" / "a" / "manifest.json").read_text())
    assert manifest["sources"][0]["path"] == str(outside) and manifest["rows_read"] == 20


def test_a_relative_path_climbing_out_through_the_cli_is_refused(tmp_path):
    make_project(tmp_path)
    (tmp_path / "secret.jsonl").write_text(jsonl(rows(20)))
    write(tmp_path, "data/dataset_info.json", {"a": {"file_name": "raw/../../secret.jsonl"}})
    result = run_cli(["build", "r.yaml"], tmp_path)
    assert_user_error(result, "data/dataset_info.json:3:", "outside dataset_dir", "absolute path")
    assert not (tmp_path / "data" / "build").exists()
