"""Stage ppo's batch plumbing (pipeline.train.ppo): the prompt of an sft row, the rollout batch's shifted labels,
generation keeping the stop token and repeating itself under a seed, and a PPO step of ppo_buffer_size 2 making the
updates TRL 0.9.6's step() makes."""
from __future__ import annotations

import pytest
import torch

from pipeline.model.generate import generate
from pipeline.model.gpt import GPTModel
from pipeline.model.weights import PRESETS
from pipeline.train.ppo import prompt_ids, sequences


def test_prompt_is_everything_before_the_last_response():
    # labels are shifted: labels[t] is the token after position t; the response here is 7, 8 (then pad 0)
    batch = {"input_ids": torch.tensor([[1, 2, 3, 7, 8, 0]]), "labels": torch.tensor([[-100, -100, 7, 8, -100, -100]])}
    assert prompt_ids(batch) == [[1, 2, 3]]
    # two turns: the first answer (5) is history, the prompt runs up to the last answer (7, 8)
    batch = {"input_ids": torch.tensor([[1, 5, 2, 3, 7, 8]]), "labels": torch.tensor([[5, -100, -100, 7, 8, -100]])}
    assert prompt_ids(batch) == [[1, 5, 2, 3]]


def test_rollout_batch_labels_the_response_only():
    data = sequences([[1, 2, 3], [4]], [[7, 8], [9, 5, 6]], pad_id=0, device=torch.device("cpu"))
    assert data["input_ids"].tolist() == [[1, 2, 3, 7, 8], [4, 9, 5, 6, 0]]
    assert data["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert data["labels"].tolist() == [[-100, -100, 7, 8, -100], [9, 5, 6, -100, -100]]


def test_seeded_sampling_repeats_and_keep_stop_keeps_the_stop_token():
    model = GPTModel(PRESETS["tiny"].replace(drop_rate=0.0, vocab_size=64), seed=0).eval()
    kwargs = dict(max_new_tokens=6, do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    first = generate(model, [[1, 2, 3], [4, 5]], seed=11, **kwargs)
    assert generate(model, [[1, 2, 3], [4, 5]], seed=11, **kwargs) == first
    stop = first[0][1]  # a token the first row samples second: it stops there
    kept = generate(model, [[1, 2, 3], [4, 5]], seed=11, stop_ids=[stop], keep_stop=True, **kwargs)
    dropped = generate(model, [[1, 2, 3], [4, 5]], seed=11, stop_ids=[stop], **kwargs)
    cut = first[0].index(stop)
    assert kept[0] == first[0][:cut + 1] and dropped[0] == first[0][:cut]


def trl_step_updates(model, data, orders, mini, accumulation, lr, max_grad_norm):
    """TRL 0.9.6's PPOTrainer.step() update loop, re-typed (trl/trainer/ppo_trainer.py:791-836; train_minibatch
    :1086-1102 under accelerate's accumulate): per epoch a permutation of all batch_size rows, cut into backward
    batches of mini x accumulation rows, each cut into mini-batches; every mini-batch's loss / accumulation is
    backpropagated, and at the end of a backward batch (accelerate's sync_gradients) the gradients are clipped to
    max_grad_norm and the optimizer steps. -> the mini-batch losses, in order. The loss of a mini-batch is
    pipeline.model.ppo.ppo_losses (golden-tested against TRL's loss in tests/model/test_ppo_math.py); the values are
    read by TRL's value head on the last hidden state."""
    from pipeline.model.ppo import PPOConfig, ppo_losses

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    backward_batch = mini * accumulation
    losses = []
    for order in orders:
        for backward_start in range(0, len(order), backward_batch):
            backward_inds = order[backward_start:backward_start + backward_batch]
            for mini_start in range(0, backward_batch, mini):
                inds = backward_inds[mini_start:mini_start + mini]
                rows = {k: v[inds] for k, v in data.items()}
                caught = []
                handle = model.norm.register_forward_hook(lambda _m, _i, out: caught.append(out))
                nll = model(rows["input_ids"], attention_mask=rows["attention_mask"], labels=rows["labels"],
                            reduction="none")
                handle.remove()
                pg, vf, _ = ppo_losses(rows["logprobs"], rows["values"], -nll, model.v_head(caught[-1]).float(),
                                       rows["mask"], rows["advantages"], rows["returns"], PPOConfig())
                ((pg + vf) / accumulation).backward()
                losses.append(float((pg + vf).detach()))
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
    return losses


BUFFERED = dict(mini=2, accumulation=2, buffer=2, epochs=2, lr=1e-3, clip=1.0, seed=3)


def buffered_ppo_step(monkeypatch) -> dict:
    """A PPOTrainer on a DeepSpeed engine (ZeRO 0, the tiny preset with a value head, dropout off) whose PPO step
    (BUFFERED: ppo_buffer_size 2, ppo_epochs 2) takes fixed rollouts instead of generating: {"trainer", "engine",
    "model", "golden" (an untouched copy of the model), "data" (the rollouts), "drawn" (the loader's draws)}. Shared
    by the TRL comparison below and tests/train/test_host_reads.py's count of a PPO step's device reads."""
    import copy
    from types import SimpleNamespace

    deepspeed = pytest.importorskip("deepspeed")
    from pipeline.runtime import dist
    from pipeline.recipe.args import train_args
    from pipeline.train.checkpoint import TrainState
    from pipeline.train.ppo import PPOTrainer, attach_value_head

    dist.init()
    mini, accumulation, buffer, epochs, lr, clip, seed = BUFFERED.values()
    rows = mini * accumulation * buffer
    model = GPTModel(PRESETS["tiny"].replace(drop_rate=0.0, vocab_size=64), seed=0)
    attach_value_head(model, 0)
    model.v_head.dropout.p = 0.0
    golden = copy.deepcopy(model)

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 64, (int(n),), generator=g).tolist() for n in torch.randint(2, 6, (rows,), generator=g)]
    responses = [torch.randint(1, 64, (int(n),), generator=g).tolist() for n in torch.randint(2, 5, (rows,), generator=g)]
    data = sequences(prompts, responses, pad_id=0, device=torch.device("cpu"))
    mask = (data["labels"] != -100).float()
    with torch.no_grad():
        old = -model.eval()(data["input_ids"], attention_mask=data["attention_mask"], labels=data["labels"],
                            reduction="none")
    shape = mask.shape
    data.update(mask=mask, logprobs=old + 0.05 * torch.randn(shape, generator=g) * mask,
                values=torch.randn(shape, generator=g) * mask, advantages=torch.randn(shape, generator=g) * mask,
                returns=torch.randn(shape, generator=g) * mask, scores=torch.randn(rows, generator=g),
                kl=torch.zeros(rows))

    config = {"train_micro_batch_size_per_gpu": mini, "gradient_accumulation_steps": accumulation,
              "train_batch_size": mini * accumulation, "gradient_clipping": clip, "zero_optimization": {"stage": 0}}
    engine, *_ = deepspeed.initialize(model=model.train(), optimizer=torch.optim.AdamW(model.parameters(), lr=lr),
                                      config=config)
    args = train_args({"stage": "ppo", "per_device_train_batch_size": mini, "gradient_accumulation_steps": accumulation,
                       "ppo_buffer_size": buffer, "learning_rate": lr, "max_grad_norm": clip})
    ppo = SimpleNamespace(ppo_epochs=epochs, ppo_whiten_rewards=False, ppo_target=6.0, ppo_score_norm=False)
    trainer = PPOTrainer(engine, args, TrainState(), [None] * 16, evaluate=None, save=lambda: None, log=None,
                         stop=None, reward_model=None, reference=None, pad_id=0, stop_ids=(), generation=None, ppo=ppo,
                         scheduler=None, seed=seed)
    drawn = []
    monkeypatch.setattr(trainer.data, "next", lambda: drawn.append(1) or {})
    monkeypatch.setattr(trainer, "responses", lambda batches: (prompts, responses))
    monkeypatch.setattr(trainer, "rollout", lambda prompts, responses: data)
    return {"trainer": trainer, "engine": engine, "model": model, "golden": golden, "data": data, "drawn": drawn}


def test_a_buffered_ppo_step_updates_as_trls_step_does(monkeypatch):
    """ppo_buffer_size 2 (micro 2, accumulation 2: TRL's batch_size 8, backward batches of 4) and ppo_epochs 2: our
    PPO step on a DeepSpeed engine makes the updates TRL's step() makes on the same rollouts, in the same row order:
    2 an epoch, 4 in all, each over one backward batch of its permutation. Golden: trl_step_updates on a copy of the
    same model with torch's AdamW (the weights after the step, each mini-batch's loss, their mean as the logged loss).
    The order is the step's seeded permutation (TRL's is numpy's global RNG: a free choice of the same kind). Dropout
    off, so the two runs see the same numbers."""
    from pipeline.train.loop import Window

    run = buffered_ppo_step(monkeypatch)
    mini, accumulation, buffer, epochs, lr, clip, seed = BUFFERED.values()
    rows = mini * accumulation * buffer
    engine, model, golden, data, drawn = run["engine"], run["model"], run["golden"], run["data"], run["drawn"]
    window = Window()
    run["trainer"].optimizer_step(window)

    generator = torch.Generator().manual_seed(seed)  # the step's order: seed + global_step (0)
    orders = [torch.randperm(rows, generator=generator) for _ in range(epochs)]
    losses = trl_step_updates(golden.train(), data, orders, mini, accumulation, lr, clip)
    assert len(drawn) == accumulation * buffer and len(losses) == epochs * buffer * accumulation
    assert engine.global_steps == epochs * buffer  # one update a backward batch: ppo_buffer_size an epoch
    assert float(window.loss) == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    for (name, ours), theirs in zip(model.named_parameters(), golden.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6, msg=name)


def test_rollout_seeds_differ_for_every_step_and_micro_batch(monkeypatch):
    """Each micro-batch of a PPO step samples from its own seed: (step 0, micro-batch 1000) and (step 1, micro-batch
    0) drew the same tokens under seed + 1000 x step + micro (a step has 1,000 micro-batches with
    gradient_accumulation_steps 100 x ppo_buffer_size 10); every (step, micro) of a grid past that gets its own seed,
    as PPOTrainer.generate passes it to generate. Golden: distinctness, which the earlier rule fails."""
    from types import SimpleNamespace

    from pipeline.train import ppo

    seeds = []

    def fake_generate(policy, prompts, **kwargs):
        seeds.append(kwargs["seed"])
        return [[] for _ in prompts]

    trainer = SimpleNamespace(seed=42, state=SimpleNamespace(global_step=0), stop_ids=(1,), pad_id=0,
                              generation=SimpleNamespace(max_new_tokens=2, do_sample=True, temperature=1.0, top_k=0,
                                                         top_p=1.0, repetition_penalty=1.0))
    monkeypatch.setattr("pipeline.model.generate.generate", fake_generate)
    for step, micro in ((0, 1000), (1, 0), (2, 1000), (3, 0)):
        trainer.state.global_step = step
        ppo.PPOTrainer.generate(trainer, None, [[1]], micro)
    assert len(set(seeds)) == 4, seeds
    grid = {ppo.rollout_seed(42, step, micro) for step in range(4) for micro in range(2500)}
    assert len(grid) == 4 * 2500
    assert all(0 <= s < 2 ** 64 for s in grid)  # what torch.Generator.manual_seed takes
    assert ppo.rollout_seed(42, 3, 7) == ppo.rollout_seed(42, 3, 7) != ppo.rollout_seed(43, 3, 7)


# LLaMA-Factory 0.9.5's stop words of the templates below (llamafactory/data/template.py: llama3 :1434-1435, qwen
# :1956-1957, chatml :738-739), all with replace_eos
LF_STOP_WORDS = {"llama3": ["<|eot_id|>", "<|eom_id|>"], "qwen": ["<|im_end|>"], "chatml": ["<|im_end|>", "<|im_start|>"]}
# Qwen2.5-7B-Instruct's tokenizer_config.json additional_special_tokens, as published
QWEN25_ADDITIONAL = ["<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
                     "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                     "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


def lf_rollout_stops(directory, template: str, hf_tokenizer=None) -> set[int]:
    """LLaMA-Factory 0.9.5's rollout stops, re-typed: GenerationConfig(eos_token_id=[tokenizer.eos_token_id] +
    tokenizer.additional_special_tokens_ids) (llamafactory/train/ppo/trainer.py:159-163) on the tokenizer as
    Template.fix_special_tokens left it (llamafactory/data/template.py:189-215): under replace_eos the EOS is the
    first stop word, the others are add_special_tokens(additional_special_tokens=..., replace_additional_special_
    tokens=False), appended where missing (transformers 4.57.1 tokenization_utils_base.py:985-1005); the loaded
    additional_special_tokens are tokenizer_config.json's, plus special_tokens_map.json's it lacks only when the
    config has no added_tokens_decoder (:2262-2297). Token names -> ids by transformers' tokenizer of the folder
    (`hf_tokenizer`, loaded here when not given)."""
    import json

    import transformers

    config = json.loads((directory / "tokenizer_config.json").read_text("utf-8"))
    additional = list(config.get("additional_special_tokens") or [])
    if "added_tokens_decoder" not in config:
        mapped = json.loads((directory / "special_tokens_map.json").read_text("utf-8"))
        additional += [t for t in mapped.get("additional_special_tokens") or [] if t not in additional]
    eos, *others = LF_STOP_WORDS[template]  # replace_eos
    additional += [w for w in others if w not in additional]
    hf_tokenizer = hf_tokenizer or transformers.AutoTokenizer.from_pretrained(directory)
    ids = hf_tokenizer.convert_tokens_to_ids([eos, *additional])
    assert all(isinstance(i, int) for i in ids), ids  # every name is in the vocabulary here
    return set(ids)


def test_ppo_rollouts_stop_where_llama_factory_s_do_on_a_llama3_instruct_checkpoint(tmp_path):
    """A transformers-written Llama 3 Instruct-like checkpoint (eos_token <|eot_id|>, generation_config.json's eos
    list <|end_of_text|>, <|eom_id|>, <|eot_id|>): LLaMA-Factory's rollouts stop at <|eot_id|> and <|eom_id|> only,
    so stage ppo runs on past <|end_of_text|>, where eval and generate (Template.stop_ids: transformers' generate
    with the checkpoint's generation config) still stop. With additional_special_tokens in special_tokens_map.json
    alone (this tokenizer_config.json has no added_tokens_decoder: transformers' legacy branch reads it), one of them
    a vocabulary token by its byte-level text, those stop too."""
    import json
    import shutil

    from pipeline.data.templates import get_template
    from pipeline.data.tokenizer_files import read_tokenizer
    from tests.acceptance.harness import write_hf_checkpoint

    write_hf_checkpoint(tmp_path / "llama", "llama", small_vocab=True)
    tokenizer, template = read_tokenizer(tmp_path / "llama"), get_template("llama3")
    end_of_text = tokenizer.token_id("<|end_of_text|>")
    assert set(template.ppo_stop_ids(tokenizer)) == lf_rollout_stops(tmp_path / "llama", "llama3")
    assert end_of_text not in template.ppo_stop_ids(tokenizer) and end_of_text in template.stop_ids(tokenizer)

    folder = shutil.copytree(tmp_path / "llama", tmp_path / "llama_more")
    vocab = json.loads((folder / "tokenizer.json").read_text("utf-8"))["model"]["vocab"]
    word = next(t for t in vocab if t.startswith("Ġ") and len(t) > 2)
    mapped = json.loads((folder / "special_tokens_map.json").read_text("utf-8"))
    mapped["additional_special_tokens"] = ["<|start_header_id|>", word]
    (folder / "special_tokens_map.json").write_text(json.dumps(mapped), "utf-8")
    golden = lf_rollout_stops(folder, "llama3")
    assert vocab[word] in golden and len(golden) == 4
    assert set(template.ppo_stop_ids(read_tokenizer(folder))) == golden


def test_ppo_rollouts_stop_at_a_qwen_checkpoint_s_additional_special_tokens(tmp_path):
    """Qwen2.5-Instruct's tokenizer files (its real vocabulary, its tokenizer_config.json's additional_special_tokens
    and added_tokens_decoder): LLaMA-Factory's rollouts stop at <|im_end|> (the template's EOS) and at every
    additional special token (<|im_start|>, <|object_ref_start|>, ... <|video_pad|>), and not at <|endoftext|>, which
    generation_config.json lists (eval and generate stop there). chatml's second stop word, <|im_start|>, is one of
    them already."""
    import json

    import transformers

    from pipeline.data.templates import get_template
    from pipeline.data.tokenizer_files import read_tokenizer
    from tests.helpers.hf_vocab import write_tokenizer_dir

    folder = write_tokenizer_dir(tmp_path / "qwen", "qwen2")
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        data = json.loads((folder / file).read_text("utf-8"))
        (folder / file).write_text(json.dumps({**data, "additional_special_tokens": QWEN25_ADDITIONAL}), "utf-8")
    tokenizer, hf_tokenizer = read_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    endoftext = tokenizer.token_id("<|endoftext|>")
    for name in ("qwen", "chatml"):
        template, golden = get_template(name), lf_rollout_stops(folder, name, hf_tokenizer)
        assert len(golden) == len(QWEN25_ADDITIONAL)  # <|im_end|> is the EOS and one of them
        assert set(template.ppo_stop_ids(tokenizer)) == golden, name
        assert endoftext not in golden and endoftext in template.stop_ids(tokenizer)
