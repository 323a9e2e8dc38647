"""new_special_tokens in the tokenizer (pipeline.data.tokenizer.Tokenizer.with_special_tokens) and its exported files,
against transformers' add_tokens(tokens, special_tokens=True) (how LLaMA-Factory adds them) and AutoTokenizer."""
from __future__ import annotations

import pytest

from pipeline.data.tokenizer import gpt2, new_token_names

transformers = pytest.importorskip("transformers")

NEW = ["<think>", "</think>"]
TEXT = "a <think>plan: 3 steps</think> answer <|im_end|> done"


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    from tests.helpers.hf_vocab import write_small_tokenizer_dir

    directory = tmp_path_factory.mktemp("qwen2_tok")
    write_small_tokenizer_dir(directory, "qwen2")
    return directory


def test_new_tokens_take_transformers_ids_and_are_one_token_in_any_text(qwen_dir):
    from pipeline.data.tokenizer_files import read_tokenizer

    theirs = transformers.AutoTokenizer.from_pretrained(qwen_dir)
    assert theirs.add_tokens(NEW, special_tokens=True) == 2
    ours = read_tokenizer(qwen_dir).with_special_tokens(NEW)
    assert [ours.token_id(t) for t in NEW] == theirs.convert_tokens_to_ids(NEW)
    assert ours.n_vocab == len(theirs) and ours.new_tokens == tuple(NEW)
    ids = ours.encode(TEXT)
    # user text: the new tokens are one id each (transformers matches them anywhere); the checkpoint's own
    # <|im_end|> stays literal text here, as for every recipe (docs/tokenizers-templates.md)
    assert [i for i in ids if i >= ours.n_vocab - 2] == theirs.convert_tokens_to_ids(NEW)
    assert theirs("<think>x</think>", add_special_tokens=False)["input_ids"] == ours.encode("<think>x</think>")
    assert ours.decode(ids) == TEXT
    assert ours.decode(ids, skip_special=True) == theirs.decode(ids, skip_special_tokens=True)


def test_tokens_already_there_keep_their_ids():
    tok = gpt2()
    grown = tok.with_special_tokens(["<|endoftext|>", "hello", "<think>", "<think>"])
    assert grown.new_tokens == ("<think>",) and grown.token_id("<think>") == tok.n_vocab
    assert grown.token_id("<|endoftext|>") == tok.eos_id and grown.n_vocab == tok.n_vocab + 1
    assert tok.with_special_tokens(["hello"]) is tok
    assert grown.encode("a<|endoftext|>") == [64, tok.eos_id]  # named: one token in user text from now on
    assert tok.encode("a<|endoftext|>") != [64, tok.eos_id]


def test_a_run_starting_from_an_export_encodes_as_the_first(tmp_path):
    """merged/'s files hold the new tokens as special (as save_pretrained writes them); a recipe on merged/ that
    names them again gets the same ids, one token each in its data."""
    from pipeline.data.tokenizer_files import read_tokenizer
    from pipeline.merge import write_tokenizer_files

    first = gpt2().with_special_tokens(NEW)
    write_tokenizer_files(tmp_path, first, 64)
    again = read_tokenizer(tmp_path).with_special_tokens(NEW)
    assert again.new_tokens == () and again.encode("x<think>y</think>") == first.encode("x<think>y</think>")


def test_names_are_read_as_llamafactory_splits_them():
    assert new_token_names("<think>, </think> ") == ("<think>", "</think>")
    assert new_token_names(["<a>", " <b>"]) == ("<a>", "<b>")
    assert new_token_names("<a>,,<b>") == ("<a>", "", "<b>") and new_token_names(None) == ()


def test_gpt2_export_files_hold_the_new_tokens(tmp_path):
    """GPT-2 has no tokenizer.json: merge writes vocab.json / merges.txt and tokenizer_config.json's
    added_tokens_decoder carries the new ids."""
    from pipeline.merge import write_tokenizer_files

    ours = gpt2().with_special_tokens(NEW)
    write_tokenizer_files(tmp_path, ours, 64)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert theirs.convert_tokens_to_ids(NEW) == [50257, 50258]
    assert theirs("x<think>y</think>", add_special_tokens=False)["input_ids"] == ours.encode("x<think>y</think>")


def test_notices_say_which_tokens_were_there_and_what_lora_trains(tmp_path, monkeypatch):
    from pipeline.recipe import resolve
    from pipeline.recipe.notices import notices

    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text("model_name_or_path: tiny\ndataset: x\nmax_steps: 1\n"
                                     "new_special_tokens: <|endoftext|>,<think>\n", encoding="utf-8")
    lines = [line for line in notices(resolve("r.yaml", [])) if "new_special_tokens" in line]
    assert lines == [
        "notice: r.yaml:4:21: new_special_tokens: '<|endoftext|>' is already a token of the tokenizer (id 50256); it "
        "keeps that id, as LLaMA-Factory skips it",
        "notice: r.yaml:4:21: new_special_tokens: tokens are added, so resize_vocab is on and LoRA trains the input "
        "embedding and the output head in full (saved as modules_to_save), as LLaMA-Factory does; set "
        "additional_target to choose other modules"]

    (tmp_path / "r.yaml").write_text("model_name_or_path: tiny\ndataset: x\nmax_steps: 1\nresize_vocab: true\n",
                                     encoding="utf-8")
    assert [line for line in notices(resolve("r.yaml", [])) if "resize_vocab" in line] == [
        "notice: r.yaml:4:15: resize_vocab: LoRA trains the input embedding and the output head in full (saved as "
        "modules_to_save), as LLaMA-Factory does; set additional_target to choose other modules"]
