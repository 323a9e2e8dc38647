"""A small tokenizer in the form of Gemma's (google/gemma-3-1b-it's tokenizer.json / tokenizer_config.json), written
by the tests: Gemma's real 262,144-piece vocabulary is on no package index, so its form is rebuilt around a vocabulary
trained here on a few sentences.

What is Gemma's: a sentencepiece-style BPE with byte_fallback (<0xNN> pieces), spaces normalised to "▁" with no
prefix "▁" (normalizer Replace, no pre-tokenizer), the ids <pad> 0, <eos> 1, <bos> 2, <unk> 3, <mask> 4,
<start_of_turn> 105, <end_of_turn> 106 and "\\n" 107, the post-processor's BOS, tokenizer_class GemmaTokenizer (which
transformers 5.24 rebuilds: tokenization_gemma.py:82-101). What is not: the vocabulary itself (a few hundred pieces),
and the <unusedN> fillers standing for the ids 5-104.

    write_gemma_tokenizer_dir(checkpoint_dir)   # beside a transformers save_pretrained Gemma3ForCausalLM
"""
from __future__ import annotations

import json
from pathlib import Path

SPECIAL = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
TURNS = {"<start_of_turn>": 105, "<end_of_turn>": 106}
CORPUS = [
    "What is 2+2? It is 4. And 3+3? It's 6.", "Which word is a color? red, hill, blue, green.",
    "You are terse. You are a helpful assistant. Answer briefly.", "user model system tool",
    "The quick brown fox jumps over the lazy dog.", "Hello world! How are you today?\nI am fine, thanks.",
    "Sort the words: apple banana cherry. Translate to French: the cat sleeps.",
]
VOCAB_SIZE = 512  # ids the model has: 108 fixed + 256 bytes + the trained pieces


def tokenizer_json() -> str:
    """tokenizer.json: Gemma's ids and pipeline around pieces trained on CORPUS (deterministic)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors, trainers

    trainer = trainers.BpeTrainer(vocab_size=140, show_progress=False, special_tokens=[])
    probe = Tokenizer(models.BPE(byte_fallback=True))
    probe.normalizer = normalizers.Replace(" ", "▁")
    probe.train_from_iterator(CORPUS, trainer)
    trained = json.loads(probe.to_str())["model"]
    vocab = {**SPECIAL, **{f"<unused{i}>": 5 + i for i in range(100)}, **TURNS, "\n": 107}
    vocab.update({f"<0x{b:02X}>": 108 + b for b in range(256)})
    for piece in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in [*SPECIAL, *TURNS]])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", 2)])
    assert len(vocab) <= VOCAB_SIZE, len(vocab)
    return tok.to_str()


def write_gemma_tokenizer_dir(directory: str | Path) -> Path:
    """tokenizer.json + tokenizer_config.json as google/gemma-3-1b-it ships them (no chat template: our export
    writes the recipe's)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(tokenizer_json(), encoding="utf-8")
    config = {"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
              "unk_token": "<unk>", "mask_token": "<mask>", "add_bos_token": True, "add_eos_token": False,
              "padding_side": "left", "model_max_length": 32768, "clean_up_tokenization_spaces": False,
              "spaces_between_special_tokens": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return directory
