"""The registry: every unknown field, name or bad path is an error with its line and a suggestion."""
from __future__ import annotations

import json
import os

import pytest

from pipeline.recipe.args import data_args
from pipeline.data.jsonpos import key_lines
from pipeline.data.registry import resolve_datasets, source_paths
from pipeline.errors import UserError


def write_registry(r, text: str) -> str:
    path = os.path.join(r["dataset_dir"], "dataset_info.json")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return os.path.normpath(path)


def errors(r, key="dataset") -> list[str]:
    with pytest.raises(UserError) as err:
        resolve_datasets(data_args(r), key)
    return err.value.messages


@pytest.fixture
def r(make_recipe):
    return make_recipe(files={"raw/a.jsonl": "{}\n", "raw/b.csv": "x\n"}, dataset=["demo"])


def test_key_lines():
    text = '{\n  "a": {\n    "b": 1,\n    "c": [1, {"d": 2}]\n  },\n  "e": "x",\n  "e": "y"\n}'
    lines, dups = key_lines(text)
    assert lines[("a",)] == 2 and lines[("a", "b")] == 3 and lines[("a", "c")] == 4
    assert lines[("a", "c", 1, "d")] == 4 and lines[("e",)] == 6
    assert dups == [(("e",), 6, 7)]


def test_good_entry_defaults(r):
    write_registry(r, json.dumps({"demo": {"file_name": "raw/a.jsonl"}}))
    (spec,) = resolve_datasets(data_args(r))
    assert spec.formatting == "alpaca" and spec.columns["prompt"] == "instruction"
    assert spec.columns["response"] == "output" and spec.files[0].name == "a.jsonl"


def test_unknown_field_names_line_and_suggests(r):
    path = write_registry(r, '{\n  "demo": {\n    "file_name": "raw/a.jsonl",\n'
                             '    "columns": {"promt": "q"},\n    "formating": "alpaca"\n  }\n}\n')
    messages = errors(r)
    assert len(messages) == 2
    assert messages[0].startswith(f"{path}:4: \"demo\".columns: 'promt': unknown field (did you mean 'prompt'?); "
                                  "allowed: prompt, query, response, system, history, messages, text, tools, ")
    assert messages[1].startswith(f"{path}:5: \"demo\": 'formating': unknown field (did you mean 'formatting'?); "
                                  "allowed: file_name, hf_hub_url, ")


def test_enum_and_type_errors(r):
    path = write_registry(r, '{"demo": {"file_name": "raw/a.jsonl",\n "formatting": "sharegtp",\n'
                             ' "num_samples": "10"}}')
    messages = errors(r)
    assert messages[0] == (f'{path}:2: "demo".formatting is "sharegtp"; expected one of alpaca, sharegpt, text '
                           "(did you mean 'sharegpt'?)")
    assert messages[1] == f'{path}:3: "demo".num_samples is a string ("10"); expected an integer'


def test_openai_formatting_says_what_to_write_instead(r):
    """LLaMA-Factory 0.9.5 has a third converter, formatting "openai" (tool_calls, merged tool results, a "detailed
    thinking off" system line); the refusal names the sharegpt entry that reads role/content messages."""
    path = write_registry(r, '{"demo": {"file_name": "raw/a.jsonl",\n "formatting": "openai"}}')
    (message,) = errors(r)
    assert message.startswith(f'{path}:2: "demo".formatting is "openai": LLaMA-Factory\'s openai converter ')
    assert '"formatting": "sharegpt"' in message and '"role_tag": "role"' in message


def test_dataset_name_that_is_not_one_folder_is_refused(r, tmp_path):
    """A dataset's name is its build folder (dataset_dir/build/<name>): '../../x' built outside dataset_dir, and
    'org/name' inside the build of a dataset 'org' (which a rebuild of 'org' replaces whole)."""
    entry = {"file_name": "raw/a.jsonl"}
    path = write_registry(r, json.dumps({"../../esc": entry, "org/name": entry}))
    messages = errors(dict(r, dataset=["../../esc", "org/name"]))
    assert len(messages) == 2 and all("a dataset's name is also its build folder" in m for m in messages)
    assert messages[0].startswith(f"{path}:1: \"../../esc\": ")
    assert not (tmp_path / "esc").exists()


def test_missing_source_and_refused_hubs(r):
    path = write_registry(r, '{"demo": {\n"formatting": "alpaca"},\n"ms": {"ms_hub_url": "a/b"},\n'
                             '"script": {"script_url": "x"}}')
    assert errors(r) == [f"{path}:1: \"demo\": no data source; give 'file_name' (a file or folder relative to "
                         "dataset_dir) or 'hf_hub_url' (a Hugging Face dataset repository)"]
    r["dataset"] = ["ms", "script"]
    ms, script = errors(r)
    assert ms.startswith(f'{path}:3: "ms".ms_hub_url: ModelScope downloads are not supported')
    assert script.startswith(f'{path}:4: "script".script_url: dataset loading scripts are refused')


def test_unknown_dataset_name_suggests(r):
    path = write_registry(r, json.dumps({"demo": {"file_name": "raw/a.jsonl"}}))
    r["dataset"] = ["demo", "dmeo2"]
    r["eval_dataset"] = ["deno"]
    assert errors(r) == [f"dataset: dataset 'dmeo2' is not in {path} (did you mean 'demo'?); registered: demo"]
    assert "dataset 'deno' is not in" in errors(r, "eval_dataset")[0]


def test_unknown_dataset_name_names_the_key_where_it_was_set(tmp_path, monkeypatch):
    """The registry's own message (a name not registered when the datasets are read, after the recipe rules ran:
    dataset_info.json edited meanwhile) began with the recipe line alone, `r.yaml:2:10: dataset 'x' ...`, not saying
    whether `dataset` or `eval_dataset` named it; now as every message names a key (recipe.args.key_at)."""
    from pipeline.recipe import resolve
    from tests.acceptance.harness import write_data, write_recipe

    monkeypatch.chdir(tmp_path)
    write_data(tmp_path / "data")
    write_recipe(tmp_path / "r.yaml", model_name_or_path="tiny", dataset_dir="data", dataset="tiny_sft")
    r = resolve("r.yaml", ["eval_dataset=tiny_pt"], command="build")
    registry = tmp_path / "data" / "dataset_info.json"
    registry.write_text(json.dumps({"other": json.loads(registry.read_text(encoding="utf-8"))["tiny_sft"]}))
    assert errors(r)[0].startswith(f"r.yaml:{r.origin('dataset').line}: dataset: dataset 'tiny_sft' is not in "
                                   "data/dataset_info.json"), errors(r)
    assert errors(r, "eval_dataset")[0].startswith("command line override eval_dataset=tiny_pt: eval_dataset: dataset "
                                                   "'tiny_pt' is not in"), errors(r, "eval_dataset")


def test_duplicate_key_and_broken_json(r):
    path = write_registry(r, '{"demo": {"file_name": "raw/a.jsonl"},\n"demo": {"file_name": "raw/b.csv"}}')
    assert errors(r) == [f'{path}:2: "demo" is given twice (first at line 1); JSON keeps only the last']
    write_registry(r, '{"demo": {"file_name": "raw/a.jsonl",}\n}')
    assert errors(r)[0].startswith(f"{path}:1: invalid JSON at column 38")  # the } after the comma
    write_registry(r, '{"demo": {"file_name": "raw/a.jsonl", "num_samples": NaN}}')
    assert "NaN is not valid JSON" in errors(r)[0]
    write_registry(r, '["demo"]')
    assert "expected a JSON object" in errors(r)[0]


def test_missing_registry_and_dir(make_recipe, tmp_path):
    r = make_recipe(dataset=["demo"])
    assert "dataset_info.json: not found" in errors(r)[0]
    r["dataset_dir"] = str(tmp_path / "nope")
    assert "is not a folder" in errors(r)[0]


def test_missing_file_suggests_neighbour(r):
    path = write_registry(r, json.dumps({"demo": {"file_name": "raw/a.json"}}, indent=1))
    (message,) = errors(r)
    assert message.startswith(f'{path}:3: "demo".file_name: ')
    assert "raw/a.json does not exist (did you mean 'a.jsonl'?)" in message


def test_path_escaping_dataset_dir_is_refused(r, tmp_path):
    outside = tmp_path / "secret.jsonl"
    outside.write_text("{}\n")
    write_registry(r, json.dumps({"demo": {"file_name": "../secret.jsonl"}}))
    assert "outside dataset_dir" in errors(r)[0] and "refused" in errors(r)[0]
    os.symlink(outside, os.path.join(r["dataset_dir"], "raw", "link.jsonl"))
    write_registry(r, json.dumps({"demo": {"file_name": "raw/link.jsonl"}}))
    assert "outside dataset_dir" in errors(r)[0]
    write_registry(r, json.dumps({"demo": {"file_name": str(outside)}}))  # absolute: the user said so
    (spec,) = resolve_datasets(data_args(r))
    assert spec.files == (outside,)


def test_symlink_inside_a_folder_is_refused(r, tmp_path):
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("text")
    folder = os.path.join(r["dataset_dir"], "corpus")
    os.makedirs(folder)
    with open(os.path.join(folder, "a.txt"), "w") as handle:
        handle.write("fine")
    os.symlink(outside, os.path.join(folder, "b.txt"))
    write_registry(r, json.dumps({"demo": {"file_name": "corpus", "formatting": "text"}}))
    r["stage"] = "pt"
    assert "corpus/b.txt (in folder 'corpus') resolves to" in errors(r)[0]


def test_rules_beyond_the_schema(r):
    path = write_registry(r, json.dumps({
        "demo": {"file_name": "raw/a.jsonl", "columns": {"messages": "conv"}, "tags": {"role_tag": "role"}},
        "corpus": {"file_name": "raw/a.jsonl", "formatting": "text"},
        "pref": {"file_name": "raw/a.jsonl", "ranking": True},
        "weird": {"file_name": "raw/b.csv", "formatting": "text"},
    }, indent=1))
    r["dataset"] = ["demo", "corpus", "pref"]
    messages = errors(r)
    assert f"{path}:5: \"demo\".columns.messages: column 'messages' does not apply to formatting 'alpaca'" \
        in messages[0]
    assert "\"demo\".tags: tags apply only to formatting 'sharegpt'" in messages[1]
    assert "\"corpus\".formatting: is 'text' (a pretraining corpus) but the recipe's stage is sft" in messages[2]
    assert "\"pref\".ranking: preference data (ranking: true: chosen/rejected answers) trains with stage: dpo, " \
           "but the recipe's stage is sft" in messages[3]


def test_unsupported_extension(r):
    write_registry(r, json.dumps({"demo": {"file_name": "raw/b.csv", "formatting": "text"}}))
    r["stage"] = "pt"
    (spec,) = resolve_datasets(data_args(r))  # a corpus in a table: its text column
    assert spec.columns == {"text": "text"}
    open(os.path.join(r["dataset_dir"], "raw", "c.xlsx"), "w").close()
    write_registry(r, json.dumps({"demo": {"file_name": "raw/c.xlsx"}}))
    assert "unsupported file type '.xlsx'" in errors(r)[0]


def test_source_paths(r):
    write_registry(r, json.dumps({"demo": {"file_name": "raw/a.jsonl"}, "other": {"file_name": "raw"}}))
    r["eval_dataset"] = ["other"]
    paths = [p.name for p in source_paths(data_args(r))]
    assert paths == ["dataset_info.json", "a.jsonl", "b.csv"]


def test_folder_never_reads_the_registry_or_the_build(make_recipe):
    from data_helpers import alpaca_rows, jsonl
    from pipeline.data.build import build

    r = make_recipe({"all": {"file_name": "."}}, files={"raw/a.jsonl": jsonl(alpaca_rows(20))}, dataset=["all"])
    build(data_args(r))
    (spec,) = resolve_datasets(data_args(r))
    assert [p.name for p in spec.files] == ["a.jsonl"]
