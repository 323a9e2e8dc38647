"""Stage ppo's batch plumbing (pipeline.train.ppo): the prompt of an sft row, the rollout batch's shifted labels, and
generation keeping the stop token and repeating itself under a seed."""
from __future__ import annotations

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
