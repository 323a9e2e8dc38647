"""Stage ppo with the reward models users bring from elsewhere, each as the other tool writes it, as LLaMA-Factory's
llama3_lora_ppo.yaml's `reward_model` (one PPO step through `python -m pipeline train`):

- PEFT's SEQ_CLS LoRA adapter (get_peft_model on AutoModelForSequenceClassification): modules_to_save
  ["classifier", "score"], the head under `base_model.model.score.weight`;
- LLaMA-Factory 0.9.5's stage rm outputs: a causal LM (a CAUSAL_LM LoRA adapter, or the full model) with
  value_head.safetensors beside it (v_head.summary.weight / .bias, its fix_valuehead_checkpoint);
- transformers' LlamaForSequenceClassification save_pretrained folder, pad_token_id unset.

Golden, computed here without the pipeline: step 1's policy is its base (the LoRA starts at B = 0), so the one
response is transformers' greedy continuation (tests/compat/test_ppo_example.greedy_sequence), and the logged
reward is that sequence's score: PEFT's SEQ_CLS model's logit, transformers' XForSequenceClassification's (one
sequence: its last token), or LLaMA-Factory's value head by its formula, v_head.summary(last hidden state) at the
last attended token (train/ppo/trainer.py get_rewards), on transformers' hidden states.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.acceptance.harness import pipeline, write_hf_checkpoint
from tests.compat.test_ppo_example import NEW_TOKENS, PPO, checkout, greedy_sequence, step_one
from tests.reliability.rel_helpers import run_main

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}  # B != 0
FAST = ["bf16=false", "dataloader_num_workers=0", "overwrite_cache=true"]
PPO_OUT = "saves/llama3-8b/lora/ppo"  # the example's output_dir


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """The tiny Llama, the LLaMA-Factory-like working copy, and each reward model as its tool writes it."""
    root = tmp_path_factory.mktemp("reward_models")
    base, work = checkout(root)
    torch.manual_seed(0)
    seq_cls = transformers.AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    seq_cls.save_pretrained(root / "transformers_full")  # its config has no pad_token_id (the base's has none)
    peft.get_peft_model(seq_cls, peft.LoraConfig(task_type="SEQ_CLS", **LORA)).save_pretrained(root / "peft_seq_cls")
    head = {"v_head.summary.weight": torch.randn(1, 32), "v_head.summary.bias": torch.tensor([0.75])}
    causal = transformers.AutoModelForCausalLM.from_pretrained(base)
    causal.save_pretrained(root / "lf_full")
    peft.get_peft_model(causal, peft.LoraConfig(task_type="CAUSAL_LM", **LORA)).save_pretrained(root / "lf_lora")
    for lf in ("lf_full", "lf_lora"):
        safetensors_torch.save_file(head, root / lf / "value_head.safetensors", metadata={"format": "pt"})
    return {"base": base, "work": work, "root": root}


def value_head_score(model: torch.nn.Module, sequence: torch.Tensor, head: Path) -> float:
    """LLaMA-Factory's reward of one unpadded sequence: the value head on transformers' last hidden state (after
    the final norm, TRL's hidden_states[-1]) at the last attended token, the sequence's last."""
    tensors = safetensors_torch.load_file(head)
    with torch.no_grad():
        hidden = model(sequence, output_hidden_states=True).hidden_states[-1][0, -1]
    return float(hidden @ tensors["v_head.summary.weight"][0] + tensors["v_head.summary.bias"][0])


def golden(name: str, root: Path, base: Path) -> float:
    sequence = greedy_sequence(base)
    folder = root / name
    if name == "peft_seq_cls":
        return step_one(base, folder)
    if name == "transformers_full":
        with torch.no_grad():
            return float(transformers.AutoModelForSequenceClassification.from_pretrained(folder)(sequence).logits[0, 0])
    causal = transformers.AutoModelForCausalLM.from_pretrained(base if name == "lf_lora" else folder)
    model = peft.PeftModel.from_pretrained(causal, folder) if name == "lf_lora" else causal
    return value_head_score(model.eval(), sequence, folder / "value_head.safetensors")


def ppo_step(work: Path, reward: Path | str, kind: str, out: str, as_typed: bool, extra: tuple[str, ...] = ()) -> str:
    """One PPO step of the example with `reward` (and the overrides `extra`): as a user types it, or (as_typed False)
    main(argv) in this process, the same command without an interpreter start and torch's import."""
    args = ["train", PPO, "max_steps=1", "dataset=one_prompt", f"max_new_tokens={NEW_TOKENS}",
            "gradient_accumulation_steps=1", "ppo_epochs=1", "logging_steps=1", f"reward_model={reward}",
            f"reward_model_type={kind}", f"output_dir={out}", *FAST, *extra]
    if as_typed:
        return pipeline(*args, cwd=work, timeout=600).stderr
    done = run_main(args, work)
    assert done.code == 0, done.err[-4000:]
    return done.err


@pytest.mark.parametrize("name, kind, scoring", [
    ("peft_seq_cls", "lora", "score head at the last token that is not pad"),
    ("lf_lora", "lora", "value head (LLaMA-Factory's) at the last attended token"),
    ("lf_full", "full", "value head (LLaMA-Factory's) at the last attended token"),
    ("transformers_full", "full", "score head at the last attended token"),
])
def test_a_reward_model_made_elsewhere_scores_as_its_tool_does(folders, name, kind, scoring):
    stderr = ppo_step(folders["work"], folders["root"] / name, kind, f"saves/{name}", as_typed=name == "lf_lora")
    assert f"({kind}), scoring with its {scoring}" in stderr, stderr
    log = [json.loads(line) for line in (folders["work"] / "saves" / name / "trainer_log.jsonl").read_text().splitlines()]
    assert log[0]["kl"] == 0.0  # the policy is its reference: the response is the base's greedy one
    assert log[0]["reward"] == pytest.approx(golden(name, folders["root"], folders["base"]), abs=1e-4)


def test_peft_writes_the_head_names_this_reads(folders):
    """PEFT lists both of its SEQ_CLS head candidates and keeps the one the model has, saved without its
    ModulesToSaveWrapper's `modules_to_save.default` infix: the two facts the loader relies on."""
    adapter = folders["root"] / "peft_seq_cls"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and sorted(config["modules_to_save"]) == ["classifier", "score"]
    keys = safetensors_torch.load_file(adapter / "adapter_model.safetensors")
    assert [k for k in keys if "lora_" not in k] == ["base_model.model.score.weight"]


def recipe_with(work: Path, reward: Path | str, kind: str) -> str:
    """LLaMA-Factory's ppo example naming `reward` (a folder, or a server's URL) in the file (a refusal points at its
    line)."""
    lines = (work / PPO).read_text("utf-8").splitlines()
    text = "\n".join(f"reward_model: {reward}" if line.startswith("reward_model:") else line for line in lines)
    path = work / f"examples/ppo_{kind}_{Path(str(reward)).name}.yaml"
    path.write_text(f"{text}\nreward_model_type: {kind}\n", "utf-8")
    return str(path.relative_to(work))


def refusal_at_reward_model(work: Path, reward: Path | str, kind: str, command: str = "train") -> str:
    recipe = recipe_with(work, reward, kind)
    done = run_main([command, recipe, "max_steps=1", "dataset=one_prompt", *FAST], work)
    assert done.code == 2 and "Traceback" not in done.err, done.err[-4000:]
    line = next(n for n, text in enumerate((work / recipe).read_text().splitlines(), 1)
                if text.startswith("reward_model:"))
    errors = [m for m in done.err.splitlines() if m.startswith("error: ")]
    assert len(errors) == 1 and re.match(rf"error: {re.escape(recipe)}:{line}:\d+: reward_model: ", errors[0]), errors
    return errors[0]


def test_reward_model_mistakes_stop_at_the_key(folders):
    root, work = folders["root"], folders["work"]
    # LLaMA-Factory's lora layout without its value head (a policy's adapter, say): nothing to score with
    bare = root / "no_head"
    shutil.copytree(root / "lf_lora", bare)
    (bare / "value_head.safetensors").unlink()
    assert "holds no value_head.safetensors" in refusal_at_reward_model(work, bare, "lora")
    # a plain causal LM as reward_model_type full: the same
    assert "a language model (no score head)" in refusal_at_reward_model(work, folders["base"], "full")
    # a value head of the wrong size
    wrong = root / "wrong_head"
    shutil.copytree(root / "lf_full", wrong)
    safetensors_torch.save_file({"v_head.summary.weight": torch.zeros(1, 32), "v_head.summary.bias": torch.zeros(2)},
                                wrong / "value_head.safetensors")
    assert "expected LLaMA-Factory's value head" in refusal_at_reward_model(work, wrong, "full")
    # a SEQ_CLS adapter trained on another base (16 wide, the policy is 32)
    other = write_hf_checkpoint(root / "other_base", "llama", small_vocab=True, hidden_size=16, head_dim=4)
    other_rm = transformers.AutoModelForSequenceClassification.from_pretrained(root / "other_base", num_labels=1)
    del other
    peft.get_peft_model(other_rm, peft.LoraConfig(task_type="SEQ_CLS", **LORA)).save_pretrained(root / "other_rm")
    assert "reads 16 hidden values" in refusal_at_reward_model(work, root / "other_rm", "lora")


CLEAN_UP_PROMPT = "Hi , I do n't know ."  # what transformers 4's clean_up_tokenization changes: " ,", " n't", " ."


def clean_up_checkout(folders: dict[str, Path]) -> Path:
    """A copy of the tiny Llama whose tokenizer_config.json says clean_up_tokenization_spaces true, as Meta's Llama 3
    files do, and a dataset clean_up_prompt whose rows ask CLEAN_UP_PROMPT; returns the copy."""
    base, work = folders["root"] / "llama_clean_up", folders["work"]
    if not base.exists():
        shutil.copytree(folders["base"], base)
        config = json.loads((base / "tokenizer_config.json").read_text("utf-8"))
        (base / "tokenizer_config.json").write_text(json.dumps({**config, "clean_up_tokenization_spaces": True}))
        rows = [{"instruction": CLEAN_UP_PROMPT, "input": "", "output": f"hi {i}"} for i in range(8)]
        (work / "data/clean_up_prompt.json").write_text(json.dumps(rows), "utf-8")
        registry = json.loads((work / "data/dataset_info.json").read_text("utf-8"))
        registry["clean_up_prompt"] = {"file_name": "clean_up_prompt.json"}
        (work / "data/dataset_info.json").write_text(json.dumps(registry), "utf-8")
    return base


def test_a_reward_server_scores_the_text_transformers_decodes(folders):
    """reward_model_type api, as LLaMA-Factory 0.9.5 asks a reward server (train/ppo/trainer.py get_rewards:
    `tokenizer.batch_decode(query + response, skip_special_tokens=False)`, then ppo_utils.py get_rewards_from_server:
    POST {"model": "model", "messages": [...]}, read `scores`), the LLaMA-Factory example with its reward_model
    pointed at a local server, 2 mini-batches of 1 row, ppo_score_norm on, on a Llama whose tokenizer_config.json
    says clean_up_tokenization_spaces true (Meta's files do) and a prompt with " ," " n't" " .". Golden: step 1's
    response is the base's greedy one (greedy_sequence), so each row's text is transformers' batch_decode of that
    sequence as transformers 4 gives it (LLaMA-Factory's PPO needs TRL 0.8.6-0.9.6, released for transformers 4): with the
    checkpoint's clean_up_tokenization applied, which transformers 5 skips for a BPE tokenizer unless told
    clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output; and the server scores a text by its
    length (length_score): the logged reward is that, by hand, and the score moments are TRL's over the step's two
    scores. One request per mini-batch (LLaMA-Factory's per_device_train_batch_size), after the one GET of train's
    check that the server answers. The adapter loads in PEFT, the value head beside it."""
    from tests.helpers.reward_server import ScoringServer, length_score
    from tests.model.test_ppo_math import trl_score_norm

    base, work = clean_up_checkout(folders), folders["work"]
    sequence = greedy_sequence(base, CLEAN_UP_PROMPT)
    as_t5 = transformers.AutoTokenizer.from_pretrained(base).batch_decode(sequence, skip_special_tokens=False)[0]
    text = transformers.AutoTokenizer.from_pretrained(
        base, clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output=True,
    ).batch_decode(sequence, skip_special_tokens=False)[0]
    assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi, I don't know.<|eot_id|>")
    assert as_t5 != text  # what the server got before: transformers 5's text
    with ScoringServer() as server:
        stderr = ppo_step(work, server.url, "api", "saves/api", as_typed=True,
                          extra=("gradient_accumulation_steps=2", "ppo_score_norm=true", f"model_name_or_path={base}",
                                 "dataset=clean_up_prompt"))
    assert f"ppo: reward_model {server.url} (api), scoring with the server's scores" in stderr, stderr
    assert server.gets == ["/score"]
    assert server.posts == [{"path": "/score", "content_type": "application/json",
                             "body": {"model": "model", "messages": [text]}}] * 2
    run = folders["work"] / "saves/api"
    log = [json.loads(line) for line in (run / "trainer_log.jsonl").read_text().splitlines()]
    assert log[0]["kl"] == 0.0 and log[0]["reward"] == pytest.approx(length_score(text), rel=1e-6)
    moments = json.loads((run / "checkpoint-1/trainer_state.json").read_text())["objective"]["score_moments"]
    assert moments == pytest.approx(trl_score_norm([[length_score(text)] * 2])[1], rel=1e-6)
    assert set(safetensors_torch.load_file(run / "adapter/value_head.safetensors")) == {"v_head.summary.weight",
                                                                                        "v_head.summary.bias"}
    peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), run / "adapter")


def test_reward_server_mistakes_stop_with_one_message(folders):
    """A URL of another form stops validate at the reward_model line; a server that refuses the connection stops
    train there too, before anything is written; a server whose reply is no list of scores (or an HTTP error) stops
    train at its first reward: exit 2, one message naming the URL and the reply, no traceback, no checkpoint and no
    weights (only the files a run writes as it starts, which the next run there replaces)."""
    from pipeline.runtime.layout import RunLayout
    from tests.helpers.reward_server import ScoringServer, refusing_url

    work = folders["work"]
    said = refusal_at_reward_model(work, "localhost:8000/score", "api", command="validate")
    assert "given 'localhost:8000/score' (scheme 'localhost') with reward_model_type api (did you mean " \
           "'http://localhost:8000/score'?)" in said, said
    with refusing_url() as url:
        said = refusal_at_reward_model(work, url, "api")
    assert f"the reward server {url} does not answer (ConnectionRefusedError" in said, said
    assert not (work / PPO_OUT).exists()
    for reply, what in (((200, b'{"score": [1.0]}'), 'answered HTTP 200, but its body has no list "scores": '
                                                     "'{\"score\": [1.0]}'"),
                        ((503, b"overloaded"), "answered HTTP 503 Service Unavailable: 'overloaded'")):
        with ScoringServer(reply=lambda messages, reply=reply: reply) as server:
            done = run_main(["train", recipe_with(work, server.url, "api"), "max_steps=1", "dataset=one_prompt",
                             f"max_new_tokens={NEW_TOKENS}", "gradient_accumulation_steps=1", "ppo_epochs=1",
                             "overwrite_output_dir=true", *FAST], work)
        assert done.code == 2 and "Traceback" not in done.err, done.err[-4000:]
        errors = [line for line in done.err.splitlines() if line.startswith("error: ")]
        assert errors == [f"error: reward_model: the reward server {server.url} {what}, asked to score 1 message; "
                          "expected HTTP 2xx and a JSON body {\"scores\": [...]} with one finite number per message, "
                          "in their order, as LLaMA-Factory's PPO reads it (docs/ppo.md#a-reward-server); check that "
                          "the server runs, that reward_model is its scoring route, and the server's log"], errors
        assert len(server.posts) == 1
        leftover = sorted(p.name for p in (work / PPO_OUT).iterdir())
        assert leftover and RunLayout(work / PPO_OUT).unfinished_start() == leftover, leftover


def test_a_transformers_reward_model_with_a_pad_id_scores_a_padded_batch_as_transformers(tmp_path):
    """Qwen2ForSequenceClassification saved with pad_token_id: our scorer pools at transformers' token (the
    rightmost that is not the pad) on a right-padded batch of two, where transformers itself scores the batch."""
    from pipeline.train.ppo import load_reward_model

    write_hf_checkpoint(tmp_path / "qwen", "qwen2", small_vocab=True)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "qwen", num_labels=1)
    model.config.pad_token_id = 5
    model.save_pretrained(tmp_path / "rm")
    ids = torch.tensor([[3, 17, 42, 99, 120, 7], [3, 17, 42, 5, 5, 5]])  # the second: 3 tokens, then padding
    mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0]])
    scorer = load_reward_model(str(tmp_path / "rm"), "full", None, "cpu", torch.float32, pad_id=0)
    with torch.no_grad():
        expected = model.eval()(ids, attention_mask=mask).logits[:, 0]
        assert scorer.pad_id == 5
        torch.testing.assert_close(scorer(ids, mask), expected, atol=1e-5, rtol=1e-5)


def test_only_peft_s_own_seq_cls_head_names_may_match_nothing():
    """PEFT's two SEQ_CLS head candidates are skipped where the model has no such module (PEFT's _set_trainable does
    so for any name); another name that matches nothing still reaches select_modules, which refuses it."""
    from pipeline.model.adapter import saved_modules

    model = torch.nn.Module()
    model.score = torch.nn.Linear(4, 1, bias=False)
    listed = {"task_type": "SEQ_CLS", "modules_to_save": ["classifier", "score", "scroe"]}
    assert saved_modules(model, listed) == ["score", "scroe"]
    assert saved_modules(model, {**listed, "task_type": "CAUSAL_LM"}) == ["classifier", "score", "scroe"]
