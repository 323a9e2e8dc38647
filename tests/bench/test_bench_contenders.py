"""The benchmark's peers are what they claim to be (no training, tiny shapes, a few seconds).

- `greedy_knapsack` packs as LLaMA-Factory's processor_utils.greedy_knapsack does (golden: worked by hand
  from its algorithm: ascending sort, each knapsack takes the longest remaining example that fits).
- `HF.neat_packed_batch` is a correct neat packing for transformers: on a tiny LlamaForCausalLM, every
  example's summed loss inside a packed row equals the loss of the example alone (golden from transformers).
- `Shape` gives PEFT the family's HF module names and the published widths.
- The book-like rows follow the length distribution they are generated from.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.contenders import HF, Examples, greedy_knapsack
from bench.workload import BOOK, Shape, book_rows


def test_greedy_knapsack_is_llama_factorys():
    lengths = {0: 5, 1: 3, 2: 8, 3: 2, 4: 7, 5: 11}
    # sorted 2,3,5,7,8 (11 > 10 is dropped): [8, 2] then [7, 3] then [5]
    assert greedy_knapsack(lengths, 10) == [[2, 3], [4, 1], [0]]


def test_neat_packed_rows_give_every_example_its_unpacked_loss():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    rng = np.random.default_rng(0)
    sizes = [7, 5, 9, 4]
    ids = rng.integers(1, 64, size=sum(sizes))
    trainable = np.concatenate([np.arange(n) >= n // 2 for n in sizes])  # second half of each is the answer
    ex = Examples(ids, trainable, np.concatenate([[0], np.cumsum(sizes)]), pad=0)
    batch = HF.neat_packed_batch(ex, [[0, 1], [2, 3]], cutoff_len=15, dtype="float32")
    assert batch["input_ids"].shape == (2, 16) and batch["attention_mask"].shape == (2, 1, 16, 16)
    assert batch["position_ids"][0, :12].tolist() == list(range(7)) + list(range(5))
    mask = batch["attention_mask"][0, 0] == 0
    assert mask[7, 7] and mask[8, 7] and not mask[7, 6] and not mask[6, 7] and not mask[13, 13]  # 13: padding
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()

    def summed(logits_row: torch.Tensor, labels_row: torch.Tensor) -> float:
        return float(torch.nn.functional.cross_entropy(logits_row[:-1], labels_row[1:], ignore_index=-100,
                                                       reduction="sum"))

    at = {0: (0, 0), 1: (0, 7), 2: (1, 0), 3: (1, 9)}
    for i, (row, start) in at.items():
        n = sizes[i]
        packed = summed(logits[row, start:start + n], batch["labels"][row, start:start + n])
        tokens = torch.from_numpy(ex.tokens(i)).unsqueeze(0)
        labels = torch.where(torch.from_numpy(ex.mask(i)), tokens[0], -100)
        with torch.no_grad():
            alone = summed(model(input_ids=tokens).logits[0].float(), labels)
        assert packed == pytest.approx(alone, rel=1e-4, abs=1e-4)


def test_shapes_speak_the_familys_names():
    qwen = Shape("qwen3-0.6b", 2)
    assert qwen.hf_lora_targets() == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert Shape("gpt2-small", 4).hf_lora_targets() == ["c_attn", "c_proj", "c_fc"]
    assert qwen.describe().startswith("qwen3-0.6b shape (1024 wide, 16 heads, 8 KV heads of 128, MLP 3072, "
                                      "vocab 151936") and qwen.describe().endswith("2 of 28 layers")
    assert Shape("llama-3.2-1b", 2).hf_config()["num_key_value_heads"] == 8


def test_book_rows_follow_their_length_profile():
    rows = book_rows(1100, seed=0)
    assert len({r["instruction"] for r in rows}) == 1100
    outputs = np.array([len(r["output"].split()) for r in rows])
    assert np.median(outputs) == pytest.approx(BOOK.output[0], abs=1)
    assert outputs.max() <= BOOK.output[2]
    assert np.mean([bool(r["input"]) for r in rows]) == pytest.approx(BOOK.input_share, abs=0.04)


def test_the_hf_contender_steps_where_it_is_put():
    """HF takes the GPU where torch finds one (the GPU check's peers section), the CPU otherwise; each batch
    is moved inside the step, and a step trains the LoRA tensors only. The tiny preset (GPT-2's layout at width
    64): gpt2-small's 768-wide block and head took ~10 more CPU-s to build and step, for the same facts."""
    pytest.importorskip("peft")
    hf = HF(Shape("tiny", 1), device="cpu")
    assert hf.device.type == "cpu" and all(p.device.type == "cpu" for p in hf.params)
    before = {n: p.detach().clone() for n, p in hf.model.named_parameters()}
    ex = Examples(np.arange(40, dtype=np.int32), np.ones(40, dtype=bool), np.array([0, 15, 40]))
    loss = hf.step(HF.sft_batch(ex, np.array([0, 1])))
    assert np.isfinite(loss)
    moved = {n for n, p in hf.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved and all("lora_" in n for n in moved)
