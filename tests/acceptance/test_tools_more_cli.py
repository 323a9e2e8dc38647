"""Agent fine-tunes through the CLI with the tool formats of GLM-4.5 (glm4_moe), DeepSeek-R1 (deepseekr1) and
Moonlight (moonlight): LLaMA-Factory-format function-calling data as users bring it (a sharegpt dataset_info.json entry
with a `tools` column; each conversation a question, a function_call, its observation and the answer:
test_tools_glm4_cli's) and transformers-written checkpoints with small byte-level tokenizers holding each family's
markup (tests/helpers/hf_vocab.py).

- glm4_moe: a Glm4MoeForCausalLM -> build / train / merge as typed. The rows train exactly the calls and the answers
  (by hand below from LLaMA-Factory 0.9.5: template.py:1095-1108, glm4's strings as a ReasoningTemplate with its empty
  thought :439-472; GLM4MOEToolUtils.function_formatter, tool_utils.py:697-713; efficient_eos labels,
  processor/supervised.py:68-104); merged/ loads in transformers and its chat template writes the call as training.
- deepseekr1 / moonlight: DeepseekV3ForCausalLM checkpoints (DeepSeek-V3's vocabulary, Moonlight's) and the presets
  deepseek-v3 / moonlight-16b-a3b -> plan without a template names the model's own (deepseek3 for DeepSeek-V3 by its
  family, LLaMA-Factory's constants.py:480-493; moonlight by Moonlight's vocabulary, or its config's vocab_size where
  no tokenizer is read, :2133-2145), build and inspect show the call in the default format (register
  _template's defaults, template.py:533-550) trained with its EOS, the tools text and the tool result not.

Failed before: glm4_moe and deepseekr1 refused function-calling data (build exited 2 on the tools column), moonlight was
no template, and a DeepSeek-V3 recipe without a template got no notice.
"""
from __future__ import annotations

import json
import re
import shutil

from tests.acceptance.harness import save_pretrained_small, write_recipe
from tests.acceptance.test_deepseek_v3_cli import TINY as DEEPSEEK_TINY
from tests.acceptance.test_glm4_moe_cli import TINY as GLM_TINY
from tests.acceptance.test_tools_glm4_cli import TOOLS, assert_trained_and_merged, glm_tool_recipe, write_tool_data
from tests.reliability.rel_helpers import run_main

THOUGHT = "<think>\n\n</think>\n\n"  # ReasoningTemplate's empty thought (LLaMA-Factory's default thought words)
# zai-org/GLM-4.5's chat_template.jinja (GLM-4.5-Air's is the same), re-typed: its opening (the tools block only
# `{%- if tools -%}`, so an empty list writes none) and the lines that write a system message, a user message (the
# content as visible_text gives a string) and the generation prompt, enable_thinking left undefined (its /nothink and
# empty thought are the hub's, not training's); the assistant's lines and the tool list's text are left out
# (tests/data/test_templates_deepseek_glm_tools.py re-types the calls)
GLM45_HUB_OPENING = (
    "[gMASK]<sop>\n{%- if tools -%}\n<|system|>\n# Tools\n\nYou may call one or more functions to assist with the"
    " user query.\n{%- endif -%}\n"
    "{%- for m in messages %}\n"
    "{%- if m.role == 'user' -%}<|user|>\n{{ m.content }}\n"
    "{%- elif m.role == 'system' -%}\n<|system|>\n{{ m.content }}\n"
    "{%- endif -%}\n{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    <|assistant|>\n"
    "{%- endif -%}")


def hub_rendering(messages: list[dict], **kwargs) -> str:
    """GLM45_HUB_OPENING rendered by jinja2 as transformers renders a chat template (trim_blocks, lstrip_blocks)."""
    import jinja2

    environment = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return environment.from_string(GLM45_HUB_OPENING).render(messages=messages, add_generation_prompt=True, **kwargs)


def glm_call(city: str) -> str:
    """GLM4MOEToolUtils' call (tool_utils.py:697-713): no closing tag, a string argument as it is."""
    return f"\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>{city}</arg_value>"


def test_lora_sft_on_function_calling_data_with_glm4_moe(workdir, monkeypatch):
    base, recipe = glm_tool_recipe(workdir / "GLM-4.5-Air", "Glm4MoeForCausalLM", GLM_TINY, "glm4_moe")
    for stage in ("build", "train", "merge"):  # in this process: no interpreter start-up per stage
        done = run_main([stage, str(recipe)], workdir)
        assert done.code == 0, done.err

    # every row's trained labels, by hand: the empty thought, then the call right after <|assistant|>; the EOS on the
    # next prompt's first token (<|observation|>); the empty thought and "\n" + the answer; a trained EOS at the end
    _, served = assert_trained_and_merged(base, recipe, monkeypatch, glm_call, "Glm4MoeForCausalLM", THOUGHT)
    chat = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "",
             "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": json.dumps({"temp": 20})}]
    text = served.apply_chat_template(chat, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    # the generation prompt as LLaMA-Factory's encode_oneturn writes it: the earlier call without its thought
    tools_text = "\n" + json.dumps({"type": "function", "function": TOOLS[0]})
    assert text.startswith("[gMASK]<sop><|system|>\n\n\n# Tools\n\nYou may call one or more functions")
    assert f"<tools>{tools_text}\n</tools>" in text
    assert text.endswith("<|user|>\nWeather in Paris?<|assistant|>" + glm_call("Paris")
                         + '<|observation|>\n{"temp": 20}<|assistant|>'), text

    # no tools renders as GLM-4.5's own template; tools=[] as training renders a tools column of "[]" (LLaMA-Factory's
    # `if system or tools`: an empty system block, <|system|>\n, where the hub's writes none); with a system message
    # too (enable_thinking off is training's, not the hub's /nothink)
    for system in ([], [{"role": "system", "content": "Be brief."}]):
        chat = [*system, {"role": "user", "content": "Weather in Paris?"}]
        hub = hub_rendering(chat)
        assert served.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == hub, system
        empty = served.apply_chat_template(chat, tools=[], add_generation_prompt=True, tokenize=False)
        assert empty == (hub if system else hub.replace("<sop>", "<sop><|system|>\n")), system
    assert hub == "[gMASK]<sop><|system|>\nBe brief.<|user|>\nWeather in Paris?<|assistant|>"


def trained_spans(shown: str) -> list[str]:
    """The trained text of the samples `inspect` prints ([[...]] around trained tokens; its legend before them)."""
    return re.findall(r"\[\[(.*?)\]\]", shown.split("── sample", 1)[1], re.S)


def test_deepseek_r1_and_moonlight_take_tools_and_are_named_for_their_vocabularies(workdir):
    write_tool_data(workdir / "data")
    for name, vocab, own, eos in (("DeepSeek-R1", "deepseek_v3", "deepseek3", "<｜end▁of▁sentence｜>"),
                                  ("Moonlight-16B-A3B-Instruct", "moonlight", "moonlight", "<|im_end|>")):
        base = workdir / name
        save_pretrained_small(base, vocab, "DeepseekV3ForCausalLM", "DeepseekV3Config", ("bos_token_id", "eos_token_id"),
                              **{**DEEPSEEK_TINY, "max_position_embeddings": 1024})
        unset = write_recipe(workdir / f"{vocab}-unset.yaml", model_name_or_path=str(base), dataset="glm_tools",
                             dataset_dir="data", template=None, output_dir=f"saves/{vocab}-unset")
        told = run_main(["plan", str(unset)], workdir).err
        assert f"for this deepseek_v3 model, whose own chat format is template: {own} (" in told, told

        template = "deepseekr1" if vocab == "deepseek_v3" else "moonlight"
        recipe = write_recipe(workdir / f"{vocab}.yaml", model_name_or_path=str(base), dataset="glm_tools",
                              dataset_dir="data", template=template, cutoff_len=1024, val_size=0,
                              output_dir=f"saves/{vocab}")
        shutil.rmtree(workdir / "data" / "build", ignore_errors=True)
        assert run_main(["build", str(recipe)], workdir).code == 0
        shown = run_main(["inspect", str(recipe), "--num", "1"], workdir)
        assert shown.code == 0, shown.err
        thought = THOUGHT if template == "deepseekr1" else ""
        # the call in LLaMA-Factory's default format as an answer (with the EOS), then the answer; nothing else trained
        (call, answer), = [trained_spans(shown.out)]
        city = re.search(r'Action Input: \{"city": "(\w+)"\}', call).group(1)
        assert call == f'{thought}Action: get_weather\nAction Input: {{"city": "{city}"}}{eos}', call
        assert re.fullmatch(f"{thought}It is \\d+ degrees in {city}\\.{re.escape(eos)}", answer), answer
        assert "> Tool Name: get_weather\nTool Description: the weather in a city" in shown.out
    # the preset (the hub's config.json values, no tokenizer here): Moonlight's config names Kimi's vocabulary
    unset = write_recipe(workdir / "preset.yaml", model_name_or_path="moonlight-16b-a3b", dataset="glm_tools",
                         dataset_dir="data", template=None, output_dir="saves/preset")
    told = run_main(["plan", str(unset)], workdir).err
    assert "for this deepseek_v3 model, whose own chat format is template: moonlight (" in told, told
