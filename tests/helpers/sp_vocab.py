"""Real sentencepiece vocabularies (Mistral 7B v0.1, Llama-2-like; Mistral 7B v0.3) as Hugging Face tokenizer
directories, for tests of the sentencepiece-style tokenizers (pipeline.data.hf_encoding).

The sentencepiece models come from the mistral-common 1.13.1 wheel on PyPI at test time (never committed:
licences), cached under .cache/vocab/ like tests/helpers/hf_vocab.py's; transformers' LlamaConverter (test-only,
with the `sentencepiece` test dependency) turns them into tokenizer.json as the hub's files were made, and the
configs follow the published checkpoints:
- "mistral_v1": mistralai/Mistral-7B-v0.1 (tokenizer.model.v1, 32,000 pieces; the legacy tokenizer.json with the
  Prepend / Replace normalizer; legacy: true);
- "llama2": meta-llama/Llama-2-7b-hf's layout (the same legacy tokenizer.json form, legacy: false, the special
  tokens as AddedToken objects) on the v1 vocabulary, which is Llama 2's shape (Llama 2's own is not on PyPI);
- "mistral_v3": mistralai/Mistral-7B-Instruct-v0.3 (mistral_instruct_tokenizer_240323.model.v3, 32,768 pieces with
  the control tokens [INST], [/INST], [TOOL_CALLS], ...; Metaspace prepend_scheme first; legacy: false; a chat
  template of the [INST] form, shortened).

    write_sp_tokenizer_dir(checkpoint_dir, "mistral_v1")   # beside a transformers save_pretrained checkpoint
"""
from __future__ import annotations

import json
import os
import types
from pathlib import Path

from tests.helpers.hf_vocab import CACHE, wheel_member

REQUIREMENT = "mistral-common==1.13.1"
MODELS = {  # name -> (member of the wheel, sha256)
    "v1": ("mistral_common/data/tokenizer.model.v1",
           "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"),
    "v3": ("mistral_common/data/mistral_instruct_tokenizer_240323.model.v3",
           "9addc8bdce5988448ae81b729336f43a81262160ae8da760674badab9d4c7d33"),
}
# family -> (model, the legacy form of tokenizer.json (Prepend / Replace normalizer), tokenizer_config.json's legacy)
FAMILIES = {"mistral_v1": ("v1", True, True), "llama2": ("v1", True, False), "mistral_v3": ("v3", False, False)}
# Mistral-7B-Instruct-v0.3's chat template, shortened to its [INST] turns (no tools)
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content']"
    " + '[/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}")


def sentencepiece_model(name: str) -> Path:
    """The cached sentencepiece model "v1" or "v3", fetched from PyPI with pip when absent (sha256 checked)."""
    member, sha = MODELS[name]
    return wheel_member(REQUIREMENT, member, sha, CACHE / f"mistral-{name}.model")


def tokenizer_json(model: str, legacy: bool) -> Path:
    """tokenizer.json converted by transformers' LlamaConverter as the hub's were (add_prefix_space true; legacy:
    the Prepend / Replace normalizer, else Metaspace prepend_scheme first), with <unk> added and the BOS
    post-processor (LlamaTokenizerFast's update_post_processor) as the hub's files have them; cached."""
    dest = CACHE / f"mistral-{model}-{'legacy' if legacy else 'metaspace'}-tokenizer.json"
    if dest.is_file():
        return dest
    import sentencepiece
    from tokenizers import AddedToken, processors
    from transformers.convert_slow_tokenizer import LlamaConverter, SentencePieceExtractor
    from transformers.tokenization_utils_base import generate_merges

    class Extractor(SentencePieceExtractor):
        """transformers 4's SentencePieceExtractor.extract(vocab_scores) -> (vocab, merges), which transformers 5's
        SpmConverter.tokenizer still calls (its own extract took another signature)."""

        def extract(self, vocab_scores=None):
            vocab = {piece.piece: i for i, piece in enumerate(self.proto.pieces)}
            return vocab, generate_merges(vocab, vocab_scores)

    class Converter(LlamaConverter):
        SpmExtractor = Extractor

    path = str(sentencepiece_model(model))
    processor = sentencepiece.SentencePieceProcessor(model_file=path)
    slow = types.SimpleNamespace(vocab_file=path, legacy=legacy, add_prefix_space=True,
                                 convert_ids_to_tokens=processor.id_to_piece)
    tok = Converter(slow).converted()
    tok.add_special_tokens([AddedToken("<unk>", normalized=False, special=True)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    part = dest.with_suffix(f".part{os.getpid()}")
    tok.save(str(part))
    os.replace(part, dest)
    return dest


def _configs(family: str) -> tuple[dict, dict]:
    """(tokenizer_config.json, special_tokens_map.json) as the published checkpoints have them."""
    model, legacy_form, legacy = FAMILIES[family]
    added = json.loads(tokenizer_json(model, legacy_form).read_text())["added_tokens"]
    decoder = {str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word",
                                                   "special")} for t in sorted(added, key=lambda t: t["id"])}
    names = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if family == "llama2":  # AddedToken objects, as Llama-2-7b-hf's files spell them
        names = {k: {"__type": "AddedToken", "content": v, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False} for k, v in names.items()}
    config = {"add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": decoder,
              "additional_special_tokens": [], **names, "clean_up_tokenization_spaces": False, "legacy": legacy,
              "model_max_length": 1000000000000000019884624838656, "pad_token": None, "sp_model_kwargs": {},
              "spaces_between_special_tokens": False, "tokenizer_class": "LlamaTokenizer",
              "use_default_system_prompt": False}
    if family == "llama2":
        config["padding_side"] = "right"
    if family == "mistral_v3":
        config["chat_template"] = MISTRAL_CHAT_TEMPLATE
    special = {k: v for k, v in names.items()}
    return config, special


def write_sp_tokenizer_dir(directory: str | Path, family: str) -> Path:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json of `family` (FAMILIES) in `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model, legacy_form, _ = FAMILIES[family]
    (directory / "tokenizer.json").write_bytes(tokenizer_json(model, legacy_form).read_bytes())
    config, special = _configs(family)
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return directory


if __name__ == "__main__":  # `python -m tests.helpers.sp_vocab`: fetch and convert everything once (make test-deps)
    for model_name, legacy_form in sorted({(m, form) for m, form, _ in FAMILIES.values()}):
        print(tokenizer_json(model_name, legacy_form))
