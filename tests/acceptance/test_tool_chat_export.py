"""The user's path for an agent model: LLaMA-Factory's function-calling data as users bring it (a sharegpt
dataset_info.json entry with a `tools` column, function_call / observation turns: tests/compat/lf_data) and a
save_pretrained GPT-2 (template: default) or Llama 3 (template: llama3) checkpoint -> `python -m pipeline build`,
`train`, `merge` -> transformers' AutoTokenizer on merged/ serves the OpenAI-style conversation (`tools=`, an
assistant's `tool_calls`, a "tool" message) with training's token ids, its assistant mask marks the tokens training
trained, and the merged model generates from them.

GPT-2's run types all three commands; Llama 3's types train and runs build and merge as main(argv) in this process
(harness.pipeline as_typed=False: the same command line and files without an interpreter start and torch's import).

Expected ids: the pipeline's encoding of the built row (the example train used; its text is pinned to LLaMA-Factory
0.9.5's by tests/data/lf_tool_goldens.py, its ids to the `tokenizers` library by test_template_masks_real.py).
"""
from __future__ import annotations

import json
import shutil

import pytest

from tests.acceptance.harness import pipeline, write_recipe
from tests.compat.conftest import LF_DATA

# (checkpoint family and config overrides, template, the call as the template writes it): GPT-2 with LLaMA-Factory's
# default tool format, and Llama 3 with its real 128k vocabulary (slow: merge verifies logits over all of it)
MODELS = {
    "gpt2": (("gpt2", {"n_positions": 256}), "default",
             'Action: get_time\nAction Input: {"city": "city 0"}<|endoftext|>'),
    "llama3": (("llama", {}), "llama3", '{"name": "get_time", "parameters": {"city": "city 0"}}<|eot_id|>'),
}


@pytest.mark.parametrize("family", ["gpt2", pytest.param("llama3", marks=pytest.mark.slow)])
def test_an_agent_fine_tune_serves_tool_calls_as_it_was_trained(tmp_path, hf_checkpoint, family):
    import torch
    import transformers

    from pipeline.data.chat_template import TRAINING_TEMPLATE_FILE
    from pipeline.data.model_tokenizer import load_tokenizer
    from pipeline.data.templates import get_template
    from pipeline.data.tokenize import encode_example, encode_prompt

    shutil.copytree(LF_DATA, tmp_path / "data")
    (checkpoint, overrides), name, call_text = MODELS[family]
    base = hf_checkpoint(checkpoint, **overrides)
    recipe = write_recipe(tmp_path / "tools.yaml", model_name_or_path=str(base), dataset_dir="data",
                          dataset="glaive_toolcall_en_demo", template=name, cutoff_len=256, val_size=0,
                          max_steps=1, output_dir="saves/tools")
    for command in ("build", "train", "merge"):  # Llama 3's build and merge in this process (GPT-2's typed them)
        pipeline(command, recipe, cwd=tmp_path, as_typed=command == "train" or family == "gpt2")

    (row,) = [r for r in json.loads((tmp_path / "data/build/glaive_toolcall_en_demo/train.json").read_text("utf-8"))
              if r["instruction"] == '{"time": "10:00"}']  # the first conversation, as build wrote it
    (question, call), answer = row["history"][0], row["output"]
    assert row["roles"] == ["user", "function", "observation", "assistant"]
    chat = [{"role": "user", "content": question},
            {"role": "assistant", "tool_calls": [{"type": "function", "function": json.loads(call)}]},
            {"role": "tool", "content": row["instruction"]}]
    tools = json.loads(row["tools"])

    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "saves/tools/merged")
    ours, template = load_tokenizer(base), get_template(name)
    prompt = tokenizer.apply_chat_template(chat, tools=tools, add_generation_prompt=True)["input_ids"]
    assert prompt == encode_prompt(template, row["instruction"], history=row["history"], tools=row["tools"],
                                   roles=row["roles"], tokenizer=ours)
    assert call_text in tokenizer.decode(prompt)
    conversation = [*chat, {"role": "assistant", "content": answer}]
    whole = tokenizer.apply_chat_template(conversation, tools=tools)
    example = encode_example(row, template, ours, cutoff_len=256)  # every answer trained (mask_history false)
    assert whole["input_ids"] == example.input_ids
    # the served template has no {% generation %} tag (engines without transformers' extension refuse it); its
    # copy beside it marks what training trained: the call and the answer (TRL's assistant_only_loss)
    assert "generation" not in tokenizer.chat_template.replace("add_generation_prompt", "")
    marked = (tmp_path / "saves/tools/merged" / TRAINING_TEMPLATE_FILE).read_text("utf-8")
    masked = tokenizer.apply_chat_template(conversation, tools=tools, chat_template=marked,
                                           return_assistant_tokens_mask=True)
    assert masked["input_ids"] == example.input_ids
    assert masked["assistant_masks"] == [int(label != -100) for label in example.labels]

    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saves/tools/merged").eval()
    out = model.generate(torch.tensor([prompt]), max_new_tokens=2, do_sample=False)
    assert out.shape == (1, len(prompt) + 2)
