"""split_special_tokens through the CLI, as a user ports a LLaMA-Factory project: a transformers save_pretrained
Qwen3 checkpoint, Alpaca rows in a dataset_info.json registry, one answer typing "<|im_end|>". Golden: the
<|im_end|> id from transformers' AutoTokenizer on the checkpoint (the one token LLaMA-Factory would train there).
The encodings themselves against transformers: tests/data/test_split_special_tokens.py."""
from __future__ import annotations

import json

from tests.acceptance.harness import write_hf_checkpoint, write_recipe
from tests.reliability.rel_helpers import run_main
from tests.train.helpers import sft_rows


def _project(tmp_path):
    base = tmp_path / "qwen3"
    write_hf_checkpoint(base, "qwen3", small_vocab=True, num_hidden_layers=1)
    rows = sft_rows(10)
    rows[2]["output"] += " <|im_end|>"  # raw line 3
    rows[6]["input"] = "say <|im_end|><|im_start|>system"  # line 7
    raw = tmp_path / "data" / "raw" / "chat.jsonl"
    raw.parent.mkdir(parents=True)
    raw.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps({"chat": {"file_name": "raw/chat.jsonl"}}))
    return base


def test_markup_typed_in_an_answer_is_warned_about_once_per_dataset_unless_split_special_tokens(tmp_path):
    import transformers

    base = _project(tmp_path)
    im_end = transformers.AutoTokenizer.from_pretrained(base).convert_tokens_to_ids("<|im_end|>")
    said = {}
    for split in (False, True):
        recipe = write_recipe(tmp_path / f"r{split}.yaml", model_name_or_path=str(base), template="qwen",
                              dataset="chat", dataset_dir="data", cutoff_len=128, val_size=0.2,
                              output_dir=f"saves/{split}", split_special_tokens=split)
        line = recipe.read_text().splitlines().index(f"split_special_tokens: {json.dumps(split)}") + 1
        assert run_main(["build", str(recipe)], tmp_path).code == 0
        for command in ("validate", "inspect"):
            done = run_main([command, str(recipe)], tmp_path)
            assert done.code == 0, done.err
            said[split, command] = done.err
        notices = [n for n in said[split, "validate"].splitlines() if "split_special_tokens: false: " in n]
        assert [n.startswith(f"notice: {recipe}:{line}:") for n in notices] == ([] if split else [True]), notices
    for command in ("validate", "inspect"):
        warnings = [w for w in said[False, command].splitlines() if w.startswith("warning:")]
        assert warnings == [
            f"warning: data/raw/chat.jsonl:3 (dataset 'chat'): output types '<|im_end|>', which stays literal text "
            f"here (split into ordinary tokens, so that data cannot forge a turn); LLaMA-Factory makes it one token "
            f"(id {im_end}) (2 rows alike; this is the first)"], said[False, command]
        assert "warning:" not in said[True, command]  # literal in LLaMA-Factory too: nothing differs



def test_merged_says_split_special_tokens_to_transformers_and_to_a_recipe_on_it(tmp_path, monkeypatch):
    """A transformers-written tiny Llama (its template's markup as special tokens), a recipe adding a special <tool>
    with split_special_tokens: true, one step, merged: AutoTokenizer on merged/ (and on adapter/), given no keyword,
    encodes typed special tokens as the pipeline trained on them; the file said nothing, so transformers made each
    one token. A recipe on merged/ without the key reads the same ids (plan: derived); one writing false wins, with
    a notice naming the file. Golden: transformers' AutoTokenizer(base, split_special_tokens=True) with <tool> added
    as LLaMA-Factory adds it, and convert_tokens_to_ids('<tool>') for the one-token reading."""
    import transformers

    from pipeline.data.model_tokenizer import recipe_tokenizer
    from pipeline.recipe import resolve
    from pipeline.recipe.args import data_args
    from tests.acceptance.harness import write_data

    base = tmp_path / "llama"
    write_hf_checkpoint(base, "llama", small_vocab=True, num_hidden_layers=1)
    write_data(tmp_path / "data", n_sft=8)
    keys = dict(template="llama3", dataset_dir="data", cutoff_len=128)
    recipe = write_recipe(tmp_path / "split.yaml", model_name_or_path=str(base), add_special_tokens="<tool>",
                          split_special_tokens=True, max_steps=1, output_dir="saves/split", **keys)
    for command in ("build", "train", "merge"):
        done = run_main([command, str(recipe)], tmp_path)
        assert done.code == 0, (command, done.err)
    golden = transformers.AutoTokenizer.from_pretrained(base, split_special_tokens=True)
    golden.add_tokens(["<tool>"], special_tokens=True)
    text = "a <tool> b<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nc<|begin_of_text|>"
    ids = golden(text, add_special_tokens=False)["input_ids"]
    monkeypatch.chdir(tmp_path)

    def ours(path):
        return recipe_tokenizer(data_args(resolve(str(path), command="plan"))).encode(text)

    assert ours(recipe) == ids
    for export in ("merged", "adapter"):
        theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "saves/split" / export)
        assert theirs(text, add_special_tokens=False)["input_ids"] == ids, export

    merged = tmp_path / "saves/split/merged"
    on_merged = {name: write_recipe(tmp_path / f"{name}.yaml", model_name_or_path=str(merged),
                                    split_special_tokens=value, output_dir=f"saves/{name}", **keys)
                 for name, value in (("unset", None), ("true", True), ("false", False))}
    assert ours(on_merged["unset"]) == ours(on_merged["true"]) == ids
    assert golden.convert_tokens_to_ids("<tool>") in ours(on_merged["false"])  # the recipe's false wins
    plan = {name: run_main(["plan", str(on_merged[name])], tmp_path) for name in ("unset", "false")}
    assert [line.split() for line in plan["unset"].out.splitlines() if "split_special_tokens" in line] == [
        ["split_special_tokens", "true", "derived"]]
    assert " overrides " not in plan["unset"].err
    line = on_merged["false"].read_text().splitlines().index("split_special_tokens: false") + 1
    [notice] = [n for n in plan["false"].err.splitlines() if " overrides " in n]
    assert notice.startswith(f"notice: {tmp_path / 'false.yaml'}:{line}:") and (
        f" split_special_tokens: false overrides {merged / 'tokenizer_config.json'}'s split_special_tokens: true, as "
        "transformers' from_pretrained(split_special_tokens=False) does") in notice, notice
