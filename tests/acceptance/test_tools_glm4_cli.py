"""The agent fine-tune of a GLM-4 through the CLI: LLaMA-Factory-format function-calling data as users bring it (a
sharegpt dataset_info.json entry with a `tools` column; each conversation a question, a function_call, its observation
and the answer) and a Glm4ForCausalLM as transformers' save_pretrained writes it with a small byte-level tokenizer
holding GLM's special tokens (test_glm4_cli's checkpoint) -> a LoRA sft recipe with template glm4 -> build / train /
merge as typed. The rows training read train exactly the call and the answer, with glm4's efficient_eos labels
(counted by hand below from LLaMA-Factory's glm4 strings, template.py:1081-1092, GLM4ToolUtils.function_formatter,
tool_utils.py:388-394, and processor/supervised.py:68-104); merged/ loads in transformers and its chat template serves
the conversation (`tools=`, `tool_calls`, a "tool" message) with training's ids.

Failed before: glm4 refused function-calling data (build exited 2 on the tools column)."""
from __future__ import annotations

import json

from tests.acceptance.harness import cli_env, pipeline, save_pretrained_small, write_recipe
from tests.acceptance.test_glm4_cli import TINY

CITIES = ("Paris", "Rome", "Oslo", "Bern", "Riga", "Lima")
TOOLS = [{"name": "get_weather", "description": "the weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "the city"}},
                         "required": ["city"]}}]
M = -100


def call(city: str) -> str:
    return json.dumps({"name": "get_weather", "arguments": {"city": city}})


def conversation(k: int, city: str) -> list[dict]:
    """A question, the call, its result, the answer (LLaMA-Factory's sharegpt tags)."""
    turns = [("human", f"Weather in {city}?"), ("function_call", call(city)), ("observation", json.dumps({"temp": 20 + k})),
             ("gpt", f"It is {20 + k} degrees in {city}.")]
    return [{"from": tag, "value": value} for tag, value in turns]


def write_tool_data(data) -> None:
    """dataset glm_tools: LLaMA-Factory's sharegpt format with its tools column (a JSON string, as in its
    glaive_toolcall demo)."""
    rows = [{"conversations": conversation(k, city), "tools": json.dumps(TOOLS)} for k, city in enumerate(CITIES)]
    (data / "raw" / "tools.json").write_text(json.dumps(rows), encoding="utf-8")
    entry = {"file_name": "raw/tools.json", "formatting": "sharegpt",
             "columns": {"messages": "conversations", "tools": "tools"}}
    registry = {**json.loads((data / "dataset_info.json").read_text()), "glm_tools": entry}
    (data / "dataset_info.json").write_text(json.dumps(registry), encoding="utf-8")


def glm_tool_recipe(base, model_class: str, tiny: dict, template: str):
    """A GLM checkpoint of `model_class` in `base` (test_glm4_cli's tokenizer), the tool data beside it (data/), and a
    one-step LoRA sft recipe on them with `template`: (base, recipe)."""
    save_pretrained_small(base, "glm4", model_class, model_class.replace("ForCausalLM", "Config"),
                          ("eos_token_id", "pad_token_id"), **{**tiny, "max_position_embeddings": 1024})
    write_tool_data(base.parent / "data")
    recipe = write_recipe(base.parent / "r.yaml", model_name_or_path=str(base), dataset="glm_tools", dataset_dir="data",
                          template=template, cutoff_len=1024, val_size=0, max_steps=1, output_dir="saves/r")
    return base, recipe


def assert_trained_and_merged(base, recipe, monkeypatch, call_text, architecture: str, thought: str = ""):
    """Every row trains its call (`call_text(city)`, after `thought`), the EOS label on the next prompt's first token
    (efficient_eos), then `thought`, "\n" and the answer, and a trained EOS; merged/ loads as `architecture`.
    Returns the train batches and merged/'s tokenizer."""
    import transformers

    workdir = recipe.parent
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    eos = tokenizer.eos_token_id

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    want = sorted(encode(thought) + encode(call_text(city)) + [eos] + encode(thought)
                  + encode(f"\nIt is {20 + k} degrees in {city}.") + [eos] for k, city in enumerate(CITIES))
    got, relabelled, batches = trained_rows(recipe, workdir, monkeypatch, tokenizer)
    assert got == want and relabelled == len(CITIES)
    merged = workdir / "saves/r/merged"
    assert type(transformers.AutoModelForCausalLM.from_pretrained(merged)).__name__ == architecture
    return batches, transformers.AutoTokenizer.from_pretrained(merged)


def trained_rows(recipe, workdir, monkeypatch, tokenizer) -> tuple[list[list[int]], int, list[dict]]:
    """What training reads (the recipe's train loader, as train builds it): every row's trained labels (sorted), how
    many <|observation|> tokens carry the EOS label (GLM's efficient_eos), and the batches."""
    from pipeline.data.loaders import make_loader
    from pipeline.recipe import resolve
    from pipeline.recipe.args import data_args

    eos, observation = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|observation|>")
    monkeypatch.chdir(workdir)
    batches = list(make_loader(data_args(resolve(str(recipe), [], command="train", env=cli_env(WORLD_SIZE="1"))),
                               "train", rank=0, world_size=1, shuffle=False))
    got, relabelled = [], 0
    for batch in batches:
        for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
            got.append([y for y in labels if y != M])
            relabelled += sum(1 for t, y in zip(ids[1:], labels[:-1]) if t == observation and y == eos)
    return sorted(got), relabelled, batches


def test_lora_sft_on_function_calling_data_with_glm4(workdir, monkeypatch):
    base, recipe = glm_tool_recipe(workdir / "GLM-4-9B-0414", "Glm4ForCausalLM", TINY, "glm4")
    for stage in ("build", "train", "merge"):
        pipeline(stage, recipe, cwd=workdir)

    # every row's trained labels, by hand: glm4 writes the call right after <|assistant|> as "name\narguments" (no
    # end token: efficient_eos), the next prompt's first token (<|observation|>) is labelled with the EOS, the answer
    # follows <|assistant|> after a newline, and a trained EOS ends the row; the tools text, the question and the
    # tool result are not trained
    batches, served = assert_trained_and_merged(base, recipe, monkeypatch, lambda city: f'get_weather\n{{"city": "{city}"}}',
                                                "Glm4ForCausalLM")
    eos = served.eos_token_id
    chat = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "",
             "tool_calls": [{"type": "function", "function": json.loads(call("Paris"))}]},
            {"role": "tool", "content": json.dumps({"temp": 20})},
            {"role": "assistant", "content": "It is 20 degrees in Paris."}]
    ids = served.apply_chat_template(chat, tools=TOOLS, add_generation_prompt=False)["input_ids"]
    rows = [r[:sum(mask)] for b in batches for r, mask in zip(b["input_ids"].tolist(), b["attention_mask"].tolist())]
    # the Paris row as training read it (the loader's inputs stop before the last target, the final EOS)
    assert ids[:-1] in rows and ids[-1] == eos
    text = served.decode(ids)
    assert text.startswith("[gMASK]<sop><|system|>\n你是一个名为 ChatGLM 的人工智能助手") and \
        '<|assistant|>get_weather\n{"city": "Paris"}<|observation|>\n{"temp": 20}<|assistant|>\nIt is 20' in text
