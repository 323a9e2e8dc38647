"""Growing the vocabulary (pipeline.model.vocab) against transformers' resize_token_embeddings(pad_to_multiple_of=64)
plus LLaMA-Factory 0.9.5's noisy-mean rows written by hand (mean of the old rows + N(0, 1/sqrt(dim))), and its
init_special_tokens desc_init / desc_init_w_noise rows (_description_based_initialization) written by hand."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.model.config import resized_vocab_size
from pipeline.model.vocab import Described, resize_vocab
from pipeline.model.weights import load_model
from tests.acceptance.harness import hf_model

SEED = 7


def golden(model, n_tokens: int, gen: torch.Generator | None = None):
    """transformers' resize, then the new rows as LLaMA-Factory sets them, from a generator seeded as ours."""
    old = model.get_input_embeddings().weight.size(0)
    model.resize_token_embeddings(n_tokens, pad_to_multiple_of=64, mean_resizing=False)
    gen = gen or torch.Generator().manual_seed(SEED)
    weights = [model.get_input_embeddings().weight]
    if not model.config.tie_word_embeddings and model.get_output_embeddings() is not None:  # a reward model: none
        weights.append(model.get_output_embeddings().weight)
    with torch.no_grad():
        for w in weights:
            dim = w.size(1)
            noise = torch.empty(w.size(0) - old, dim).normal_(0.0, 1.0 / math.sqrt(dim), generator=gen)
            w[old:] = w[:old].mean(dim=0, keepdim=True) + noise
    return model


@pytest.mark.parametrize("family,tied", [("llama", False), ("qwen2", True)])
def test_resize_matches_transformers_and_llamafactory_init(tmp_path, family, tied):
    theirs = hf_model(family, vocab_size=130, tie_word_embeddings=tied)
    theirs.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_model(tmp_path)
    assert resize_vocab(ours, 133, seed=SEED) == 192
    golden(theirs, 133)
    assert ours.cfg.vocab_size == theirs.config.vocab_size == 192
    torch.testing.assert_close(ours.embed_tokens.weight, theirs.get_input_embeddings().weight)
    torch.testing.assert_close(ours.lm_head.weight, theirs.get_output_embeddings().weight)
    assert (ours.lm_head.weight is ours.embed_tokens.weight) == tied
    ids = torch.tensor([[1, 131, 132, 5, 190]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=1e-4)


def test_a_reward_model_grows_its_embedding_alone(tmp_path):
    """Stage rm with new_special_tokens: transformers' XForSequenceClassification has no LM head, so only the
    embedding grows (the rows a language model's embedding gets); resize_vocab set a missing lm_head's size."""
    import transformers

    from tests.acceptance.harness import FAMILIES

    config = transformers.LlamaConfig(**{**FAMILIES["llama"].tiny, "vocab_size": 130, "num_labels": 1,
                                         "tie_word_embeddings": False})
    torch.manual_seed(0)
    theirs = transformers.LlamaForSequenceClassification(config).eval()
    theirs.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_model(tmp_path)
    assert resize_vocab(ours, 133, seed=SEED) == 192 and ours.lm_head is None
    golden(theirs, 133)
    torch.testing.assert_close(ours.embed_tokens.weight, theirs.get_input_embeddings().weight)
    ids = torch.tensor([[1, 131, 132, 5, 190]])
    with torch.no_grad():  # one row without padding: transformers pools its last position
        torch.testing.assert_close(ours(ids)[:, -1], theirs(ids).logits, atol=1e-5, rtol=1e-5)


def test_no_resize_when_the_ids_fit():
    assert resized_vocab_size(151936, 151669) == 151936
    assert resized_vocab_size(384, 386) == 448
    assert resized_vocab_size(384, 384) == 384


def test_an_adapter_of_a_grown_vocabulary_on_the_plain_base_names_the_key(tmp_path):
    """The adapter's modules_to_save hold the grown rows: onto a base that did not grow, one message per tensor
    says which recipe key makes them fit."""
    from pipeline.errors import UserError
    from pipeline.model.lora import apply_lora, load_adapter, save_adapter

    hf_model("qwen2", vocab_size=130).save_pretrained(tmp_path / "base", safe_serialization=True)
    grown = load_model(tmp_path / "base")
    resize_vocab(grown, 133, seed=SEED)
    apply_lora(grown, "q_proj", rank=2, additional_targets=["embed_tokens", "lm_head"])
    save_adapter(grown, tmp_path / "adapter", {})
    plain = load_model(tmp_path / "base")
    apply_lora(plain, "q_proj", rank=2, additional_targets=["embed_tokens", "lm_head"])
    with pytest.raises(UserError) as err:
        load_adapter(plain, tmp_path / "adapter")
    assert [m.split("(")[-1] for m in err.value.messages] == [
        "an adapter trained with added tokens: set the same add_tokens, add_special_tokens / new_special_tokens "
        "and new_special_tokens_config as its run, so the base grows as it did in training)"] * 2


@pytest.mark.parametrize("rows,noise", [(130, False), (130, True), (192, False)])
def test_described_rows_are_llamafactorys_description_means(tmp_path, rows, noise):
    """Tokens 130..133 added to a 130-row model (grown to 192, then described) or to a 192-row one (spare rows: only
    the described rows change, as on LLaMA-Factory's main branch). Each described row of the embedding and of the
    untied head: the mean of the input embedding's rows of its description's ids; an empty description: the mean of
    that matrix's rows before the growth other than the new tokens'; desc_init_w_noise adds randn / sqrt(dim)."""
    theirs = hf_model("llama", vocab_size=rows, tie_word_embeddings=False)
    theirs.save_pretrained(tmp_path, safe_serialization=True)
    described = {130: (3, 5, 7, 5), 131: (), 132: (9,)}  # 133: a plain token (add_tokens), not described
    ours = load_model(tmp_path)
    assert resize_vocab(ours, 134, seed=SEED, described=Described(described, noise, frozenset({*described, 133}))) == 192

    gen = torch.Generator().manual_seed(SEED)
    if rows < 134:
        golden(theirs, 134, gen)
    old = rows if rows < 134 else 192
    embed = theirs.get_input_embeddings().weight
    with torch.no_grad():
        for weight in (embed, theirs.get_output_embeddings().weight):
            others = [i for i in range(old) if i not in (130, 131, 132, 133)]
            fallback = weight[others].mean(dim=0)
            for token, ids in described.items():
                row = embed[list(ids)].mean(dim=0) if ids else fallback
                if noise:
                    row = row + torch.randn(row.shape, generator=gen) / math.sqrt(weight.size(1))
                weight[token] = row
    torch.testing.assert_close(ours.embed_tokens.weight, embed)
    torch.testing.assert_close(ours.lm_head.weight, theirs.get_output_embeddings().weight)
