"""new_special_tokens in the tokenizer (pipeline.data.tokenizer.Tokenizer.with_special_tokens) and its exported files,
against transformers' add_tokens(tokens, special_tokens=True) (how LLaMA-Factory adds them) and AutoTokenizer."""
from __future__ import annotations

import json

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


def test_ids_past_the_vocabulary_decode_to_nothing_as_in_transformers(qwen_dir):
    """A grown embedding's padding rows (and Qwen's spare ones) have no token; a model may still generate them."""
    from pipeline.data.tokenizer_files import read_tokenizer

    theirs = transformers.AutoTokenizer.from_pretrained(qwen_dir)
    theirs.add_tokens(NEW, special_tokens=True)
    ours = read_tokenizer(qwen_dir).with_special_tokens(NEW)
    ids = [*ours.encode("a <think>b"), len(theirs), len(theirs) + 40, *ours.encode(" c")]
    for skip in (False, True):
        assert ours.decode(ids, skip_special=skip) == theirs.decode(ids, skip_special_tokens=skip)


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

    # a reward model has a score head in place of the output head (model.config.vocab_modules)
    (tmp_path / "r.yaml").write_text("model_name_or_path: tiny\ndataset: x\nmax_steps: 1\nstage: rm\n"
                                     "add_tokens: <think>\n", encoding="utf-8")
    assert [line for line in notices(resolve("r.yaml", [])) if "add_tokens" in line] == [
        "notice: r.yaml:5:13: add_tokens: tokens are added, so resize_vocab is on and LoRA trains the input embedding "
        "and the score head in full (saved as modules_to_save), as LLaMA-Factory does; set additional_target to "
        "choose other modules"]


def test_add_tokens_are_plain_added_tokens_as_transformers_adds_them(qwen_dir, tmp_path):
    """add_tokens then the special ones, as LLaMA-Factory's patch_tokenizer calls add_tokens(special_tokens=False)
    then add_tokens(special_tokens=True): ids, encodings and decoding match transformers' tokenizer, the plain token
    survives skip_special_tokens, and an export's files give AutoTokenizer the same tokenizer (plain: normalized,
    not special, as save_pretrained writes it)."""
    from pipeline.data.added_tokens import TokenNames
    from pipeline.data.tokenizer_files import read_tokenizer
    from pipeline.train.export import copy_tokenizer_files

    plain = ["<note>", "two words"]
    theirs = transformers.AutoTokenizer.from_pretrained(qwen_dir)
    assert theirs.add_tokens(plain, special_tokens=False) == 2 and theirs.add_tokens(NEW, special_tokens=True) == 2
    ours = read_tokenizer(qwen_dir).with_tokens(plain, NEW)
    assert [ours.token_id(t) for t in plain + NEW] == theirs.convert_tokens_to_ids(plain + NEW)
    text = "a<note>b two words <think>c</think>d"
    ids = ours.encode(text)
    assert ids == theirs(text, add_special_tokens=False)["input_ids"]
    for skip in (False, True):
        assert ours.decode(ids, skip_special=skip) == theirs.decode(ids, skip_special_tokens=skip)
    assert "<note>" in ours.decode(ids, skip_special=True) and "<think>" not in ours.decode(ids, skip_special=True)

    copy_tokenizer_files(qwen_dir, tmp_path, TokenNames(tuple(plain), tuple(NEW)))
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert exported.convert_tokens_to_ids(plain + NEW) == theirs.convert_tokens_to_ids(plain + NEW)
    assert exported.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    written = {e["content"]: e for e in json.loads((tmp_path / "tokenizer.json").read_text())["added_tokens"]}
    assert [(written[t]["special"], written[t]["normalized"]) for t in plain + NEW] == [(False, True)] * 2 + [(True, False)] * 2
    again = read_tokenizer(tmp_path).with_tokens(plain, NEW)  # a run from the export names the same tokens
    assert again.new_tokens == () and again.encode(text) == ids


def test_new_special_tokens_config_errors_name_the_file_and_line(tmp_path):
    from pipeline.data.added_tokens import TokenNames, read_descriptions
    from pipeline.errors import UserError

    path = tmp_path / "tokens.yaml"
    path.write_text('"<a>": the first\n"<b>": the second\n', encoding="utf-8")
    names = TokenNames.of({"new_special_tokens_config": str(path), "add_special_tokens": "<c>", "add_tokens": "<p>"})
    assert (names.plain, names.special, dict(names.descriptions)) == (
        ("<p>",), ("<a>", "<b>"), {"<a>": "the first", "<b>": "the second"})
    for text, expected in (("- <a>\n", ":1:1: expected a mapping of token: description lines"),
                           ('"<a>": x\n"": y\n', ':2: token \'\': expected the token\'s text'),
                           ('"<a>": x\n"<b>": 3\n', ":2: <b>: description 3; expected text"),
                           ('"<a>": [x\n', ":2:1: invalid YAML")):
        path.write_text(text, encoding="utf-8")
        with pytest.raises(UserError) as err:
            read_descriptions(str(path))
        assert f"{path}{expected}" in str(err.value), str(err.value)
    with pytest.raises(UserError, match="not found"):
        read_descriptions(str(tmp_path / "missing.yaml"))


def test_notices_for_add_tokens_and_a_desc_init_without_descriptions(tmp_path, monkeypatch):
    """As LLaMA-Factory warns: desc_init without new_special_tokens_config is noise_init; a plain token already
    there keeps its id (said at add_tokens' line)."""
    from pipeline.recipe import resolve
    from pipeline.recipe.notices import notices

    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text("model_name_or_path: tiny\ndataset: x\nmax_steps: 1\nadd_tokens: hello,<p>\n"
                                     "init_special_tokens: desc_init\n", encoding="utf-8")
    lines = [line for line in notices(resolve("r.yaml", [])) if "tokens" in line]
    assert lines[:2] == [
        "notice: r.yaml:5:22: init_special_tokens: desc_init reads the descriptions of new_special_tokens_config, "
        "which is not set; the new rows are noise_init's, as LLaMA-Factory falls back",
        "notice: r.yaml:4:13: add_tokens: 'hello' is already a token of the tokenizer (id 31373); it keeps that id, "
        "as LLaMA-Factory skips it"], lines
    assert lines[2].startswith("notice: r.yaml:4:13: add_tokens: tokens are added, so resize_vocab is on"), lines


def test_a_checkpoint_saved_with_added_special_tokens_reads_them_as_transformers_does(qwen_dir, tmp_path):
    """transformers' save_pretrained after add_tokens(special_tokens=True) (what LLaMA-Factory's or our merged/
    holds): the tokens are one id in any text as AutoTokenizer reads the files, while the markup (<|im_end|>, EOS)
    stays literal in user text. Golden: transformers on the same saved files."""
    from pipeline.data.tokenizer_files import read_tokenizer

    theirs = transformers.AutoTokenizer.from_pretrained(qwen_dir)
    theirs.add_tokens(NEW, special_tokens=True)
    theirs.save_pretrained(tmp_path)
    ours = read_tokenizer(tmp_path)
    text = "a <think>plan</think> b"
    assert ours.encode(text) == transformers.AutoTokenizer.from_pretrained(tmp_path)(text, add_special_tokens=False)[
        "input_ids"]
    assert [i for i in ours.encode(text) if i in theirs.convert_tokens_to_ids(NEW)] == theirs.convert_tokens_to_ids(NEW)
    assert theirs.convert_tokens_to_ids("<|im_end|>") not in ours.encode("x <|im_end|> y")
    assert ours.decode(ours.encode(text), skip_special=True) == "a plan b"
