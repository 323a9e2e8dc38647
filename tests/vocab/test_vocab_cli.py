"""The user's path with a checkpoint's own tokenizer: a transformers-written checkpoint with Qwen3's vocabulary,
by directory and by hub id from an offline Hugging Face cache, through `python -m pipeline build / validate /
inspect`; wrong templates and uncached hub ids exit 2 with one message.

Each command runs as typed at least once, the hub id's too; the further builds and validates run main(argv) in this
process (cli(..., as_typed=False); pipeline.model.hub reads HF_HOME from the environment at call time)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.helpers.hf_vocab import write_tokenizer_dir
from tests.helpers.hub_layout import hub_cache


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """GPT2LMHeadModel.save_pretrained with Qwen3's 151,936-row embedding, plus Qwen3's tokenizer files."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("ckpt") / "qwen3-vocab-gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=151936, n_positions=128, n_embd=16, n_layer=1, n_head=2)).save_pretrained(d)
    return write_tokenizer_dir(d, "qwen3")


def project(tmp_path: Path, model: str, template: str) -> Path:
    conv = [{"conversations": [{"from": "human", "value": f"Hello {i}? <|im_end|>"},
                               {"from": "gpt", "value": f"Hi {i}."}]} for i in range(10)]
    (tmp_path / "data" / "raw").mkdir(parents=True)
    (tmp_path / "data" / "raw" / "chat.json").write_text(json.dumps(conv, ensure_ascii=False))
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps(
        {"chat": {"file_name": "raw/chat.json", "formatting": "sharegpt"}}))
    (tmp_path / "recipe.yaml").write_text(f"model_name_or_path: {model}\ndataset_dir: data\ndataset: chat\n"
                                          f"template: {template}\ncutoff_len: 64\nnum_train_epochs: 1\n")
    return tmp_path / "recipe.yaml"


def cli(tmp_path: Path, *args: str, as_typed: bool = True, **env: str) -> subprocess.CompletedProcess:
    """`python -m pipeline ARGS` in tmp_path from a user's offline shell (no launcher variables, NO_COLOR, `env`),
    any exit code; as_typed=False: in this process (harness.pipeline)."""
    from tests.acceptance.harness import cli_env, pipeline

    return pipeline(*args, cwd=tmp_path, expect=None, env=cli_env(NO_COLOR="1", HF_HUB_OFFLINE="1", **env),
                    as_typed=as_typed)


def test_build_validate_inspect_with_the_checkpoints_tokenizer(tmp_path, checkpoint):
    project(tmp_path, str(checkpoint), "qwen3")
    for command in ("build", "validate"):
        done = cli(tmp_path, command, "recipe.yaml")
        assert done.returncode == 0, done.stderr
    done = cli(tmp_path, "inspect", "recipe.yaml", "--num", "1")
    assert done.returncode == 0, done.stderr
    assert "<|im_end|> is EOS (id 151645)" in done.stdout
    # the user's "<|im_end|>" is text, the template's is the token; the empty thought opens the trained response
    assert "<|im_start|>user\nHello " in done.stdout and "? <|im_end|><|im_end|>\n<|im_start|>assistant\n[[" \
        "<think>\n\n</think>\n\nHi " in done.stdout and ".<|im_end|>\n]]" in done.stdout


@pytest.mark.slow  # the rule itself: tests/data/test_data_templates.py, in-process
def test_a_template_the_checkpoint_cannot_express_exits_2(tmp_path, checkpoint):
    project(tmp_path, str(checkpoint), "llama3")
    assert cli(tmp_path, "build", "recipe.yaml", as_typed=False).returncode == 0
    done = cli(tmp_path, "validate", "recipe.yaml")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "template: 'llama3' needs the special tokens <|start_header_id|>, <|end_header_id|>, <|eot_id|>" \
        in done.stderr and "qwen3" in done.stderr


def test_a_hub_id_resolves_from_the_offline_cache(tmp_path, checkpoint):
    home = tmp_path / "hf"
    hub_cache(home, "Org/Tiny-Qwen", checkpoint)
    project(tmp_path, "Org/Tiny-Qwen", "qwen3_nothink")
    for command in ("build", "validate"):
        done = cli(tmp_path, command, "recipe.yaml", HF_HOME=str(home), as_typed=False)
        assert done.returncode == 0, done.stderr
    done = cli(tmp_path, "inspect", "recipe.yaml", "--num", "1", HF_HOME=str(home))
    assert done.returncode == 0, done.stderr
    assert "<|im_start|>assistant\n[[Hi " in done.stdout


def test_an_uncached_hub_id_offline_says_what_to_run(tmp_path):
    project(tmp_path, "Org/Not-Cached", "qwen3")
    assert cli(tmp_path, "build", "recipe.yaml", HF_HOME=str(tmp_path / "hf"), as_typed=False).returncode == 0
    done = cli(tmp_path, "validate", "recipe.yaml", HF_HOME=str(tmp_path / "hf"),  # data checks need no weights
               as_typed=False)
    assert done.returncode == 0 and "token lengths need the tokenizer of Org/Not-Cached" in done.stdout, done.stderr
    done = cli(tmp_path, "train", "recipe.yaml", HF_HOME=str(tmp_path / "hf"))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "'Org/Not-Cached' is neither a local directory nor a cached hub snapshot (HF_HUB_OFFLINE=1" in done.stderr
    assert "hf download Org/Not-Cached --include 'config.json'" in done.stderr


def test_resolve_model_path_in_process(tmp_path, monkeypatch, checkpoint):
    from pipeline.errors import UserError
    from pipeline.model.hub import resolve_model_path

    snapshot = hub_cache(tmp_path / "hf", "Org/Tiny", checkpoint)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_path("Org/Tiny") == snapshot
    assert resolve_model_path(str(checkpoint)) == checkpoint  # a local directory is returned as it is
    with pytest.raises(UserError, match="adapter_name_or_path: 'Org/Adapter' is neither"):
        resolve_model_path("Org/Adapter", key="adapter_name_or_path")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(UserError, match=r"it is not in .*hf/hub"):  # plan/validate: cache only, no download
        resolve_model_path("Org/Other", download=False)


def test_an_adapter_hub_id_resolves_from_the_offline_cache(tmp_path):
    """adapter_name_or_path: Org/Name (a PEFT adapter in the HF cache) through `generate`, as PEFT generates."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_positions=64, n_embd=16, n_layer=2, n_head=2)).save_pretrained(tmp_path / "base")
    peft = get_peft_model(GPT2LMHeadModel.from_pretrained(tmp_path / "base"),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
                                     init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    hub_cache(tmp_path / "hf", "Org/Tiny-Adapter", tmp_path / "adapter")
    (tmp_path / "r.yaml").write_text(f"model_name_or_path: {tmp_path / 'base'}\nadapter_name_or_path: Org/Tiny-Adapter\n"
                                     "lora_rank: 4\nlora_alpha: 8\nlora_target: c_attn\nmax_new_tokens: 6\n"
                                     f"output_dir: {tmp_path / 'out'}\n")
    done = cli(tmp_path, "generate", "r.yaml", "--model", "adapter", "--raw", "--prompt", "The sky is",
               HF_HOME=str(tmp_path / "hf"))
    assert done.returncode == 0, done.stderr
    reference = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / "base"), tmp_path / "adapter").eval()
    prompt = [464, 6766, 318]  # "The sky is" in GPT-2's vocabulary
    with torch.no_grad():
        new = reference.generate(input_ids=torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                                 pad_token_id=50256)[0, 3:].tolist()
    from pipeline.data.tokenizer import gpt2

    assert gpt2().encode("The sky is") == prompt
    assert done.stdout == gpt2().decode([t for t in new if t != 50256]) + "\n"


def test_default_system_replaces_the_templates_system_prompt(tmp_path, checkpoint):
    """LLaMA-Factory's default_system (template.default_system = data_args.default_system): the system prompt of
    rows without their own, in what the trainer sees; "" drops Qwen's default. It was refused as unsupported."""
    from tests.reliability.rel_helpers import run_main  # in-process: the subprocess path is the test above's

    project(tmp_path, str(checkpoint), "qwen")
    assert run_main(["build", "recipe.yaml"], tmp_path).code == 0
    qwens = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    assert qwens in run_main(["inspect", "recipe.yaml", "--num", "1"], tmp_path).out
    done = run_main(["inspect", "recipe.yaml", "--num", "1", "default_system=Be brief."], tmp_path)
    assert done.code == 0, done.err
    assert "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello " in done.out, done.out
    assert "You are Qwen" not in done.out
    done = run_main(["inspect", "recipe.yaml", "--num", "1", 'default_system=""'], tmp_path)
    assert done.code == 0 and "<|im_start|>system" not in done.out, done.out + done.err
