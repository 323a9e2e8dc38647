"""The user's path for Llama 3 and Qwen3: a save_pretrained checkpoint with its real tokenizer files ->
`python -m pipeline build / train (LoRA sft) / merge / generate`; transformers (merged/, AutoTokenizer) and PEFT
(base + adapter/) generate exactly what we generate, token for token, and merged/'s chat template prompts the
model as training did. The run also trains the embedding and the
head in full, named as LLaMA-Factory recipes do when tokens are added (`additional_target: embed_tokens,lm_head`):
on the tied Llama checkpoint they are one matrix, which PEFT must tie again when it loads adapter/.

The checkpoints come from the harness (tests/acceptance/harness.py FAMILIES: 2 layers, GQA, Llama 3.1's rope
scaling, Qwen3's q/k norms and head_dim, the real 128k / 152k vocabularies).

Each family's build, train, merge and its base model's generate run as typed; the adapter's and merged/'s generate
(and the templated one) run main(argv) in this process (as_typed=False: the same command line without an
interpreter start; generate keeps no process state: its sampling generator is private, no torch.distributed).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.acceptance.harness import pipeline, write_data, write_recipe

PROMPT = "Repeat the words: red river"
NEW_TOKENS = 8
TEMPLATES = {"llama": "llama3", "qwen3": "qwen3_nothink"}


@pytest.fixture(scope="module", params=["llama", pytest.param("qwen3", marks=pytest.mark.slow)])
def session(request, tmp_path_factory, hf_checkpoint) -> tuple[str, Path]:
    """(family, workdir) with data/, the checkpoint at base/ (conftest's, shared), one LoRA run trained and merged."""
    family = request.param
    root = tmp_path_factory.mktemp(f"session_{family}")
    write_data(root / "data")
    write_base_with_chat_template(hf_checkpoint(family), root / "base")
    recipe = write_recipe(root / "lora.yaml", model_name_or_path=str(root / "base"), dataset_dir="data",
                          template=TEMPLATES[family], output_dir="saves/lora", max_new_tokens=NEW_TOKENS,
                          learning_rate=0.05, additional_target="embed_tokens,lm_head")
    pipeline("build", recipe, cwd=root)
    pipeline("train", recipe, cwd=root)
    pipeline("merge", recipe, cwd=root)
    return family, root


SAMPLING = {"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95}
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"


def write_base_with_chat_template(checkpoint: Path, base: Path) -> None:
    """The shared checkpoint's weights, and its tokenizer re-saved by transformers with a chat template: current
    transformers writes the template to chat_template.jinja, a file of its own, as hub checkpoints now ship it."""
    import transformers

    base.mkdir()
    for item in checkpoint.iterdir():
        if item.name.endswith(".safetensors") or item.name == "config.json":
            (base / item.name).symlink_to(item)
    generation = json.loads((checkpoint / "generation_config.json").read_text())
    (base / "generation_config.json").write_text(json.dumps({**generation, **SAMPLING}))  # as Qwen3 ships it
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(base)
    assert (base / "chat_template.jinja").is_file()


def test_the_exports_are_the_family_layout(session):
    family, root = session
    out = root / "saves/lora"
    config = json.loads((out / "merged" / "config.json").read_text())
    assert config["architectures"] == [{"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}[family]]
    assert (out / "merged" / "tokenizer.json").read_bytes() == (root / "base" / "tokenizer.json").read_bytes()
    # the base's chat template (in chat_template.jinja, which transformers reads first) gave way to the recipe's
    assert not (out / "merged" / "chat_template.jinja").exists()
    written = json.loads((out / "merged" / "tokenizer_config.json").read_text())["chat_template"]
    assert written != CHAT_TEMPLATE and f"the '{TEMPLATES[family]}' template" in written
    generation = json.loads((out / "merged" / "generation_config.json").read_text())
    base = json.loads((root / "base" / "generation_config.json").read_text())
    assert {k: generation[k] for k in SAMPLING} == SAMPLING  # the base's sampling defaults, not the recipe's
    assert generation["max_new_tokens"] == NEW_TOKENS  # set in the recipe: it wins
    assert generation["eos_token_id"] == base["eos_token_id"] and generation["bos_token_id"] == base["bos_token_id"]
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["fan_in_fan_out"] is False
    assert set(adapter["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"}


_GENERATED: dict[tuple[Path, str], str] = {}


def generated(root: Path, which: str) -> str:
    """`python -m pipeline generate --model WHICH --raw --prompt PROMPT` of the session (run once per model; the
    base model's as typed, the others in-process)."""
    if (root, which) not in _GENERATED:
        _GENERATED[root, which] = pipeline("generate", root / "lora.yaml", "--model", which, "--raw", "--prompt",
                                           PROMPT, cwd=root, as_typed=which == "base").stdout
    return _GENERATED[root, which]


def greedy_text(model, tokenizer, stop_ids: set[int], prompt_ids: list[int] | None = None) -> str:
    """transformers' greedy continuation of PROMPT (no BOS: --raw sends the text as is), or of prompt_ids, cut
    before a stop id."""
    x = torch.tensor([prompt_ids or tokenizer.encode(PROMPT, add_special_tokens=False)])
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=sorted(stop_ids),
                             pad_token_id=sorted(stop_ids)[0])[0, x.shape[1]:].tolist()
    cut = next((i for i, t in enumerate(out) if t in stop_ids), len(out))
    return tokenizer.decode(out[:cut], skip_special_tokens=False)


@pytest.mark.parametrize("which", ["base", "adapter", "merged"])
def test_generate_agrees_with_transformers_and_peft_token_for_token(session, which):
    import peft
    import transformers

    family, root = session
    out = root / "saves/lora"
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "merged")  # the files merge wrote
    stops = json.loads((out / "merged" / "generation_config.json").read_text())["eos_token_id"]
    stop_ids = set(stops if isinstance(stops, list) else [stops])
    if which == "merged":
        reference = transformers.AutoModelForCausalLM.from_pretrained(out / "merged")
    else:
        reference = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
        if which == "adapter":
            reference = peft.PeftModel.from_pretrained(reference, out / "adapter")
    expected = greedy_text(reference.eval(), tokenizer, stop_ids)
    assert generated(root, which) == expected + "\n"


def test_peft_adapter_and_transformers_merged_compute_the_same_logits(session):
    """adapter/ in PEFT on the base and merged/ in transformers: the same model, embedding and head included (a
    tied head left on the base embedding by PEFT differed by ~0.2 relative before ensure_weight_tying)."""
    import peft
    import transformers

    family, root = session
    out = root / "saves/lora"
    tied = json.loads((root / "base" / "config.json").read_text())["tie_word_embeddings"]
    assert tied is (family == "llama")
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["modules_to_save"] == ["model.embed_tokens", "lm_head"]
    assert adapter.get("ensure_weight_tying", False) is tied
    base = transformers.AutoModelForCausalLM.from_pretrained(root / "base").eval()
    x = torch.tensor([list(range(5, 60, 3))])
    with torch.no_grad():
        before = base(x).logits
        tuned = peft.PeftModel.from_pretrained(base, out / "adapter").eval()(x).logits
        merged = transformers.AutoModelForCausalLM.from_pretrained(out / "merged").eval()(x).logits
    assert (tuned - merged).abs().max() <= 1e-4 * merged.abs().max()
    assert (merged - before).abs().max() > 1e-2 * before.abs().max()


def test_the_tuned_model_generates_otherwise_than_the_base(session):
    _, root = session
    assert generated(root, "base") != generated(root, "merged")


def test_the_merged_chat_template_prompts_as_generate_does(session):
    """transformers on merged/ with its chat template (apply_chat_template, add_generation_prompt) is given the ids
    training and `generate` use, and greedily answers what `python -m pipeline generate --model merged` prints."""
    import transformers

    from pipeline.data.model_tokenizer import load_tokenizer
    from pipeline.data.templates import get_template
    from pipeline.data.tokenize import encode_prompt

    family, root = session
    merged = root / "saves/lora/merged"
    template, ours = get_template(TEMPLATES[family]), load_tokenizer(root / "base")
    tokenizer = transformers.AutoTokenizer.from_pretrained(merged)
    chat = [{"role": "user", "content": PROMPT}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True)["input_ids"]
    assert ids == encode_prompt(template, PROMPT, tokenizer=ours)
    model = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    expected = greedy_text(model, tokenizer, set(template.stop_ids(ours)), prompt_ids=ids)
    got = pipeline("generate", root / "lora.yaml", "--model", "merged", "--prompt", PROMPT, cwd=root,
                   as_typed=False).stdout
    assert got == expected + "\n"
