"""split_special_tokens (LLaMA-Factory's key): how user text is encoded with it and without it, against transformers'
AutoTokenizer(..., split_special_tokens=...) on the same tokenizer files (the real Llama 3 and Qwen3 vocabularies);
and the data-check warning's choice of tokens and rows (pipeline.data.markup)."""
from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

# Each family: text with markup only (literal here by default), and text with the other added tokens, special
# (Llama 3's reserved ones, Qwen's <|vision_start|>) and not special (Qwen3's <think>, <tool_call>)
TEXTS = {
    "llama3": ("a <|eot_id|><|start_header_id|>user<|end_header_id|>\n\nb<|begin_of_text|>",
               "x <|reserved_special_token_7|> y<|python_tag|>z"),
    "qwen3": ("a <|im_end|>\n<|im_start|>user\nb<|endoftext|>",
              "x <think>plan</think> <tool_call>{}</tool_call> <|vision_start|>y"),
}


@pytest.fixture(scope="module", params=sorted(TEXTS))
def family(request, tmp_path_factory):
    from tests.helpers.hf_vocab import write_tokenizer_dir

    directory = write_tokenizer_dir(tmp_path_factory.mktemp(request.param), request.param)
    return request.param, directory


def _theirs(directory, split: bool, plain=(), special=()):
    tok = transformers.AutoTokenizer.from_pretrained(directory, split_special_tokens=split)
    tok.add_tokens(list(plain))  # LLaMA-Factory's order: add_tokens, then the special ones
    tok.add_tokens(list(special), special_tokens=True)
    return lambda text: tok(text, add_special_tokens=False)["input_ids"]


def _tokenizer(directory, **keys):
    from pipeline.data.model_tokenizer import with_new_tokens
    from pipeline.data.tokenizer_files import read_tokenizer

    return with_new_tokens(read_tokenizer(directory), keys)


def _ours(directory, **keys):
    return _tokenizer(directory, **keys).encode


def test_true_encodes_every_special_token_in_text_as_transformers_splits_it(family):
    name, directory = family
    theirs, ours = _theirs(directory, True), _ours(directory, split_special_tokens=True)
    for text in TEXTS[name]:
        assert ours(text) == theirs(text), text


def test_false_makes_the_other_added_tokens_one_token_and_keeps_markup_literal(family):
    """LLaMA-Factory's default: transformers makes every added token one token; here the markup alone stays text,
    encoded as transformers encodes it with split_special_tokens=True (the difference the notice names)."""
    name, directory = family
    markup, other = TEXTS[name]
    ours = _ours(directory, split_special_tokens=False)
    assert ours(other) == _theirs(directory, False)(other)
    assert ours(markup) == _theirs(directory, True)(markup) != _theirs(directory, False)(markup)


def test_the_recipe_s_special_tokens_split_too_its_plain_ones_stay_one_token(tmp_path):
    from tests.helpers.hf_vocab import write_small_tokenizer_dir

    write_small_tokenizer_dir(tmp_path, "qwen3")
    text = "a <note> b <tag> c <think>"
    theirs = _theirs(tmp_path, True, plain=["<note>"], special=["<tag>"])
    ours = _ours(tmp_path, split_special_tokens=True, add_tokens="<note>", add_special_tokens="<tag>")
    assert ours(text) == theirs(text)
    assert ours(text) != _ours(tmp_path, add_tokens="<note>", add_special_tokens="<tag>")(text)


def test_the_warning_names_the_tokens_that_differ_from_llamafactory_and_the_first_row():
    """Default: the markup (literal here, one token there); split_special_tokens true: none (the special tokens are
    literal in both), only a markup token that is not special would differ. The first row by raw file line."""
    from pipeline.data.markup import differing_tokens, typed_markup_warnings
    from pipeline.data.origins import Origin
    from pipeline.data.tokenizer import gpt2

    tok = gpt2()
    assert differing_tokens(tok, False) == {"<|endoftext|>"} and differing_tokens(tok, True) == frozenset()
    rows = [{"instruction": "q", "output": "a"}, {"instruction": "q", "output": "a <|endoftext|>"},
            {"instruction": "q", "output": "a", "history": [["h <|endoftext|>", "r"]], "roles": ["<|endoftext|>"]}]
    origins = [Origin("raw/a.jsonl", 3, "a"), Origin("raw/a.jsonl", 9, "a"), Origin("raw/a.jsonl", 4, "a")]
    assert typed_markup_warnings(tok, False, [("a", rows, origins)]) == [
        "warning: raw/a.jsonl:4 (dataset 'a'): history[0][0] types '<|endoftext|>', which stays literal text here "
        "(split into ordinary tokens, so that data cannot forge a turn); LLaMA-Factory makes it one token (id 50256) "
        "(2 rows alike; this is the first)"]
    assert typed_markup_warnings(tok, True, [("a", rows, origins)]) == []


def test_the_exports_tokenizer_config_says_it_as_save_pretrained_writes_it(tmp_path):
    """merged/ and export_dir (write_tokenizer_files), model/ and adapter/ (copy_tokenizer_files) write the recipe's
    split_special_tokens where transformers' save_pretrained of a tokenizer loaded with that keyword writes it; a
    base's true that the recipe turned off is written false; a file that never said it is left without it.
    Golden: the tokenizer_config.json of AutoTokenizer.from_pretrained(..., split_special_tokens=...).save_pretrained."""
    import json

    from pipeline.merge import write_tokenizer_files
    from pipeline.train.export import copy_tokenizer_files
    from tests.helpers.hf_vocab import write_small_tokenizer_dir

    def saved(directory):
        return json.loads((directory / "tokenizer_config.json").read_text()).get("split_special_tokens", "absent")

    def theirs(source, split):
        out = tmp_path / f"theirs-{source.name}-{split}"
        transformers.AutoTokenizer.from_pretrained(source, split_special_tokens=split).save_pretrained(out)
        return out

    base = tmp_path / "base"
    write_small_tokenizer_dir(base, "qwen3")
    split_base = theirs(base, True)  # a LLaMA-Factory export of a run with the key: it says true
    for source, split in ((base, True), (split_base, False)):
        ours = [tmp_path / f"{kind}-{source.name}-{split}" for kind in ("merged", "model")]
        ours[0].mkdir()
        write_tokenizer_files(ours[0], _tokenizer(source, split_special_tokens=split), 128)
        copy_tokenizer_files(source, ours[1], split_special_tokens=split)
        for directory in ours:
            assert saved(directory) == saved(theirs(source, split)) == split, directory
            assert transformers.AutoTokenizer.from_pretrained(directory).split_special_tokens is split
    untouched = tmp_path / "untouched"
    untouched.mkdir()
    write_tokenizer_files(untouched, _tokenizer(base), 128)
    assert saved(untouched) == saved(base) == "absent"
