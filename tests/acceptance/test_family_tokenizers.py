"""Where a Llama / Qwen recipe's tokenizer comes from, through the CLI.

- a chained recipe (its model is an upstream recipe's output_dir/merged, not trained yet) is checked with the
  root checkpoint's tokenizer: `validate` before the upstream ran gives the upstream's Llama token statistics;
- a Llama / Qwen preset (shapes, no vocabulary) is refused with one exit-2 message saying to add
  tokenizer_name_or_path, and with it takes the tokenizer it names; a tokenizer with more ids than the model's
  embedding table is refused;
- pt documents are joined as LLaMA-Factory joins them: the checkpoint's eos_token (an Instruct checkpoint's
  <|eot_id|>), <|end_of_text|> with the llama3 template; tokenizer_name_or_path pointing at the base
  checkpoint's tokenizer files chooses its eos_token.

build and validate (a success and a refusal of each), train and generate run as typed; the further builds and
validates run main(argv) in this process (as_typed=False: the same code and messages, no interpreter start).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.acceptance.harness import cli_env, pipeline, write_data, write_recipe

DOCS = ["The red river runs to the sea.", "Blue hills stand over the green valley.", "A small boat sails home.",
        "Rain falls on the old town.", "The bright moon rises late.", "Wind moves the tall grass."]


@pytest.fixture(scope="module")
def work(tmp_path_factory, hf_checkpoint) -> Path:
    """data/ (the harness's sources + `docs`, six pt documents in JSON Lines) and recipes/ next to a Llama 3
    checkpoint with Llama-3.2-1B-Instruct's tokenizer files (eos_token <|eot_id|>)."""
    root = tmp_path_factory.mktemp("family_tokenizers")
    write_data(root / "data")
    (root / "data" / "raw" / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    registry = json.loads((root / "data" / "dataset_info.json").read_text())
    registry["docs"] = {"file_name": "raw/docs.jsonl", "formatting": "text"}
    (root / "data" / "dataset_info.json").write_text(json.dumps(registry))
    (root / "recipes").mkdir()
    (root / "llama").symlink_to(hf_checkpoint("llama"))
    return root


def table(validated: str) -> list[str]:
    """The token-statistics lines of `validate`'s output."""
    lines = validated.splitlines()
    return lines[lines.index("data: OK") + 1:]


def test_a_chained_recipe_is_checked_with_its_roots_tokenizer(work):
    up = write_recipe(work / "recipes" / "up.yaml", model_name_or_path=str(work / "llama"), dataset_dir="data",
                      template="llama3", output_dir="saves/up")
    down = write_recipe(work / "recipes" / "down.yaml", model_name_or_path="saves/up/merged", dataset_dir="data",
                        template="llama3", output_dir="saves/down")
    pipeline("build", down, cwd=work)
    expected = table(pipeline("validate", up, cwd=work).stdout)
    assert len(expected) == 3 and expected[1].split()[:3] == ["tiny_sft", "train", "21"]
    assert table(pipeline("validate", down, cwd=work, as_typed=False).stdout) == expected  # GPT-2 would refuse llama3's markup
    assert not (work / "saves").exists()


def test_a_preset_without_a_vocabulary_says_what_to_add(work):
    recipe = write_recipe(work / "recipes" / "preset.yaml", model_name_or_path="llama-3.2-1b", dataset_dir="data",
                          template="llama3", output_dir="saves/preset")
    pipeline("build", recipe, cwd=work, as_typed=False)
    for command in ("validate", "train", "generate"):
        refused = pipeline(command, recipe, *(["--raw", "--prompt", "hi"] if command == "generate" else []),
                           cwd=work, expect=2)
        assert "preset 'llama-3.2-1b' has no tokenizer" in refused.stderr, refused.stderr
        assert "set tokenizer_name_or_path" in refused.stderr and "meta-llama/Llama-3.2-1B" in refused.stderr
        assert "Traceback" not in refused.stderr
    pt = write_recipe(work / "recipes" / "preset_pt.yaml", model_name_or_path="qwen3-0.6b", dataset_dir="data",
                      stage="pt", dataset="docs", template=None, output_dir="saves/preset_pt")
    refused = pipeline("build", pt, cwd=work, expect=2)  # pt counts tokens while building
    assert "set tokenizer_name_or_path" in refused.stderr and "Qwen/Qwen3-0.6B" in refused.stderr
    # in validate's words, at the key's file:line (failed before: build named the bare key, 'error: model_name_or_path:')
    said = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    validated = pipeline("validate", pt, cwd=work, expect=2, as_typed=False).stderr
    assert said == [line for line in validated.splitlines() if line.startswith("error:")] and len(said) == 1, said
    line = next(i for i, text in enumerate(pt.read_text("utf-8").splitlines(), 1) if text.startswith("model_name_or_path"))
    assert said[0].startswith(f"error: {pt}:{line}:21: model_name_or_path: preset 'qwen3-0.6b' has no tokenizer"), said
    assert not (work / "data" / "build" / "docs").exists()
    assert not (work / "saves").exists()


def test_a_preset_takes_the_tokenizer_it_names(work):
    named = write_recipe(work / "recipes" / "named.yaml", model_name_or_path="llama-3.2-1b", dataset_dir="data",
                         template="llama3", output_dir="saves/named", tokenizer_name_or_path=str(work / "llama"))
    checkpoint = write_recipe(work / "recipes" / "checkpoint.yaml", model_name_or_path=str(work / "llama"),
                              dataset_dir="data", template="llama3", output_dir="saves/checkpoint")
    pipeline("build", named, cwd=work, as_typed=False)
    assert table(pipeline("validate", named, cwd=work, as_typed=False).stdout) == table(
        pipeline("validate", checkpoint, cwd=work, as_typed=False).stdout)


def test_a_tokenizer_larger_than_the_model_is_refused(work):
    recipe = write_recipe(work / "recipes" / "too_big.yaml", model_name_or_path="tiny", dataset_dir="data",
                          template="alpaca", output_dir="saves/too_big", tokenizer_name_or_path=str(work / "llama"))
    refused = pipeline("validate", recipe, cwd=work, expect=2, as_typed=False)
    assert "tokenizer_name_or_path" in refused.stderr and "128,256 token ids, more than the 50,257 rows" \
        in refused.stderr, refused.stderr


def test_pt_documents_are_joined_as_llama_factory_joins_them(work, tmp_path):
    """Golden: LLaMA-Factory's rule (`"<|end_of_text|>" if template == "llama3" else tokenizer.eos_token`) with
    transformers' AutoTokenizer for the ids and the eos_token of the same files."""
    import os

    import transformers

    from pipeline.data.tokenize import pt_stream
    from pipeline.recipe import resolve
    from pipeline.recipe.args import data_args
    from tests.helpers.hf_vocab import write_tokenizer_dir

    base_tokenizer = write_tokenizer_dir(tmp_path / "llama_base_tokenizer", "llama3", instruct=False)
    recipe = write_recipe(work / "recipes" / "pt.yaml", model_name_or_path=str(work / "llama"), dataset_dir="data",
                          stage="pt", dataset="docs", template=None, val_size=0.34, output_dir="saves/pt")
    pipeline("build", recipe, cwd=work, as_typed=False)
    docs = [row["text"] for row in json.loads((work / "data/build/docs/train.json").read_text())]
    assert 2 <= len(docs) < len(DOCS)
    instruct = transformers.AutoTokenizer.from_pretrained(work / "llama")
    encoded = [instruct.encode(d, add_special_tokens=False) for d in docs]
    cases = [  # (overrides, the separator LLaMA-Factory appends)
        ([], instruct.eos_token),  # the default template (alpaca) replaces nothing: Instruct's <|eot_id|>
        (["template=llama3"], "<|end_of_text|>"),
        ([f"tokenizer_name_or_path={base_tokenizer}"],
         transformers.AutoTokenizer.from_pretrained(base_tokenizer).eos_token),  # the base's <|end_of_text|>
    ]
    here = Path.cwd()
    os.chdir(work)
    try:
        for overrides, separator in cases:
            eos = instruct.convert_tokens_to_ids(separator)
            expected = [t for i, ids in enumerate(encoded) for t in ids + ([eos] if i < len(encoded) - 1 else [])]
            r = resolve(recipe, overrides, command="train", env=cli_env(WORLD_SIZE="1"))
            assert pt_stream(data_args(r), "train").tolist() == expected, overrides
    finally:
        os.chdir(here)
    assert [c[1] for c in cases] == ["<|eot_id|>", "<|end_of_text|>", "<|end_of_text|>"]
