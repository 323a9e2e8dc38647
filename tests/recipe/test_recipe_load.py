"""The YAML loader: YAML 1.2 scalars, positions, and the traps PyYAML's defaults fall into."""
from __future__ import annotations

import math

import pytest
import yaml

from pipeline.errors import UserError
from pipeline.recipe.load import Origin, load_chain, parse_overrides, read_recipe_file
from pathlib import Path


def read(write, text: str | bytes, name: str = "r.yaml"):
    write(name, text)
    return read_recipe_file(Path(name), name)


def messages(excinfo) -> list[str]:
    return excinfo.value.messages


@pytest.mark.parametrize("text, expected", [
    ("5e-5", 5e-5), ("1e3", 1000.0), ("-1.5E+2", -150.0), (".5", 0.5), ("3.", 3.0),
    ("010", 10), ("0o17", 15), ("0x1f", 31), ("-7", -7),
    ("true", True), ("False", False), ("TRUE", True),
    ("yes", "yes"), ("no", "no"), ("on", "on"), ("off", "off"), ("y", "y"),
    ("~", None), ("null", None), ("", None),
    ("1:30", "1:30"), ("2024-01-01", "2024-01-01"), ("1_000", "1_000"), ("0b101", "0b101"),
    ("'5e-5'", "5e-5"), ('"true"', "true"), ("!!str 12", "12"), ("!!float 3", 3.0),
])
def test_scalars_follow_yaml_1_2(write, text, expected):
    entries = read(write, f"value: {text}\n")
    got = entries["value"].value
    assert got == expected and type(got) is type(expected)


def test_pyyaml_default_would_have_differed():
    # The traps this loader exists for, shown on PyYAML's own safe_load (YAML 1.1).
    assert yaml.safe_load("a: 5e-5")["a"] == "5e-5"
    assert yaml.safe_load("a: yes")["a"] is True
    assert yaml.safe_load("a: 010")["a"] == 8
    assert yaml.safe_load("a: 1:30")["a"] == 90


def test_infinity_and_nan_parse(write):
    entries = read(write, "a: .inf\nb: -.inf\nc: .nan\n")
    assert entries["a"].value == math.inf and entries["b"].value == -math.inf and math.isnan(entries["c"].value)


def test_positions_of_keys_and_values(write):
    entries = read(write, "# comment\nlearning_rate:   5e-5\n\nlora_target:\n  - c_attn\n  - c_fc\n")
    lr = entries["learning_rate"]
    assert (lr.key_origin.line, lr.key_origin.column) == (2, 1)
    assert (lr.origin.line, lr.origin.column) == (2, 18)
    assert lr.origin.provenance == "r.yaml:2"
    assert entries["lora_target"].value == ["c_attn", "c_fc"]
    assert entries["lora_target"].origin.line == 5


def test_nested_values_and_flow_lists(write):
    entries = read(write, "a: [c_attn, c_fc]\nb: {x: 1}\n")
    assert entries["a"].value == ["c_attn", "c_fc"]
    assert entries["b"].value == {"x": 1}


def test_duplicate_keys_name_both_lines(write):
    with pytest.raises(UserError) as exc:
        read(write, "lora_rank: 8\nlearning_rate: 1e-4\nlora_rank: 16\n")
    assert messages(exc) == ["r.yaml:3:1: duplicate key 'lora_rank' (first set on line 1, again on line 3); keep one"]


def test_duplicate_keys_all_reported(write):
    with pytest.raises(UserError) as exc:
        read(write, "a: 1\nb: 2\na: 3\nb: 4\n")
    assert [m.split(":")[1] for m in messages(exc)] == ["3", "4"]


def test_duplicate_key_in_nested_mapping(write):
    with pytest.raises(UserError) as exc:
        read(write, "a: {x: 1, x: 2}\n")
    assert "duplicate key 'x'" in messages(exc)[0]


def test_tabs_reported_with_line(write):
    with pytest.raises(UserError) as exc:
        read(write, "model_name_or_path: tiny\nlora_rank:\t8\n\tdataset: x\nname: 'a\tb'\n")
    assert messages(exc) == [
        "r.yaml:2:11: tab character; YAML indents and separates with spaces, not tabs",
        "r.yaml:3:1: tab character; YAML indents and separates with spaces, not tabs",
    ]


def test_python_tags_refused(write):
    with pytest.raises(UserError) as exc:
        read(write, "model_name_or_path: !!python/object/apply:os.system ['echo hi']\n")
    (msg,) = messages(exc)
    assert msg.startswith("r.yaml:1:21: tag '!!python/object/apply:os.system' refused")
    assert "python tags could run code" in msg


def test_other_tags_refused(write):
    with pytest.raises(UserError) as exc:
        read(write, "a: !!binary aGVsbG8=\nb: !custom x\n")
    assert [m.split(": ", 1)[0] for m in messages(exc)] == ["r.yaml:1:4", "r.yaml:2:4"]
    assert all("unsupported tag" in m for m in messages(exc))


def test_explicit_int_tag_on_non_number(write):
    with pytest.raises(UserError) as exc:
        read(write, "a: !!int abc\n")
    assert messages(exc) == ["r.yaml:1:4: cannot read 'abc' as !!int"]


def test_utf8_bom_is_accepted(write):
    entries = read(write, b"\xef\xbb\xbfmodel_name_or_path: tiny\n")
    assert entries["model_name_or_path"].value == "tiny"
    assert entries["model_name_or_path"].key_origin.column == 1


def test_utf16_file_is_refused(write):
    with pytest.raises(UserError) as exc:
        read(write, "model_name_or_path: tiny\n".encode("utf-16"))
    assert messages(exc) == ["r.yaml:1:1: the file is UTF-16 encoded (it starts with a UTF-16 byte order mark); "
                             "save it as UTF-8"]


def test_non_utf8_names_line_and_column(write):
    with pytest.raises(UserError) as exc:
        read(write, b"a: 1\nb: caf\xe9\n")
    assert messages(exc) == ["r.yaml:2:7: the file is not UTF-8 (byte 0xe9); save it as UTF-8"]


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_file(write, text):
    with pytest.raises(UserError) as exc:
        read(write, text)
    assert messages(exc)[0].startswith("r.yaml:1:1: the recipe is empty")


def test_list_at_top_level(write):
    with pytest.raises(UserError) as exc:
        read(write, "- model_name_or_path: tiny\n")
    assert messages(exc) == ["r.yaml:1:1: the recipe must be a mapping of 'key: value' lines, found a list"]


@pytest.mark.parametrize("text, problem", [
    ("!!python/object:foo.Bar\nstage: sft\n", "tag '!!python/object:foo.Bar' refused: a recipe is plain data, python "
                                             "tags could run code"),
    ('!!python/object/apply:os.system ["echo hi"]\n', "tag '!!python/object/apply:os.system' refused: a recipe is "
                                                      "plain data, python tags could run code"),
    ("!!set\n? stage\n", "unsupported tag '!!set' on the recipe"),
    ("!custom\nstage: sft\n", "unsupported tag '!custom' on the recipe"),
])
def test_a_tag_on_the_whole_recipe(write, text, problem):
    """Refused as a tag one level down is (it said "found a list", or showed PyYAML's node objects)."""
    with pytest.raises(UserError) as exc:
        read(write, text)
    assert messages(exc) == [f"r.yaml:1:1: {problem}; remove the tag (the recipe is a mapping of 'key: value' lines)"]


def test_scalar_at_top_level(write):
    with pytest.raises(UserError) as exc:
        read(write, "just some words\n")
    assert "found the single value 'just some words'" in messages(exc)[0]


def test_two_documents(write):
    with pytest.raises(UserError) as exc:
        read(write, "a: 1\n---\nb: 2\n")
    assert messages(exc)[0].startswith("r.yaml:2:1: invalid YAML: but found another document")


def test_broken_yaml_points_at_the_problem(write):
    with pytest.raises(UserError) as exc:
        read(write, "a: 1\nlora_target: [c_attn, c_fc\nb: 2\n")
    (msg,) = messages(exc)
    assert msg.startswith("r.yaml:3:2: invalid YAML:")
    assert "line 2" in msg  # where the unclosed list began


def test_non_string_keys(write):
    with pytest.raises(UserError) as exc:
        read(write, "1: a\n? [x]\n: b\n")
    assert [m.split(": ", 1)[0] for m in messages(exc)] == ["r.yaml:1:1", "r.yaml:2:3"]
    assert "is not a name" in messages(exc)[0]


def test_yaml_1_1_boolean_keys_stay_strings(write):
    assert list(read(write, "on: 1\nyes: 2\n")) == ["on", "yes"]


def test_alias_bomb_is_stopped(write):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 8):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    with pytest.raises(UserError) as exc:
        read(write, "\n".join(lines) + "\n")
    assert "too large or too deeply nested" in messages(exc)[0]


def test_recursive_anchor_is_stopped(write):
    with pytest.raises(UserError) as exc:
        read(write, "a: &x [*x]\n")
    assert "too large or too deeply nested" in messages(exc)[0]


# --- overrides -------------------------------------------------------------------------------------

def test_overrides_parse_as_yaml():
    out = parse_overrides(["learning_rate=5e-5", "lora_target=[c_attn,c_fc]", "bf16=true", "output_dir=",
                           "template=alpaca", "stop_strings=['###', 'x=y']", "dataset=a,b"])
    assert out["learning_rate"].value == 5e-5
    assert out["lora_target"].value == ["c_attn", "c_fc"]
    assert out["bf16"].value is True
    assert out["output_dir"].value is None
    assert out["stop_strings"].value == ["###", "x=y"]
    assert out["dataset"].value == "a,b"
    assert out["learning_rate"].origin == Origin("cli", text="learning_rate=5e-5")
    assert out["learning_rate"].origin.provenance == "cli"


def test_override_last_one_wins():
    assert parse_overrides(["lora_rank=4", "lora_rank=16"])["lora_rank"].value == 16


@pytest.mark.parametrize("text, expected", [
    ("learning_rate", "command line override 'learning_rate': expected key=value"),
    ("=5", "command line override '=5': expected key=value"),
    ("lora rank=4", "command line override 'lora rank=4': expected key=value"),
    ("lora_target=[c_attn", "command line override lora_target=[c_attn: the value is not valid YAML"),
    ("seed=!!python/name:os.system", "command line override seed=!!python/name:os.system: tag "
                                     "'!!python/name:os.system' refused"),
    ("extends=base.yaml", "command line override extends=base.yaml: extends cannot be set on the command line"),
])
def test_bad_override_syntax_names_the_override(text, expected):
    with pytest.raises(UserError) as exc:
        parse_overrides(["seed=1", text])
    (msg,) = messages(exc)
    assert msg.startswith(expected)


# --- extends -------------------------------------------------------------------------------------

def test_extends_chain_layers_in_merge_order(write):
    write("recipes/base.yaml", "a: 1\n")
    write("recipes/mid.yaml", "extends: base.yaml\nb: 2\n")
    write("recipes/top.yaml", "extends: mid.yaml\nc: 3\n")
    chain = load_chain("recipes/top.yaml")
    assert chain.files == ["recipes/top.yaml", "recipes/mid.yaml", "recipes/base.yaml"]
    assert [sorted(layer) for layer in chain.layers] == [["a"], ["b", "extends"], ["c", "extends"]]
    assert chain.layers[0]["a"].origin.provenance == "recipes/base.yaml:1"


def test_extends_relative_to_the_recipe_folder(write):
    write("shared/common.yaml", "a: 1\n")
    write("recipes/x.yaml", "extends: ../shared/common.yaml\n")
    assert load_chain("recipes/x.yaml").files == ["recipes/x.yaml", "shared/common.yaml"]
