"""The user's path for a Llama 3 *base* tuned on the llama3 template: a transformers-written LlamaForCausalLM with
the real Llama 3 vocabulary and the base's configs (eos <|end_of_text|>), `python -m pipeline build / train /
merge` (LoRA and full), then the export in transformers: its tokenizer's eos_token is <|eot_id|>, where each
trained answer ends, and generation stops there, whether a tool reads generation_config.json or only the
tokenizer's EOS (TGI, transformers pipelines, LLaMA-Factory's chat). The rule, LLaMA-Factory's replace_eos, is
tested per template in tests/vocab/test_export_eos_token.py; GPT-2's alpaca export keeps <|endoftext|>
(tests/test_merge.py::test_merge_cli_writes_the_recipes_chat_template).

The LoRA run types build, train and merge; the full run types train (and export) and runs build and merge as
main(argv) in this process (harness.pipeline as_typed=False: the same command line and files, without an interpreter
start and torch's import).

A full run's model/ is also exported LLaMA-Factory's way (`python -m pipeline export` with model_name_or_path:
output_dir): the export says what merge's does.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.acceptance.harness import always_answer, pipeline, write_data, write_hf_checkpoint, write_recipe

transformers = pytest.importorskip("transformers")

# Meta's published Llama 3 ids
END_OF_TEXT, EOM, EOT = 128001, 128008, 128009


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """data/ and base/: a Llama 3 base checkpoint (config.json eos_token_id 128001, as meta-llama/Llama-3.2-1B
    ships it; untied head) whose every next token is <|eot_id|> (harness.always_answer), so that where generation
    stops shows."""
    root = tmp_path_factory.mktemp("export_eos")
    write_data(root / "data")
    model = write_hf_checkpoint(root / "base", "llama", instruct=False, eos_token_id=END_OF_TEXT,
                                tie_word_embeddings=False)
    always_answer(model, EOT).save_pretrained(root / "base", safe_serialization=True)
    return root


def answers(export: Path) -> tuple[list[int], list[int]]:
    """transformers' greedy answers of the export to one chat turn (its own chat template and tokenizer): with its
    generation_config.json, and stopping at the tokenizer's eos_token only, as tools that read no
    generation_config.json do."""
    tok = transformers.AutoTokenizer.from_pretrained(export)
    model = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "Say red"}], add_generation_prompt=True,
                                  return_dict=True, return_tensors="pt")
    tokenizer_only = transformers.GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=END_OF_TEXT,
                                                   max_new_tokens=4, do_sample=False)
    return tuple(model.generate(**ids, generation_config=config)[0, ids["input_ids"].shape[1]:].tolist()
                 for config in (None, tokenizer_only))


@pytest.mark.parametrize("kind", ["lora", pytest.param("full", marks=pytest.mark.slow)])
def test_the_export_of_a_llama3_base_tuned_on_llama3_ends_answers_at_eot(workdir, kind):
    recipe = write_recipe(workdir / f"{kind}.yaml", model_name_or_path="base", dataset_dir="data", template="llama3",
                          output_dir=f"saves/{kind}", finetuning_type=kind, max_steps=1, max_new_tokens=4)
    for command in ("build", "train", "merge"):  # the full run's build and merge in this process (LoRA's typed them)
        pipeline(command, recipe, cwd=workdir, as_typed=command == "train" or kind == "lora")
    merged = workdir / f"saves/{kind}/merged"
    tok = transformers.AutoTokenizer.from_pretrained(merged)
    assert (tok.eos_token, tok.eos_token_id) == ("<|eot_id|>", EOT)
    assert transformers.AutoConfig.from_pretrained(merged).eos_token_id == END_OF_TEXT  # the base's own
    assert transformers.GenerationConfig.from_pretrained(merged).eos_token_id == [EOT, EOM, END_OF_TEXT]
    assert answers(merged) == ([EOT], [EOT])  # with the base's eos_token the second ran on to max_new_tokens
    if kind == "full":  # model/ exported LLaMA-Factory's way says what merge's export of it says
        (workdir / "export.yaml").write_text("model_name_or_path: saves/full\ntemplate: llama3\nexport_dir: exported\n"
                                             "max_new_tokens: 4\n")
        pipeline("export", "export.yaml", cwd=workdir)
        for name in ("generation_config.json", "tokenizer_config.json", "special_tokens_map.json"):
            assert json.loads((workdir / "exported" / name).read_text()) == json.loads((merged / name).read_text())
