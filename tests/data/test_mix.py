"""mix_strategy interleave_*: pipeline.data.mix against HF datasets' interleave_datasets, the function LLaMA-Factory's
data_utils.merge_dataset calls (interleave_under -> first_exhausted, interleave_over -> all_exhausted, interleave_once
-> all_exhausted_without_replacement). The golden is HF's own output on Dataset.from_list of the same rows."""
from __future__ import annotations

import pytest

from pipeline.data.mix import interleave_order, mixed, parse_probs, probs_problem

datasets = pytest.importorskip("datasets")

HF_STOPPING = {"interleave_under": "first_exhausted", "interleave_over": "all_exhausted",
               "interleave_once": "all_exhausted_without_replacement"}  # LLaMA-Factory's data_utils.py strategy_map


def rows(lengths: tuple[int, ...]) -> list[list[str]]:
    return [[f"d{d}r{k}" for k in range(n)] for d, n in enumerate(lengths)]


def hf_mix(parts: list[list[str]], probs: list[float] | None, seed: int, strategy: str) -> list[str]:
    sets = [datasets.Dataset.from_list([{"x": row} for row in part]) for part in parts]
    return datasets.interleave_datasets(sets, probabilities=probs, seed=seed,
                                        stopping_strategy=HF_STOPPING[strategy])["x"]


@pytest.mark.parametrize("strategy", list(HF_STOPPING))
@pytest.mark.parametrize("lengths, probs", [
    ((3, 5), None), ((6, 2, 4), None), ((9, 1), None),
    ((3, 5), [0.5, 0.5]), ((20, 3), [0.9, 0.1]), ((2, 7, 4), [0.2, 0.5, 0.3]), ((1, 30), [0.05, 0.95]),
])
def test_the_rows_and_their_order_are_hfs(strategy, lengths, probs):
    parts = rows(lengths)
    for seed in (0, 42, 1234):
        assert mixed(parts, probs, seed, strategy) == hf_mix(parts, probs, seed, strategy)


def test_many_rows_cross_hfs_blocks_of_draws():
    """More than 1,000 draws: the second block of the random stream must be HF's second block too."""
    parts = rows((1500, 400))
    for strategy in HF_STOPPING:
        assert mixed(parts, [0.6, 0.4], 7, strategy) == hf_mix(parts, [0.6, 0.4], 7, strategy)


def test_a_dataset_of_probability_zero_is_never_drawn_under_interleave_under():
    parts = rows((4, 3, 5))
    ours = mixed(parts, [0.5, 0.0, 0.5], 3, "interleave_under")
    assert ours == hf_mix(parts, [0.5, 0.0, 0.5], 3, "interleave_under") and not any(r.startswith("d1") for r in ours)


def test_one_dataset_is_left_as_it_is():
    """LLaMA-Factory's merge_dataset returns a single dataset unchanged, whatever the strategy."""
    assert interleave_order([3], [1.0], 0, "interleave_over") == [(0, 0), (0, 1), (0, 2)]


def test_round_robin_by_hand():
    assert interleave_order([2, 3], None, None, "interleave_under") == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert interleave_order([2, 3], None, None, "interleave_over") == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 0),
                                                                       (1, 2)]
    assert interleave_order([2, 3], None, None, "interleave_once") == [(0, 0), (1, 0), (0, 1), (1, 1), (1, 2)]


def test_probs_as_llama_factory_reads_them():
    assert parse_probs(" 0.7, 0.3") == [0.7, 0.3] and parse_probs([0.25, 0.75]) == [0.25, 0.75]
    assert parse_probs(None) is None
    with pytest.raises(ValueError, match="'x' is not a number"):
        parse_probs("0.5,x")


@pytest.mark.parametrize("probs, strategy, problem", [
    ([0.5, 0.5, 0.0], "interleave_under", "3 probabilities for 2 datasets"),
    ([1.2, -0.2], "interleave_under", "a finite number of 0 or more"),
    ([float("nan"), 1.0], "interleave_under", "a finite number of 0 or more"),
    ([0.7, 0.2], "interleave_under", "sum to 0.9; they must sum to 1"),
    ([1.0, 0.0], "interleave_over", "never drawn, so with mix_strategy interleave_over the mix never ends"),
    ([1.0, 0.0], "interleave_once", "never drawn, so with mix_strategy interleave_once the mix never ends"),
])
def test_probs_numpy_or_hf_would_refuse_are_named(probs, strategy, problem):
    assert problem in probs_problem(probs, 2, strategy)


def test_probs_that_numpy_accepts_pass():
    """numpy's choice allows a sum within sqrt(float64 eps) of 1: 0.1 + 0.2 + 0.7 is 1.0000000000000002."""
    assert probs_problem([0.1, 0.2, 0.7], 3, "interleave_over") is None
    assert probs_problem([1.0, 0.0], 2, "interleave_under") is None
    rng = pytest.importorskip("numpy").random.default_rng(0)
    rng.choice(3, size=2, p=[0.1, 0.2, 0.7])  # numpy agrees
    with pytest.raises(ValueError, match="do not sum to 1"):
        rng.choice(2, size=2, p=[0.7, 0.2])


def test_a_dataset_whose_val_split_trains_is_mixed_as_one_dataset():
    """With eval_dataset naming other datasets, a training dataset's val.json trains too (data.built.training_splits):
    its rows follow its train.json's in that dataset's share of the mix. The val split of one eval_dataset is its
    rows as they are."""
    from pathlib import Path

    from pipeline.data.load import combine
    from pipeline.recipe.args import data_args

    data = data_args({"model_name_or_path": "tiny", "dataset": ["a", "b"], "eval_dataset": ["c"],
                      "mix_strategy": "interleave_once"})
    paths = [Path(f"data/build/{name}.json") for name in ("a/train", "a/val", "b/train")]
    parts = [["a0", "a1"], ["a2"], ["b0"]]
    assert combine(data, "train", paths, parts) == ["a0", "b0", "a1", "a2"]
    assert combine(data, "val", paths, parts) == ["a0", "a1", "a2", "b0"]


def test_eval_datasets_are_interleaved_as_llama_factory_mixes_them(tmp_path, monkeypatch):
    """LLaMA-Factory's get_dataset merges eval_dataset with merge_dataset as it merges dataset (interleave_probs
    included, one per eval dataset or it refuses): the CLI as a user types it (a save_pretrained GPT-2, LLaMA-Factory's
    dataset_info.json and recipe layout) evaluates the eval datasets' rows interleaved, HF's interleave_datasets over
    each one's built rows being the golden (an eval dataset not trained on is evaluated whole: train.json then
    val.json). They were concatenated."""
    import json

    from pipeline.data.build import built_dir
    from pipeline.data.load import load_split, read_rows
    from pipeline.recipe import resolve
    from pipeline.recipe.args import data_args
    from tests.acceptance.harness import write_hf_checkpoint
    from tests.reliability.rel_helpers import run_main

    write_hf_checkpoint(tmp_path / "gpt2", "gpt2")
    data = tmp_path / "data"
    data.mkdir()
    sizes = {"a": 4, "b": 4, "c": 2, "d": 5}
    for name, n in sizes.items():
        rows = [{"instruction": f"{name} question {k}", "input": "", "output": f"{name} answer {k}"} for k in range(n)]
        (data / f"{name}.json").write_text(json.dumps(rows), encoding="utf-8")
    (data / "dataset_info.json").write_text(json.dumps({n: {"file_name": f"{n}.json"} for n in sizes}), encoding="utf-8")
    (tmp_path / "mix.yaml").write_text("model_name_or_path: gpt2\nstage: sft\ndo_train: true\nfinetuning_type: lora\n"
                      "dataset: a,b\neval_dataset: c,d\ndataset_dir: data\ntemplate: alpaca\ncutoff_len: 64\n"
                      "val_size: 0\nmix_strategy: interleave_over\ninterleave_probs: 0.5,0.5\nseed: 7\n"
                      "output_dir: saves/mix\nmax_steps: 1\n", encoding="utf-8")
    assert run_main(["build", "mix.yaml"], tmp_path).code == 0
    built = [[row for split in ("train", "val") for row in read_rows(built_dir(data, name) / f"{split}.json", None)]
             for name in ("c", "d")]
    golden = hf_mix([[json.dumps(row) for row in part] for part in built], [0.5, 0.5], 7, "interleave_over")
    assert len(golden) > sum(sizes[n] for n in "cd")  # c's rows repeat until d runs out
    shown = run_main(["inspect", "mix.yaml", "--num", "0"], tmp_path)
    assert shown.code == 0 and f"val: {len(golden)} rows -> {len(golden)} examples" in shown.out, shown
    monkeypatch.chdir(tmp_path)
    assert [json.dumps(row) for row in load_split(data_args(resolve("mix.yaml", [])), "val")] == golden

    refused = run_main(["validate", "mix.yaml", "eval_dataset=c"], tmp_path)
    assert refused.code == 2 and "mix.yaml:12:19: interleave_probs: given '0.5,0.5': 2 probabilities for 1 datasets in " \
        "`eval_dataset`: give one per dataset, in order" in refused.err, refused
