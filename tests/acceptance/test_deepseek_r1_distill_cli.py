"""The user's path for a DeepSeek-R1-Distill-Qwen checkpoint on LLaMA-Factory's `template: deepseekr1`: a
transformers-written Qwen2ForCausalLM with the real Qwen vocabulary and DeepSeek-R1-Distill-Qwen's tokenizer files
(<｜begin▁of▁sentence｜> BOS, <｜User｜>, <｜Assistant｜>, <｜end▁of▁sentence｜> EOS, <think> as added tokens;
tests/helpers/hf_vocab.py), LLaMA-Factory-format alpaca data with and without reasoning, and `python -m pipeline
build / inspect / train / merge / generate` (train and merge in a fresh interpreter, the others in this one to save
their start-up).

Golden values: LLaMA-Factory 0.9.5's deepseekr1 (template.py:828-833, a ReasoningTemplate with its default
thought words; quoted in tests/vocab/test_template_masks_real.py) re-computed here with transformers' tokenizer of the
same files: encode_multiturn's prompt `[bos] + encode("<｜User｜>" + query + "<｜Assistant｜>")` and answer
`encode("<think>\\n\\n</think>\\n\\n")` (when the answer has no thought) `+ encode(answer) + [eos]`, each piece encoded
on its own (`add_special_tokens=False`), only the answer trained.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.acceptance.harness import always_answer, pipeline, write_hf_checkpoint, write_recipe
from tests.helpers.hf_vocab import write_tokenizer_dir
from tests.reliability.rel_helpers import run_main

transformers = pytest.importorskip("transformers")

BOS, USER, ASSISTANT, EOS = "<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"
EOS_ID = 151643
EMPTY_THOUGHT = "<think>\n\n</think>\n\n"
ROWS = [{"instruction": "Which word is a color?", "input": "red hill", "output": "<think>\nred is one\n</think>\n\nred"},
        {"instruction": "Say blue", "input": "", "output": "blue"},
        {"instruction": "Name a fruit", "input": "", "output": "<think>\napples grow on trees\n</think>\n\napple"},
        {"instruction": "Say sea", "input": "", "output": "sea"}]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """distill/: a tiny Qwen2 with DeepSeek-R1-Distill-Qwen's tokenizer files (config.json's eos_token_id 151643, as
    the published checkpoints' is), untied, whose every next token is <｜end▁of▁sentence｜>
    (harness.always_answer), so that where generation stops shows; data/: the rows above, alpaca format."""
    root = tmp_path_factory.mktemp("deepseek_r1")
    model = write_hf_checkpoint(root / "distill", "qwen2", tie_word_embeddings=False, bos_token_id=EOS_ID,
                                eos_token_id=EOS_ID)
    always_answer(model, EOS_ID).save_pretrained(root / "distill", safe_serialization=True)
    write_tokenizer_dir(root / "distill", "deepseek_r1_qwen")  # after save_pretrained's generation_config.json
    (root / "data" / "raw").mkdir(parents=True)
    (root / "data" / "raw" / "r1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    (root / "data" / "dataset_info.json").write_text(json.dumps({"r1": {"file_name": "raw/r1.jsonl"}}))
    return root


def llama_factory(tok, row: dict) -> tuple[list[int], list[int]]:
    """LLaMA-Factory's (prompt, answer) ids of one alpaca row on deepseekr1 (enable_thinking true)."""
    query = row["instruction"] + ("\n" + row["input"] if row["input"] else "")
    encode = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    thought = [] if "<think>" in row["output"] else encode(EMPTY_THOUGHT)
    return [tok.bos_token_id] + encode(USER + query + ASSISTANT), thought + encode(row["output"]) + [tok.eos_token_id]


def test_a_deepseek_r1_distill_trains_its_answers_and_its_export_stops_at_its_eos(workdir):
    recipe = write_recipe(workdir / "r1.yaml", model_name_or_path="distill", dataset_dir="data", dataset="r1",
                          template="deepseekr1", cutoff_len=96, val_size=0, max_steps=1, skip_special_tokens=False,
                          max_new_tokens=3, output_dir="saves/r1")
    assert run_main(["build", str(recipe)], workdir).code == 0
    shown = run_main(["inspect", str(recipe), "--num", str(len(ROWS))], workdir).out
    assert f"{EOS} is EOS (id {EOS_ID})" in shown, shown
    tok = transformers.AutoTokenizer.from_pretrained(workdir / "distill")
    assert (tok.bos_token, tok.eos_token, tok.convert_tokens_to_ids(USER)) == (BOS, EOS, 151644)
    samples = re.findall(r"r1\.jsonl:(\d+)[^\n]*· (\d+) tokens, (\d+) trained\n(.*?)\n\n(?=── sample|train: )",
                         shown, re.S)
    assert len(samples) == len(ROWS), shown
    for line, total, trained, text in samples:
        row = ROWS[int(line) - 1]
        prompt, answer = llama_factory(tok, row)
        assert (int(total), int(trained)) == (len(prompt + answer), len(answer)), (row, text)
        assert text == tok.decode(prompt) + "[[" + tok.decode(answer) + "]]", text  # only the answer and its EOS
        assert text.endswith(("[[" + EMPTY_THOUGHT if "<think>" not in row["output"] else "[[") + row["output"]
                             + EOS + "]]"), text
    for command in ("train", "merge"):
        pipeline(command, recipe, cwd=workdir)
    merged = workdir / "saves/r1/merged"
    theirs = transformers.AutoTokenizer.from_pretrained(merged)
    assert theirs.eos_token == EOS
    ids = theirs.apply_chat_template([{"role": "user", "content": "Say red"}], add_generation_prompt=True,
                                     return_dict=True, return_tensors="pt")
    assert ids["input_ids"][0].tolist() == llama_factory(tok, {"instruction": "Say red", "input": "",
                                                                "output": ""})[0]  # the prompt trained on
    model = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)[0, ids["input_ids"].shape[1]:].tolist()
    assert out == [EOS_ID]  # stopped at <｜end▁of▁sentence｜>: the tokenizer's eos and generation_config's
    done = run_main(["generate", str(recipe), "--prompt", "Say red"], workdir)
    assert (done.code, done.out) == (0, "\n"), done  # skip_special_tokens false: a missed stop would print the EOS


def test_a_recipe_without_template_is_told_deepseekr1(workdir):
    """LLaMA-Factory reads the tokenizer's chat template when `template` is unset; here the default is alpaca, and the
    notice names the model's own format: for a distill with Qwen2 weights, deepseekr1 (its vocabulary has DeepSeek's
    markup and none of qwen's), not qwen (it said qwen, which that vocabulary cannot express)."""
    unset = write_recipe(workdir / "unset.yaml", model_name_or_path="distill", dataset_dir="data", dataset="r1",
                         template=None, output_dir="saves/unset")
    told = run_main(["plan", str(unset)], workdir).err
    assert "for this qwen2 model, whose own chat format is template: deepseekr1 (" in told, told
