"""compute_accuracy: eval_accuracy equals LLaMA-Factory's ComputeAccuracy applied to transformers' logits.

The golden side is LLaMA-Factory 0.9.5's formula, copied below, on the argmax of transformers' GPT2LMHeadModel
logits of a transformers-written checkpoint; our side is pipeline.train.loop.evaluate on the same batches. The
labels are built so that about half of the scored tokens are transformers' own predictions (random weights
predict almost nothing right) and the rows score different numbers of tokens: a mean over all tokens, a label
shift off by one or a prediction taken at the wrong position would each give another number.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from pipeline.train.accuracy import example_accuracy_sums
from tests.acceptance.harness import write_hf_checkpoint
from tests.train.helpers import BASE_SFT

transformers = pytest.importorskip("transformers")
IGNORE_INDEX = -100


def llamafactory_accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    """LLaMA-Factory v0.9.5 src/llamafactory/train/sft/metric.py, ComputeAccuracy.__call__ (lines 78-81) and
    _dump (line 68), verbatim but for the score list: preds are eval_logit_processor's argmax (lines 47-58), labels
    LLaMA-Factory's (unshifted, aligned with input_ids)."""
    score_dict = {"accuracy": []}
    for i in range(len(preds)):
        pred, label = preds[i, :-1], labels[i, 1:]
        label_mask = label != IGNORE_INDEX
        score_dict["accuracy"].append(np.mean(pred[label_mask] == label[label_mask]))
    return {k: float(np.mean(v)) for k, v in score_dict.items()}["accuracy"]


def hand_batches(hf_model, rows: int = 5, width: int = 12, seed: int = 0) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """Our eval batches (shifted labels) of `rows` random sequences, and the same rows as LLaMA-Factory sees them:
    transformers' argmax predictions and unshifted labels. Row i scores its tokens from position 2 + i on (a
    prompt before), every other one set to transformers' prediction at the position before."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, hf_model.config.vocab_size, (rows, width), generator=gen)
    with torch.no_grad():
        preds = hf_model(input_ids=ids).logits.argmax(dim=-1)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i in range(rows):
        for t in range(2 + i, width):
            labels[i, t] = preds[i, t - 1] if t % 2 else ids[i, t]
    batches = [{"input_ids": ids[a:a + 2, :-1], "labels": labels[a:a + 2, 1:],
                "attention_mask": torch.ones_like(ids[a:a + 2, :-1])} for a in range(0, rows, 2)]
    return batches, preds.numpy(), labels.numpy()


class Engine:
    """What evaluate reads of a DeepSpeed engine: the call, eval / train, the device."""

    def __init__(self, model):
        self.model, self.device = model, torch.device("cpu")

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def eval(self):
        self.model.eval()

    def train(self):
        self.model.train()


@pytest.fixture
def models(make_recipe, workdir):
    from pipeline.model.build import load_for_inference
    from pipeline.recipe.args import recipe_args

    write_hf_checkpoint(workdir / "gpt2")
    r = make_recipe(BASE_SFT, model_name_or_path="gpt2", compute_accuracy=True)
    ours = load_for_inference(recipe_args(r)[0], "base", device="cpu")
    return transformers.GPT2LMHeadModel.from_pretrained(workdir / "gpt2").eval(), ours


@pytest.mark.parametrize("head", ["row blocks", "one call"])
def test_eval_accuracy_is_llamafactorys_on_transformers_logits(models, head, monkeypatch):
    from pipeline.model import head_loss
    from pipeline.train.loop import evaluate

    hf, ours = models
    batches, preds, labels = hand_batches(hf)
    golden = llamafactory_accuracy(preds, labels)
    scored = labels[:, 1:] != IGNORE_INDEX
    assert 0.3 < golden < 0.7 and golden != pytest.approx((preds[:, :-1] == labels[:, 1:])[scored].mean())
    monkeypatch.setattr(head_loss, "CHUNK_ROWS", 4)  # several row blocks per batch
    plain = evaluate(Engine(ours), batches)
    with head_loss.plain_head() if head == "one call" else torch.no_grad():
        metrics = evaluate(Engine(ours), batches, accuracy=True)
    assert metrics["eval_accuracy"] == pytest.approx(golden, abs=1e-12)
    assert metrics["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-6) and "eval_accuracy" not in plain


def test_each_example_of_a_packed_row_counts_on_its_own():
    """Row 0 packs two examples (segments 0 and 1: 1 of 1 and 1 of 3 right), row 1 holds one (2 of 2 right), the
    padding after them (segment -1) scores nothing: (1 + 1/3 + 1) / 3, where the row means would give
    (2/4 + 1) / 2 and the token mean 4/6."""
    labels = torch.tensor([[-100, 5, -100, 7, 8, 9, -100], [-100, 3, 4, -100, -100, -100, -100]])
    segments = torch.tensor([[0, 0, 1, 1, 1, 1, -1], [0, 0, 0, -1, -1, -1, -1]])
    predicted = torch.tensor([5, 7, 0, 0, 3, 4])  # labels[labels != -100] order
    score, scored = example_accuracy_sums(labels, predicted, segments)  # the sum a float64 tensor, unread
    assert (float(score), scored) == pytest.approx((1 + 1 / 3 + 1, 3))
    score, scored = example_accuracy_sums(labels, predicted)
    assert (float(score), scored) == pytest.approx((2 / 4 + 1, 2))


@pytest.mark.parametrize("neat", [True, False])
def test_packed_val_batches_say_which_example_each_position_holds(make_recipe, neat):
    """compute_accuracy needs the examples of a packed val row, neat or plain packing; train batches stay as they
    were (the model never reads the key)."""
    from pipeline.data.loaders import make_loader
    from pipeline.data.packing import EXAMPLE_KEY
    from pipeline.recipe.args import data_args

    r = make_recipe(BASE_SFT, packing=True, neat_packing=neat, val_size=0.25, cutoff_len=128, compute_accuracy=True)
    val = make_loader(data_args(r), "val", shuffle=False).batch(0)
    assert int(val[EXAMPLE_KEY].max()) >= 1  # several examples in a row
    assert ((val[EXAMPLE_KEY] == -1) == (val["attention_mask"] == 0)).all()
    if neat:
        assert torch.equal(val[EXAMPLE_KEY], val["segment_ids"])
    assert EXAMPLE_KEY not in make_loader(data_args(r), "train").batch(0)


def test_without_any_evaluation_a_notice_says_there_is_no_eval_accuracy(make_recipe):
    from pipeline.train.run import accuracy_notice

    r = make_recipe(BASE_SFT, compute_accuracy=True)
    assert accuracy_notice(r, evaluating=True) is None
    assert accuracy_notice(make_recipe(BASE_SFT, name="plain"), evaluating=False) is None
    line = accuracy_notice(r, evaluating=False)
    assert re.match(r"notice: \S*run\.yaml:\d+: compute_accuracy: accepted without effect: ", line), line
    assert "no eval_accuracy is logged" in line and "val_size" in line


def test_a_val_split_that_is_never_evaluated_gets_the_notice_too(make_recipe, capsys):
    """Held-out rows with eval_strategy: no and do_eval: false evaluate nothing either: the notice must not depend
    on the val split existing but on an evaluation happening."""
    from pipeline.train.run import train

    r = make_recipe(BASE_SFT, compute_accuracy=True, val_size=0.25, eval_strategy="no", do_eval=False, max_steps=1)
    result = train(r)
    assert result.exit_code == 0
    assert json.loads((result.output_dir / "all_results.json").read_text())["eval_accuracy"] is None
    assert "compute_accuracy: accepted without effect: this run evaluates nothing" in capsys.readouterr().err
