"""dpo throughput: useful tokens/s and peak RSS of a LoRA DPO step, ours vs TRL's DPOTrainer + PEFT.

The same preference pairs (tokenized once by our template; TRL gets the token ids, so tokenization is not
what is compared) and the same model shape (gpt2-small widths, `n_layers` blocks, random weights), LoRA r=16,
alpha 32 on the attention and MLP projections, bf16, sigmoid loss, beta 0.1, B pairs per step:

- ours: the project's dpo training step: build_model + LoRA, DeepSpeed engine from the recipe's ds_config,
  pipeline.train.loop.Trainer.optimizer_step with the stage's PreferenceObjective (reference = the same
  weights with the adapters switched off; the frozen head's chunked loss; the head only at scored
  positions), fed by our pair loader (group_by_length).
- trl: trl.DPOTrainer given the bf16 base model and a peft LoraConfig, as LLaMA-Factory starts a LoRA DPO
  run with `bf16: true` (PEFT upcasts the adapters to fp32, accelerate autocasts to bf16; reference = adapters
  off), its own collator (both sides of every pair padded to the batch's longest sequence), random order,
  gradient clipping 1.0, AdamW, TRL's own training loop (`trainer.train()`), gradient checkpointing off (TRL
  and LLaMA-Factory turn it on by default; off, both sides run the same algorithm). Steps are timed by a
  callback from on_step_begin to on_step_end (forward of reference and policy, backward, clipping, update).

As in the sft benchmark, each contender times `steps` batches of its own epoch plan taken at evenly spaced
quantiles of padded size, after one warm-up batch, in its own process per round. Useful tokens are real
input positions of both sides (a sequence of n tokens feeds n - 1), never padding; the reference's forward
is work both do and is not counted twice.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import common, workload
from bench.contenders import LORA_ALPHA, LORA_RANK, LR, Ours
from bench.sft import pick_batches
from pipeline.recipe.args import data_args

CONTENDERS = ("ours", "trl")
NAME = "bench_prefs"
BETA = 0.1


def pair_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """The sft benchmark's Alpaca-like rows as pairs: chosen = the row's output, rejected = the next row's."""
    rows = workload.alpaca_rows(n, seed=seed)
    return [{"instruction": row["instruction"], "input": row["input"], "chosen": row["output"],
             "rejected": rows[(i + 1) % n]["output"]} for i, row in enumerate(rows)]


def write_pairs(dataset_dir: Path, rows: list[dict[str, str]]) -> None:
    """raw/bench_prefs.jsonl + a dataset_info.json entry in LLaMA-Factory's ranking form."""
    raw = dataset_dir / "raw" / f"{NAME}.jsonl"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    registry = {NAME: {"file_name": f"raw/{NAME}.jsonl", "ranking": True,
                       "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen",
                                   "rejected": "rejected"}}}
    (dataset_dir / "dataset_info.json").write_text(json.dumps(registry, indent=2) + "\n", encoding="utf-8")


def prepare(workdir: Path, *, n_rows: int, n_layers: int, cutoff_len: int, batch_size: int) -> dict[str, Any]:
    """Pairs (built by our build stage), model checkpoint, dpo recipe, both sides' tokens and the epoch plans."""
    from pipeline.data.build import build
    from pipeline.data.loaders import pair_loader, plan_batches
    from pipeline.data.pairs import tokenized_pairs

    write_pairs(workdir / "data", pair_rows(n_rows))
    model = workload.save_gpt2_small_widths(workdir / f"model-{n_layers}l", n_layers)
    keys = {**workload.sft_recipe_keys(workdir, model=str(model), cutoff_len=cutoff_len, batch_size=batch_size,
                                       val_size=max(0.005, 2 * batch_size / n_rows)),
            "stage": "dpo", "dataset": NAME, "pref_loss": "sigmoid", "pref_beta": BETA,
            "output_dir": str(workdir / "saves" / "dpo")}
    recipe = workload.write_recipe(workdir / "dpo.yaml", keys)
    build(data_args(workload.resolve_recipe(recipe)))
    r = workload.resolve_recipe(recipe)
    pairs = tokenized_pairs(data_args(r), "train")
    sides = workdir / "pairs.npz"
    np.savez(sides, **{f"{side}_{k}": getattr(getattr(pairs, side), k) for side in ("chosen", "rejected")
                       for k in ("ids", "trainable", "offsets")})
    loader = pair_loader(data_args(r), "train")
    lengths = pairs.example_lengths()
    total = pairs.chosen.example_lengths() + pairs.rejected.example_lengths()
    epoch = {"ours": [loader.indices(k) for k in range(len(loader))],
             "trl": plan_batches(len(pairs), lengths, batch_size=batch_size, seed=42, drop_last=True,
                                 group_by_length=False)}
    return {"recipe": str(recipe), "pairs": str(sides), "epoch": epoch, "lengths": lengths, "total": total,
            "n_train": len(pairs)}


def pair_padding_share(plan: list[np.ndarray], lengths: np.ndarray, total: np.ndarray) -> float:
    """Share of computed positions that are padding when both sides of a batch's pairs are padded to its longest."""
    useful = sum(int((total[b] - 2).sum()) for b in plan)
    computed = sum(int(lengths[b].max() - 1) * 2 * len(b) for b in plan)
    return 1 - useful / computed


class TRL:
    """trl.DPOTrainer + PEFT LoRA as LLaMA-Factory runs it (see the module docstring), driven by trainer.train()."""

    name = "trl"

    def __init__(self, n_layers: int, examples: list[dict], batch_size: int, workdir: str):
        import datasets
        import torch
        import trl
        from peft import LoraConfig
        from tokenizers import Tokenizer, models
        from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, TrainerCallback

        torch.manual_seed(0)
        config = GPT2Config(n_embd=768, n_layer=n_layers, n_head=12, n_positions=1024, vocab_size=50257,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        base = GPT2LMHeadModel(config).to(torch.bfloat16)  # LLaMA-Factory: torch_dtype = compute dtype
        lora = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, fan_in_fan_out=True,
                          target_modules=["c_attn", "c_proj", "c_fc"], task_type="CAUSAL_LM")
        # the pairs are token ids already: a placeholder tokenizer gives TRL its pad token (GPT-2's: EOS)
        vocab = {f"t{i}": i for i in range(50256)} | {"<|endoftext|>": 50256}
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                            eos_token="<|endoftext|>", pad_token="<|endoftext|>")
        args = trl.DPOConfig(output_dir=workdir, per_device_train_batch_size=batch_size, max_steps=len(examples)
                             // batch_size, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
                             max_grad_norm=1.0, bf16=True, use_cpu=True, gradient_checkpointing=False,
                             beta=BETA, loss_type=["sigmoid"], max_length=None, logging_steps=1,
                             save_strategy="no", report_to="none", disable_tqdm=True, seed=42,
                             dataloader_num_workers=0)
        self.times: list[float] = []
        self.losses: list[float] = []
        times, losses = self.times, self.losses

        class Timer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                self.t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                times.append(time.perf_counter() - self.t)

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    losses.append(float(logs["loss"]))

        class InOrder(trl.DPOTrainer):
            """The plan's batches in the plan's order (the sampler shuffles otherwise); token ids as given."""

            def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                return dataset

            def _get_train_sampler(self, *a, **kw):
                import torch.utils.data

                return torch.utils.data.SequentialSampler(self.train_dataset)

        self.trainer = InOrder(model=base, args=args, train_dataset=datasets.Dataset.from_list(examples),
                               processing_class=tokenizer, peft_config=lora, callbacks=[Timer()])

    def run(self) -> None:
        self.trainer.train()


def trl_examples(pairs: dict[str, np.ndarray], indices: np.ndarray) -> list[dict]:
    """TRL's pre-tokenized form of our pairs: the shared prompt, then each side's scored tail."""
    out = []
    for i in indices:
        sides = {}
        for side in ("chosen", "rejected"):
            a, b = int(pairs[f"{side}_offsets"][i]), int(pairs[f"{side}_offsets"][i + 1])
            ids, trainable = pairs[f"{side}_ids"][a:b].tolist(), pairs[f"{side}_trainable"][a:b]
            start = int(np.argmax(trainable))
            sides[side] = (ids[:start], ids[start:])
        out.append({"prompt_ids": sides["chosen"][0], "chosen_ids": sides["chosen"][1],
                    "rejected_ids": sides["rejected"][1]})
    return out


def child(contender: str, n_layers: int, recipe: str, pairs: str, batches: list[list[int]], workdir: str,
          profile: bool = False) -> dict[str, Any]:
    """One contender in this process: warm up on batches[0], then time one optimizer step per later batch."""
    import torch

    t0 = time.perf_counter()
    data = dict(np.load(pairs))
    groups = [np.array(b) for b in batches]
    lengths = {s: np.diff(data[f"{s}_offsets"]) for s in ("chosen", "rejected")}
    useful = int(sum(int((lengths["chosen"][g] - 1).sum() + (lengths["rejected"][g] - 1).sum()) for g in groups[1:]))
    width = [int(max(lengths["chosen"][g].max(), lengths["rejected"][g].max())) for g in groups[1:]]
    result: dict[str, Any] = {"contender": contender, "useful_tokens": useful}
    if contender == "ours":
        from pipeline.train.run import preference_objective

        ours = Ours(recipe, [])
        where = {tuple(ours.loader.indices(k)): k for k in range(len(ours.loader))}
        built = [ours.loader.batch(where[tuple(g)]) for g in groups]  # KeyError: not a batch of our plan
        step = ours.trainer(built, objective=preference_objective(ours.r, ours.engine))
        result["setup_seconds"] = round(time.perf_counter() - t0, 2)
        step()  # warm-up: allocations, kernel selection
        times = []
        cpu0 = time.process_time()
        for _ in built[1:]:
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        cpu = time.process_time() - cpu0
        result["computed_tokens"] = sum(int(b["input_ids"].numel()) for b in built[1:])
        result["loss"] = ours.last_loss
        if profile:
            from bench.profiling import profile_step

            result["peak_rss_mb"] = common.peak_rss_mb()  # before the extra step
            result["profile"] = profile_step(step)
    else:
        examples = [e for g in groups for e in trl_examples(data, g)]
        runner = TRL(n_layers, examples, len(groups[0]), workdir)
        result["setup_seconds"] = round(time.perf_counter() - t0, 2)
        cpu0 = time.process_time()
        runner.run()
        cpu = time.process_time() - cpu0  # includes the warm-up step: scaled below
        times = runner.times[1:]
        cpu *= sum(times) / max(sum(runner.times), 1e-9)
        result["computed_tokens"] = sum((w - 1) * 2 * len(g) for w, g in zip(width, groups[1:]))
        result["loss"] = runner.losses[-1] if runner.losses else float("nan")
        if profile:
            result["peak_rss_mb"] = common.peak_rss_mb()
            from bench.profiling import profile_step

            runner.trainer.args.max_steps = 1  # one more train(): its first (warm-up) batch, setup included
            result["profile"] = profile_step(runner.run)
    result.update({"step_seconds": [round(x, 4) for x in times], "seconds": sum(times),
                   "tokens_per_s": useful / sum(times), "cpu_seconds": cpu, "tokens_per_cpu_s": useful / cpu,
                   "torch_threads": torch.get_num_threads()})
    return result


def run(workdir: Path, *, quick: bool, budget_s: float, log_file: Path, n_layers: int) -> dict[str, Any]:
    steps = 2 if quick else 4
    batch_size, cutoff_len = 4, 512
    started = common.loadavg()
    prep = prepare(workdir / "dpo", n_rows=300 if quick else 600, n_layers=n_layers, cutoff_len=cutoff_len,
                   batch_size=batch_size)
    lengths, total, epoch = prep["lengths"], prep["total"], prep["epoch"]
    picked = {name: pick_batches(plan, lengths, steps) for name, plan in epoch.items()}
    base = {"n_layers": n_layers, "recipe": prep["recipe"], "pairs": prep["pairs"]}

    def contender(name: str):
        def go(k: int) -> dict:
            warm, timed = picked[name]
            batches = [[int(i) for i in b] for b in [warm, *timed]]
            return common.run_child("bench.dpo:child", {**base, "contender": name, "batches": batches,
                                                        "workdir": str(workdir / "dpo" / f"trl-{k}"),
                                                        "profile": k == 0},
                                    timeout=1800, log_file=log_file)
        return go

    print(f"dpo: {steps} timed steps (+1 warm-up) of {batch_size} pairs per contender, gpt2-small widths, "
          f"{n_layers} layers")
    results = common.rounds({n: contender(n) for n in CONTENDERS}, min_rounds=1 if quick else 2,
                            max_rounds=1 if quick else 3, budget_s=budget_s)
    summary = {name: common.throughput_summary(runs, pair_padding_share(epoch[name], lengths, total)) for name, runs in results.items()}
    ours, peer = summary["ours"], summary["trl"]
    ratios = {"tokens_per_s_vs_trl": ours["tokens_per_s"] / peer["tokens_per_s"],
              "tokens_per_cpu_s_vs_trl": ours["tokens_per_cpu_s"] / peer["tokens_per_cpu_s"],
              "tokens_per_s_vs_trl_by_round": [o["tokens_per_s"] / t["tokens_per_s"]
                                               for o, t in zip(results["ours"], results["trl"])],
              "peak_rss_vs_trl": ours["peak_rss_mb"] / peer["peak_rss_mb"]}
    targets = [common.check(ratios["tokens_per_s_vs_trl"], ">=", 1.5,
                            "dpo useful tokens/s vs TRL DPOTrainer+PEFT"),
               common.check(ratios["peak_rss_vs_trl"], "<=", 0.7, "dpo peak RSS vs TRL DPOTrainer+PEFT")]
    rows = [(n, s["tokens_per_s"], s["tokens_per_s"] / peer["tokens_per_s"],
             s["tokens_per_cpu_s"] / peer["tokens_per_cpu_s"],
             f"{s['padding_share']:.0%} ({s['epoch_padding_share']:.0%})", s["peak_rss_mb"],
             s["peak_rss_mb"] / peer["peak_rss_mb"], s["rounds"]) for n, s in summary.items()]
    text = common.table(["contender", "useful tokens/s", "vs trl", "vs trl (CPU time)", "padding: timed (epoch)",
                         "peak RSS MB", "RSS vs trl", "rounds"], rows)
    print(text)
    profiles = {name: next((r.get("profile") for r in runs if r.get("profile")), None)
                for name, runs in results.items()}
    payload = {"config": {"model": f"gpt2-small widths (768, 12 heads, vocab 50257), {n_layers} layers",
                          "lora": "r=16, alpha 32, attention + MLP", "precision": "bf16",
                          "loss": f"sigmoid (DPO), beta {BETA}, reference = adapters off",
                          "batch_size_pairs": batch_size, "cutoff_len": cutoff_len, "timed_steps": steps,
                          "pairs_train": prep["n_train"],
                          "pair_tokens_p50_p90_max": [float(np.percentile(total, 50)),
                                                      float(np.percentile(total, 90)), int(total.max())]},
               "summary": summary, "ratios": ratios, "targets": targets, "table": text,
               "profile_ours": profiles["ours"], "profile_trl": profiles["trl"],
               "runs": {n: [{k: v for k, v in r.items() if k != "profile"} for r in runs]
                        for n, runs in results.items()}}
    common.save("dpo", payload, started)
    return payload
