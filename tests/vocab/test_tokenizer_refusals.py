"""Tokenizers we do not run are refused with one message naming the file and the key (UserError, exit 2)."""
from __future__ import annotations

import json
import shutil

import pytest

from pipeline.data.model_tokenizer import load_tokenizer
from pipeline.errors import UserError

LLAMA_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
# a whole (tiny) Llama config.json: the recipe checks read the model's shape before validate reads its tokenizer
LLAMA_SHAPE = {**LLAMA_CONFIG, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "intermediate_size": 96, "vocab_size": 32000}


def _dir(tmp_path, name, tokenizer_json=None):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    if tokenizer_json is not None:
        (d / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    return d


@pytest.mark.parametrize("tokenizer_json, message", [
    ({"model": {"type": "Unigram", "vocab": []}}, r"model.type 'Unigram' \(sentencepiece\) is not supported"),
    ({"model": {"type": "BPE", "vocab": {}, "merges": []}, "pre_tokenizer": {"type": "Metaspace"}},
     r"a sentencepiece tokenizer \(pre_tokenizer Metaspace\) is not supported"),
    ({"model": {"type": "WordPiece", "vocab": {}}}, r"model.type 'WordPiece' is not supported"),
])
def test_non_byte_level_tokenizers_are_refused(tmp_path, tokenizer_json, message):
    d = _dir(tmp_path, "m", tokenizer_json)
    with pytest.raises(UserError, match=f"{d / 'tokenizer.json'}: {message}.*supported: byte-level BPE"):
        load_tokenizer(d)


def test_a_sentencepiece_tokenizer_model_is_refused(tmp_path):
    d = _dir(tmp_path, "m")
    (d / "tokenizer.model").write_bytes(b"\n\x0e\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02")  # protobuf, not text
    with pytest.raises(UserError, match="not a tiktoken BPE file .* a sentencepiece tokenizer.model is not supported; "
                                         "copy the checkpoint.s tokenizer.json next to it"):
        load_tokenizer(d)


def test_missing_tokenizer_files_say_what_to_copy(tmp_path):
    d = _dir(tmp_path, "m")
    with pytest.raises(UserError, match=f"{d}: no tokenizer files .*tokenizer.json.*hf download"):
        load_tokenizer(d)


def test_merges_out_of_id_order_are_not_tiktoken_ranks(tmp_path, vocab_dirs):
    data = json.loads((vocab_dirs["qwen2"] / "tokenizer.json").read_text())
    merges = data["model"]["merges"]
    merges[0], merges[500] = merges[500], merges[0]
    d = _dir(tmp_path, "m", data)
    with pytest.raises(UserError, match=r"merge 2 \(\['Ġ', 'ĠĠĠ'\]\) does not follow the token ids"):
        load_tokenizer(d)


def test_eos_token_the_vocabulary_lacks(tmp_path, vocab_dirs):
    d = tmp_path / "m"
    shutil.copytree(vocab_dirs["qwen2"], d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "</s>"}))
    with pytest.raises(UserError, match=r"tokenizer_config.json: eos_token '</s>' is not a special token"):
        load_tokenizer(d)


@pytest.mark.parametrize("file,value", [("generation_config.json", "im_end"),
                                        ("generation_config.json", [151645, None]), ("config.json", 1.5)])
def test_a_token_id_that_is_not_a_whole_number_names_file_and_key(tmp_path, vocab_dirs, file, value):
    d = tmp_path / "m"
    shutil.copytree(vocab_dirs["qwen2"], d)
    (d / "generation_config.json").unlink()
    (d / file).write_text(json.dumps({"eos_token_id": value}))
    with pytest.raises(UserError) as err:
        load_tokenizer(d)
    assert err.value.messages == [f"{d / file}: eos_token_id is {json.dumps(value)}; expected a token id (a whole "
                                  "number) or a list of them, as transformers writes it"]


def test_a_preset_of_another_family_has_no_tokenizer():
    """Every preset but GPT-2's is refused, naming a hub tokenizer of its family to set (not a placeholder)."""
    from pipeline.model.config import PRESETS

    for preset in [name for name, cfg in PRESETS.items() if cfg.family != "gpt2"]:
        with pytest.raises(UserError, match=f"preset '{preset}' has no tokenizer") as err:
            load_tokenizer(preset)
        assert "ORG/NAME" not in str(err.value), str(err.value)


def _sft_project(tmp_path, model):
    """A LLaMA-Factory-format project (alpaca rows, dataset_info.json, recipe.yaml) that trains `model`, its data
    built (in process: build reads no tokenizer)."""
    from tests.acceptance.harness import pipeline

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "chat.json").write_text(json.dumps([{"instruction": f"hi {i}", "output": "ok"}
                                                              for i in range(10)]))
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps({"chat": {"file_name": "chat.json"}}))
    (tmp_path / "recipe.yaml").write_text(f"model_name_or_path: {model}\ndataset_dir: data\ndataset: chat\n"
                                          "template: mistral\ncutoff_len: 64\n")
    pipeline("build", "recipe.yaml", cwd=tmp_path, as_typed=False)


def _errors(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_an_unreadable_sentencepiece_tokenizer_json_says_to_copy_it_again(tmp_path):
    """A sentencepiece-style tokenizer.json the tokenizers library cannot read (a merge of a token the vocabulary
    lacks: an edited or damaged file): `validate` as typed exits 2 with one message naming the file, the library's
    reason and the fix (the checkpoint's file again, by hf download into that folder)."""
    import tokenizers

    from tests.acceptance.harness import refused

    model = _dir(tmp_path, "m", {"model": {"type": "BPE", "byte_fallback": True, "vocab": {"a": 0},
                                           "merges": ["a b"]}})
    (model / "config.json").write_text(json.dumps(LLAMA_SHAPE))
    _sft_project(tmp_path, "m")
    [error] = _errors(refused("validate", "recipe.yaml", cwd=tmp_path))
    assert error.startswith(f"error: {model / 'tokenizer.json'}: not readable by the tokenizers library "
                            f"{tokenizers.__version__} (Token `b` out of vocabulary"), error
    assert error.endswith("the file is damaged (a cut-off download, an edit) or not one this version reads: copy "
                          "tokenizer.json again from the checkpoint it came from (`hf download ORG/NAME "
                          f"tokenizer.json --local-dir {model}`)"), error


def test_another_tokenizer_class_says_which_classes_read_alike(sp_folders, sp_golden, tmp_path):
    """A sentencepiece-style tokenizer.json whose tokenizer_class transformers rebuilds another way (T5Tokenizer;
    GemmaTokenizer until Gemma 3's tokenizer was reproduced) is refused: `validate` as typed exits 2 with one
    message naming tokenizer_config.json and the key, and the fix.
    The edit it names for a Mistral tokenizer (LlamaTokenizerFast) then reads as AutoTokenizer does; the other
    (PreTrainedTokenizerFast) runs as written: test_sentencepiece_tokenizers.py."""
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    from tests.acceptance.harness import refused

    model = shutil.copytree(sp_folders["mistral_v1"], tmp_path / "m")
    (model / "config.json").write_text(json.dumps(LLAMA_SHAPE))
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "T5Tokenizer"}))
    _sft_project(tmp_path, "m")
    assert _errors(refused("validate", "recipe.yaml", cwd=tmp_path)) == [
        f"error: {model / 'tokenizer_config.json'}: tokenizer_class 'T5Tokenizer' with a sentencepiece-style "
        "tokenizer.json is not supported (transformers rebuilds it its own way); supported: tokenizer_class "
        "LlamaTokenizer / LlamaTokenizerFast / PreTrainedTokenizerFast / TokenizersBackend / GemmaTokenizer / "
        "GemmaTokenizerFast (Llama 2, Mistral, Gemma) or none; to train it, set "
        "tokenizer_class in that file to LlamaTokenizerFast if it is a Llama 2 / Mistral tokenizer (transformers then "
        "rebuilds it as LlamaTokenizer, as this pipeline does), or to PreTrainedTokenizerFast to run tokenizer.json "
        "as written; transformers and this pipeline then read it alike, perhaps not as T5Tokenizer did: compare "
        "AutoTokenizer's ids on your text before and after the edit"]
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "LlamaTokenizerFast"}))
    # transformers 5 loads the edited folder with the golden's class: AutoTokenizer.from_pretrained drops the Fast
    # suffix (tokenization_auto.py:918-919, 5.24) and the alias names the same class
    golden, ours = sp_golden["mistral_v1"], load_tokenizer(model)
    assert tokenizer_class_from_name("LlamaTokenizerFast") is type(golden)
    for text in ("  two  spaces ", "Hello\nworld", "emoji 🦙"):
        assert ours.encode_special(text) == golden.encode(text, add_special_tokens=False), text


INFILLING = ("▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>")  # CodeLlama's infilling pieces (special added tokens here)


def test_a_code_llama_tokenizer_says_what_to_edit(sp_folders, tmp_path):
    """tokenizer_class CodeLlamaTokenizer (Fast) is refused with a fix of its own: transformers 5.24's
    CodeLlamaTokenizer (models/code_llama/tokenization_code_llama.py) rebuilds the file as LlamaTokenizer with legacy
    false (prepend_scheme "first" whatever legacy says) and adds infilling: <FILL_ME> splits a text into an infilling
    prompt. The folder: Llama 2's layout with legacy true and CodeLlama's infilling pieces as added tokens. The edit the
    message names (LlamaTokenizerFast, legacy false) then gives CodeLlamaTokenizer's ids on text without <FILL_ME>
    (this pipeline reads that class as AutoTokenizer does: test_sentencepiece_tokenizers.py); with <FILL_ME>,
    AutoTokenizer's are the infilling prompt's.
    Failed before: the message named the general fix (LlamaTokenizerFast alone, which with this legacy true reads
    "x▁<MID>y" as "always" does: "▁y" where CodeLlamaTokenizer gives "y")."""
    import transformers

    model = shutil.copytree(sp_folders["llama2"], tmp_path / "m")
    (model / "config.json").write_text(json.dumps(LLAMA_SHAPE))
    data = json.loads((model / "tokenizer.json").read_text())
    added = [{"id": 32000 + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, t in enumerate(INFILLING)]
    (model / "tokenizer.json").write_text(json.dumps({**data, "added_tokens": [*data["added_tokens"], *added]}))
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"].update({str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added})
    for name in ("CodeLlamaTokenizer", "CodeLlamaTokenizerFast"):
        (model / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": name, "legacy": True}))
        with pytest.raises(UserError) as err:
            load_tokenizer(model)
        assert err.value.messages == [
            f"{model / 'tokenizer_config.json'}: tokenizer_class {name!r} with a sentencepiece-style tokenizer.json is "
            "not supported (transformers rebuilds it its own way); supported: tokenizer_class LlamaTokenizer / "
            "LlamaTokenizerFast / PreTrainedTokenizerFast / TokenizersBackend / GemmaTokenizer / GemmaTokenizerFast "
            "(Llama 2, Mistral, Gemma) or none; "
            "CodeLlamaTokenizer is LlamaTokenizer with legacy false plus infilling (a text holding <FILL_ME> becomes an "
            "infilling prompt: ▁<PRE> ... ▁<SUF> ... ▁<MID>), which this pipeline does not train; to fine-tune on data "
            "without <FILL_ME>, set tokenizer_class in that file to LlamaTokenizerFast and legacy to false: "
            "transformers and this pipeline then read text as CodeLlamaTokenizer does (compare AutoTokenizer's ids on "
            "your text before and after the edit)"]
    code_llama = transformers.AutoTokenizer.from_pretrained(model)
    assert type(code_llama).__name__ == "CodeLlamaTokenizer"
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "LlamaTokenizerFast",
                                                             "legacy": False}))
    ours = load_tokenizer(model)
    # text right after an added token (x▁<MID>y, a</s>b) is where legacy true ("always") would differ
    for text in ("def f(x):\n    return x  # two  spaces", "emoji 🦙 and 龘", "x▁<MID>y", "a</s>b", "a ▁<MID> b",
                 "[INST] hi [/INST]", "  lead", "\n\nline"):
        assert ours.encode_special(text) == code_llama.encode(text, add_special_tokens=False), text
    prefix, suffix, middle = (code_llama.convert_tokens_to_ids(t) for t in ("▁<PRE>", "▁<SUF>", "▁<MID>"))
    infilled = code_llama.encode("x <FILL_ME> y", add_special_tokens=False)
    assert infilled[0] == prefix and infilled[-1] == middle and suffix in infilled  # what this pipeline does not do
