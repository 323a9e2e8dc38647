"""Sentencepiece-style tokenizers (Llama 2, Mistral v0.1 / v0.3) encode and decode as transformers' tokenizer
loaded from the same folder (AutoTokenizer: the golden), through pipeline.data.hf_encoding.

Real vocabularies (tests/helpers/sp_vocab.py: mistral-common's sentencepiece models, converted by transformers'
LlamaConverter) with the hub checkpoints' configs. The corpus covers what differs from byte-level BPE: the prefix
space of each separately encoded text, leading / double spaces, newlines, tabs, byte fallback for characters the
vocabulary lacks (emoji, rare CJK), digits, code, control tokens typed in text, the empty string.
"""
from __future__ import annotations

import pytest

from pipeline.data.model_tokenizer import load_tokenizer
from tests.helpers.sp_vocab import FAMILIES

CORPUS = ["", "Hello", " Hello", "  two  spaces ", "a\nb\n\nc\n", "\ttab\tend", "emoji 🦙🤗 end", "rare 龘 and 𠀀",
          "digits 12345 3.14159", "def f(x):\n    return x  # code\n", "héllo wörld, ünïcode", " ", "\n", "x" * 40,
          "Answer:", "Human: hi\nAssistant:"]
CONTROL = ["<s> and </s> here", "[INST] hi [/INST] ok", "A[INST]B[TOOL_CALLS]C", "<unk> unknown", "</s>"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_encode_and_decode_equal_transformers(family, sp_folders, sp_golden):
    hf, ours = sp_golden[family], load_tokenizer(sp_folders[family])
    assert ours.n_vocab == len(hf) == (32768 if family == "mistral_v3" else 32000)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, 2)  # no pad_token: the EOS pads (masked out)
    # LLaMA-Factory 0.9.5's pretrain processor writes BOS only where getattr(tokenizer, "add_bos_token", False)
    # (data/processor/pretrain.py:33, :49): transformers 5 reads it false here, so pt joins documents without BOS
    assert not getattr(hf, "add_bos_token", False)
    for text in CORPUS + CONTROL:
        expected = hf.encode(text, add_special_tokens=False)  # LLaMA-Factory's call for each template piece
        assert ours.encode_special(text) == expected, text
        assert ours.decode(expected) == hf.decode(expected), text
        assert ours.decode(expected, skip_special=True) == hf.decode(expected, skip_special_tokens=True), text
        split = hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert ours.split_special().encode(text) == split, text
    for text in CORPUS:  # user text without added tokens: as transformers reads it
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False), text
    # the markup stays literal in user text (EOS, BOS): split as text, as split_special_tokens does
    assert ours.encode("</s>") == hf("</s>", add_special_tokens=False, split_special_tokens=True)["input_ids"]


def test_control_tokens_typed_in_text_are_one_token_unless_split(sp_folders, sp_golden):
    """Mistral v0.3's control tokens typed in user text: those the mistral template places ([INST], [TOOL_CALLS]:
    pipeline.data.templates.TEMPLATE_MARKUP) stay literal pieces, as split_special_tokens reads them, so that data
    cannot forge a turn (LLaMA-Factory, encoding the user's text inside the template's string, would read them as
    tokens); the others ([IMG], [control_12]) are one token each, as transformers reads them by default; all literal
    with split_special_tokens."""
    hf, ours = sp_golden["mistral_v3"], load_tokenizer(sp_folders["mistral_v3"])

    def split(text: str) -> list[int]:
        return hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    markup, other = "say [INST] and [TOOL_CALLS]", " then [IMG] and [control_12]"
    assert ours.encode(markup + other) == split(markup) + hf.encode(other, add_special_tokens=False)
    assert {10, 14} <= set(ours.encode(markup + other))  # [IMG] 10, [control_12] 14 (the v3 model's control pieces)
    assert not {3, 5} & set(ours.encode(markup + other))  # [INST] 3, [TOOL_CALLS] 5
    assert ours.split_special().encode(markup + other) == split(markup + other)


def test_byte_fallback_token_bytes(sp_folders):
    """Each id's bytes (token_bytes: <0xNN> its byte, "▁" a space) joined give the text back with the one prefix
    space Metaspace adds: 🦙 is four <0xNN> tokens."""
    ours = load_tokenizer(sp_folders["mistral_v1"])
    ids = ours.encode("llama 🦙!")
    assert b"".join(ours.token_bytes(i) for i in ids) == " llama 🦙!".encode()
    assert [ours.token_bytes(i) for i in ids[-5:-1]] == [bytes([b]) for b in "🦙".encode()]


def test_an_encoding_and_its_variants_are_freed_with_it(sp_folders):
    """The tokenizers an encoding builds for a text after markup (continued) or another set of added tokens are its
    own: they go when it goes. A cache shared by every HFEncoding (functools.lru_cache on the method) held the last
    eight encodings alive, with their parsed tokenizer.json, and evicted one tokenizer's variants for another's."""
    import gc
    import weakref

    from pipeline.data.hf_encoding import HFEncoding

    encoding = HFEncoding.from_file(sp_folders["mistral_v3"] / "tokenizer.json", {"legacy": False})
    assert encoding.encode("hi", continued=True) != encoding.encode("hi")  # a variant: no prefix space after markup
    freed = weakref.ref(encoding)
    del encoding
    gc.collect()
    assert freed() is None


def test_added_tokens_as_transformers_adds_them(sp_folders, sp_golden):
    """add_tokens (plain, normalized) then add_special_tokens, ids from 32,000 up: as transformers' add_tokens."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(sp_folders["llama2"])
    hf.add_tokens(["<think>"], special_tokens=False)
    hf.add_tokens(["<tool>"], special_tokens=True)
    ours = load_tokenizer(sp_folders["llama2"]).with_tokens(["<think>"], ["<tool>"])
    assert (ours.token_id("<think>"), ours.token_id("<tool>"), ours.n_vocab) == (32000, 32001, 32002)
    for text in ["a <think> b <tool> c", "<think>x</think>", "<tool>"]:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False), text
        assert ours.decode(ours.encode(text)) == hf.decode(hf.encode(text, add_special_tokens=False)), text
    assert ours.decode([32000, 32001], skip_special=True) == hf.decode([32000, 32001], skip_special_tokens=True)


@pytest.mark.parametrize("tokenizer_class,model_type", [("PreTrainedTokenizerFast", "llama"),
                                                         ("TokenizersBackend", "llama"), (None, "llama"),
                                                         (None, "mistral")])
def test_a_file_without_a_llama_tokenizer_class_runs_as_written(sp_folders, tmp_path, tokenizer_class, model_type):
    """tokenizer_class PreTrainedTokenizerFast or TokenizersBackend, or none (whatever config.json's model_type:
    transformers 5.24 then loads TokenizersBackend): transformers runs the file's own legacy normalizer (Prepend "▁",
    Replace " "), which encodes "  two  spaces" otherwise than LlamaTokenizer's rebuilt Metaspace; so does ours.
    Without a class, ours rebuilt a llama / mistral model_type's as LlamaTokenizer (TokenizersBackend was refused)."""
    import json
    import shutil

    from transformers import AutoTokenizer

    folder = shutil.copytree(sp_folders["mistral_v1"], tmp_path / "fast")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("tokenizer_class", None)
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, **({"tokenizer_class": tokenizer_class}
                                                                           if tokenizer_class else {})}))
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    hf, ours = AutoTokenizer.from_pretrained(folder), load_tokenizer(folder)
    assert type(hf).__name__ == "TokenizersBackend"  # what transformers 5 loads PreTrainedTokenizerFast as, too
    for text in CORPUS:
        assert ours.encode_special(text) == hf.encode(text, add_special_tokens=False), text
        assert ours.decode(ours.encode_special(text)) == hf.decode(hf.encode(text, add_special_tokens=False)), text
    assert ours.encode("  two  spaces") != load_tokenizer(sp_folders["mistral_v1"]).encode("  two  spaces")


def decoder_entry(content: str, special: bool, **flags: bool) -> dict:
    """An added_tokens_decoder entry as transformers' save_pretrained writes it (add_tokens' flags by default)."""
    return {"content": content, "lstrip": False, "normalized": not special, "rstrip": False, "single_word": False,
            "special": special, **flags}


def test_tokens_only_in_added_tokens_decoder_are_added_as_transformers_adds_them(sp_folders, tmp_path):
    """tokenizer_config.json's added_tokens_decoder lists <think> (plain) and <tool> (special, lstrip) that
    tokenizer.json's added_tokens lacks: transformers adds them on loading (tokenization_utils_tokenizers.py:478-513),
    ids from the vocabulary's end, each with its entry's flags (lstrip: the spaces before <tool> go with it); so does
    ours, in user text, template markup, split_special_tokens and decode; an export with a recipe's tokens loads in
    transformers with the same ids."""
    import json
    import shutil

    from transformers import AutoTokenizer

    from pipeline.data.tokenizer_files import write_recipe_settings

    folder = shutil.copytree(sp_folders["llama2"], tmp_path / "base")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    decoder = {**config["added_tokens_decoder"], "32000": decoder_entry("<think>", False),
               "32001": decoder_entry("<tool>", True, lstrip=True)}
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "added_tokens_decoder": decoder}))
    hf, ours = AutoTokenizer.from_pretrained(folder), load_tokenizer(folder)
    assert (ours.token_id("<think>"), ours.token_id("<tool>"), ours.n_vocab) == (32000, 32001, len(hf))
    for text in ["a <tool> b <think> c", "<tool>", "x<think>y", "a   <tool> b"]:
        ids = hf.encode(text, add_special_tokens=False)
        assert ours.encode(text) == ours.encode_special(text) == ids, text
        assert ours.split_special().encode(text) == hf(text, add_special_tokens=False,
                                                       split_special_tokens=True)["input_ids"], text
        assert ours.decode(ids, skip_special=True) == hf.decode(ids, skip_special_tokens=True), text
    assert ours.encode("a   <tool>")[-1:] == [32001] and 28705 not in ours.encode("a   <tool>")  # lstrip: no "▁"
    tuned = ours.with_tokens(["<x>"], ["<y>"])
    export = tmp_path / "export"
    export.mkdir()
    for path in tuned.files:
        shutil.copyfile(path, export / path.name)
    write_recipe_settings(export, tuned)
    exported, text = AutoTokenizer.from_pretrained(export), "a <tool> <think> <x> <y> b"
    assert tuned.encode(text) == exported.encode(text, add_special_tokens=False)
    assert [tuned.token_id(t) for t in ("<x>", "<y>")] == [32002, 32003]
    # a special token past the vocabulary before a plain one: read as text (split_special_tokens), it keeps its id,
    # so the plain one after it keeps its own (it moved down to 32000 when the encoding left <tool> out)
    swapped = {**config["added_tokens_decoder"], "32000": decoder_entry("<tool>", True),
               "32001": decoder_entry("<think>", False)}
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "added_tokens_decoder": swapped}))
    hf, ours = AutoTokenizer.from_pretrained(folder), load_tokenizer(folder).with_tokens(["<x>"], ["<y>"])
    hf.add_tokens(["<x>"])
    hf.add_tokens(["<y>"], special_tokens=True)
    for text in ["a <tool> b <think> c <x> <y>", "<think>"]:
        split = hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert ours.split_special().encode(text) == split and 32001 in split, text
