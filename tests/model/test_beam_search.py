"""Beam search (num_beams, length_penalty, early_stopping) against transformers' own generate(num_beams=k,
do_sample=False) on the same weights: a tiny Llama whose EOS is likely enough that some beams end early, and
the tiny GPT-2 of conftest (with a repetition penalty, which transformers applies to beam search's log-probs)."""
from __future__ import annotations

import pytest
import torch

from pipeline.model.generate import generate
from pipeline.model.kv_cache import KVCache
from pipeline.model.weights import load_model

transformers = pytest.importorskip("transformers")

VOCAB, EOS, PAD = 64, 3, 0
NEW = 12


def written(path, family: str, **extra):
    """(our model, transformers' model): a random `family` model written by save_pretrained; every tensor gets noise
    and the EOS row of the head is doubled, so that EOS ends some beams after a few tokens and others run to the end."""
    config = getattr(transformers, f"{family}Config")(
        hidden_size=64, num_hidden_layers=2, intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=128,
        num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD, **extra)
    torch.manual_seed(0)
    ref = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        ref.lm_head.weight[EOS].mul_(2.0)
    ref.save_pretrained(path)
    return load_model(path).eval(), ref


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return written(tmp_path_factory.mktemp("llama"), "Llama")


def prompts(lengths=(5, 9, 3), high=VOCAB, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, high, (n,), generator=g).tolist() for n in lengths]


def transformers_beams(ref, batch, pad, eos, **kwargs):
    """transformers' generate on the left-padded batch (on the model's device); each row's new tokens up to
    (without) its first EOS."""
    width = max(len(p) for p in batch)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=ref.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=ref.device)
    out = ref.generate(ids, attention_mask=mask, do_sample=False, eos_token_id=eos, pad_token_id=pad, **kwargs)
    rows = [row[width:].tolist() for row in out]
    return [row[:row.index(eos)] if eos in row else row for row in rows]


SETTINGS = [(2, 1.0, False), (3, 1.0, False), (2, 2.0, True), (3, -1.0, "never"), (2, 1.0, "never")]


@pytest.fixture(scope="module")
def answers(llama):
    """Our answers to the batch per setting (computed once: the two tests below read them)."""
    ours, _ = llama
    return {s: generate(ours, prompts(), max_new_tokens=NEW, num_beams=s[0], length_penalty=s[1],
                        early_stopping=s[2], eos_id=EOS) for s in SETTINGS}


@pytest.mark.parametrize("setting", SETTINGS, ids=str)
def test_llama_batch_equals_transformers(llama, answers, setting):
    ours, ref = llama
    num_beams, length_penalty, early_stopping = setting
    expected = transformers_beams(ref, prompts(), PAD, EOS, num_beams=num_beams, length_penalty=length_penalty,
                                  early_stopping=early_stopping, max_new_tokens=NEW)
    assert answers[setting] == expected
    assert generate(ours, prompts(), max_new_tokens=NEW, num_beams=num_beams, length_penalty=length_penalty,
                    early_stopping=early_stopping, eos_id=EOS, use_cache=False) == expected


def test_beams_past_a_sliding_window_equal_transformers(tmp_path):
    """Beam search runs the model's forward, whose mask keeps a layer's window: a Mistral with a 4-position window,
    left-padded prompts of 3-9 tokens and 12 new ones (prefill and cached steps past the window)."""
    ours, ref = written(tmp_path, "Mistral", sliding_window=4)
    expected = transformers_beams(ref, prompts(), PAD, EOS, num_beams=2, max_new_tokens=NEW)
    assert generate(ours, prompts(), max_new_tokens=NEW, num_beams=2, eos_id=EOS) == expected


def test_the_settings_matter(llama, answers):
    """The goldens above mean something: beams that end early and ones that run on, and answers that change with
    num_beams, length_penalty and early_stopping (and differ from greedy)."""
    ours, _ = llama
    lengths = {len(a) for rows in answers.values() for a in rows}
    assert min(lengths) < 3 and max(lengths) > NEW // 2
    as_tuples = {s: tuple(map(tuple, rows)) for s, rows in answers.items()}
    assert len(set(as_tuples.values())) == len(SETTINGS)
    assert generate(ours, prompts(), max_new_tokens=NEW, eos_id=EOS) != answers[SETTINGS[0]]


def test_gpt2_with_repetition_penalty_equals_transformers(hf_dir):
    path, ref = hf_dir
    ours = load_model(path).eval()
    batch = prompts((7, 4), high=50000, seed=3)
    for penalty in (1.0, 1.3):
        expected = transformers_beams(ref, batch, 50256, 50256, num_beams=3, max_new_tokens=8,
                                      repetition_penalty=penalty)
        assert generate(ours, batch, max_new_tokens=8, num_beams=3, repetition_penalty=penalty,
                        eos_id=50256, pad_id=50256) == expected


def test_gpt2_stop_string_equals_transformers(hf_dir, tmp_path):
    """A stop string ends a hypothesis as transformers' StopStringCriteria does (its tokens kept), which changes
    which hypothesis wins."""
    from pipeline import merge
    from pipeline.data.tokenizer import gpt2

    path, ref = hf_dir
    ours = load_model(path).eval()
    merge.write_tokenizer_files(tmp_path, gpt2(), 64)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    p = gpt2().encode("The sky is")
    free = generate(ours, p, max_new_tokens=8, num_beams=3, eos_id=50256)
    stop = gpt2().decode(free[-1:])
    expected = ref.generate(torch.tensor([p]), num_beams=3, max_new_tokens=8, do_sample=False, stop_strings=[stop],
                            tokenizer=hf_tokenizer, pad_token_id=50256, eos_token_id=50256)[0, len(p):].tolist()
    got = generate(ours, p, max_new_tokens=8, num_beams=3, eos_id=50256, stop_strings=[stop], tokenizer=gpt2())
    assert got == expected and got != free


def test_one_prompt_and_sampling_refused(llama):
    ours, _ = llama
    p = prompts()[0]
    assert generate(ours, p, max_new_tokens=NEW, num_beams=3, eos_id=EOS) == \
        generate(ours, [p], max_new_tokens=NEW, num_beams=3, eos_id=EOS)[0]
    with pytest.raises(ValueError, match="beam search with sampling"):
        generate(ours, p, num_beams=2, do_sample=True)


def test_kv_cache_reorder_moves_rows():
    cache = KVCache(1, capacity=4)
    k = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 2, 1).contiguous()
    cache.update(0, k, -k)
    cache.reorder(torch.tensor([2, 2, 0]))
    keys, values = cache[0]
    assert keys[:, 0, :, 0].tolist() == [[2, 2], [2, 2], [0, 0]]
    assert values[:, 0, :, 0].tolist() == [[-2, -2], [-2, -2], [0, 0]]


def test_generate_cli_with_num_beams_equals_transformers(tmp_path):
    """A user's recipe with LLaMA-Factory's num_beams / length_penalty on a transformers checkpoint: `python -m
    pipeline generate` answers what transformers' generate(num_beams=3, length_penalty=0.5) answers (num_beams was
    refused and length_penalty had no effect)."""
    from tests.acceptance.harness import pipeline

    generate_cli_beams_equal_transformers(tmp_path, lambda *argv, cwd: pipeline(*argv, cwd=cwd).stdout)


def generate_cli_beams_equal_transformers(tmp_path, generate_cli, device="cpu"):
    """The check of test_generate_cli_with_num_beams_equals_transformers, with transformers on `device` and
    `generate_cli(*argv, cwd=...)` giving what `python -m pipeline ARGV` prints (tests/gpu runs it on CUDA)."""
    from pipeline.data.tokenizer import gpt2
    from tests.acceptance.harness import write_hf_checkpoint

    ref = write_hf_checkpoint(tmp_path / "base", "gpt2").to(device)
    (tmp_path / "r.yaml").write_text(f"model_name_or_path: {tmp_path / 'base'}\nnum_beams: 3\nlength_penalty: 0.5\n"
                                     f"max_new_tokens: 6\noutput_dir: {tmp_path / 'out'}\n", encoding="utf-8")
    printed = generate_cli("generate", "r.yaml", "--model", "base", "--raw", "--prompt", "The sky is", cwd=tmp_path)
    prompt = gpt2().encode("The sky is")
    expected = transformers_beams(ref, [prompt], 50256, 50256, num_beams=3, length_penalty=0.5, max_new_tokens=6)[0]
    greedy = transformers_beams(ref, [prompt], 50256, 50256, max_new_tokens=6)[0]
    assert expected != greedy  # the beams matter on these weights
    assert printed == gpt2().decode(expected) + "\n"


def test_eval_predictions_with_num_beams_equal_transformers(tmp_path):
    """eval's predictions (do_predict's generation) with num_beams / length_penalty from a LLaMA-Factory-style
    recipe: each answer is what transformers' beam search gives on the tuned weights (a transformers checkpoint
    where a full fine-tune leaves output_dir/model), and the report names the decoding."""
    import json

    from pipeline.data.tokenizer import gpt2
    from tests.acceptance.harness import write_data, write_hf_checkpoint, write_recipe
    from tests.reliability.rel_helpers import run_main

    write_hf_checkpoint(tmp_path / "base", "gpt2")
    tuned = write_hf_checkpoint(tmp_path / "out" / "model", "gpt2", seed=1)
    write_data(tmp_path / "data", n_sft=8)
    write_recipe(tmp_path / "r.yaml", model_name_or_path=str(tmp_path / "base"), dataset_dir=str(tmp_path / "data"),
                 output_dir=str(tmp_path / "out"), finetuning_type="full", num_beams=3, length_penalty=0.5,
                 max_new_tokens=5, eval_base=False)
    for argv in (["build", "r.yaml"], ["eval", "r.yaml"]):
        done = run_main(argv, tmp_path)
        assert done.code == 0, done.err
    rows = [json.loads(line) for line in (tmp_path / "out/eval/predictions.jsonl").read_text("utf-8").splitlines()]
    prompts = [gpt2().encode(row["prompt"]) for row in rows]
    expected = transformers_beams(tuned, prompts, 50256, 50256, num_beams=3, length_penalty=0.5, max_new_tokens=5)
    assert expected != transformers_beams(tuned, prompts, 50256, 50256, max_new_tokens=5)  # not greedy's
    assert [row["tuned_prediction"] for row in rows] == [gpt2().decode(e) for e in expected]
    assert "decoding: beam search (" in (tmp_path / "out/eval/report.md").read_text("utf-8")
