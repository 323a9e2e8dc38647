"""`python -m pipeline train RECIPE`: the training stage, read top to bottom.

    distributed init -> resume point and output_dir policy -> data -> exact step counts -> model
    -> AdamW + schedule -> DeepSpeed engine -> (resume) -> loop -> final checkpoint -> adapter/ or model/

One rank is a plain python process; several go through the deepspeed launcher
(`deepspeed --num_gpus N --module pipeline train RECIPE`, which `make train NPROC=N` runs). Every rank runs
this same code; only rank 0 prints and writes the shared files.

Exit codes: 0 done; 2 a user mistake (bad recipe, unusable checkpoint, non-finite loss, out of memory: the
message says what to change); 130 after Ctrl-C and 143 after SIGTERM, both once a checkpoint is saved
(not 0, so that `make` does not treat an interrupted run as finished; continue it with
resume_from_checkpoint=latest).
"""
from __future__ import annotations

import contextlib
import io
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from pipeline.recipe import batches_per_step
from pipeline.recipe.args import data_args
from pipeline.recipe.exact import exact_steps
from pipeline.recipe.typed import run_this_for, typed_overrides
from pipeline.recipe.dsconfig import one_rank_zero3_notice
from pipeline.recipe.notices import after_validate, warmup_notice
from pipeline.recipe.precision import eval_precision, weights_dtype
from pipeline.errors import UserError
from pipeline.names import PREFERENCE_STAGES, dpo_terms, token_loss, token_loss_history, token_loss_label, \
    trains_adapter, uses_reference
from pipeline.runtime import deepspeed_compat, dist, guard, hostmem
from pipeline.runtime.layout import RunLayout
from pipeline.model.optimizer_state import OTHER_OPTIMS, effective_optim_args
from pipeline.model.moe import zero_stage_policy
from pipeline.train import checkpoint
from pipeline.train.checkpoint import TrainState

OPTIMIZERS = {"use_muon": "Muon", "use_galore": "GaLore", "use_apollo": "APOLLO", "use_adam_mini": "Adam-mini",
              "use_badam": "BAdam"}  # the plan


@dataclass
class TrainResult:
    """What a run leaves in memory (tests look at the engine; the CLI needs only the exit code)."""

    exit_code: int
    engine: Any
    state: TrainState
    output_dir: Path
    final: Path | None = None  # output_dir/adapter or output_dir/model


def retraining(r: Any, args: Any = None) -> bool:
    """Whether this is `make train` on a stale finished run of the recipe (--retrain-finished), which train trains
    again from scratch; every rank decides here, before prepare_output_dir's barrier."""
    return bool(getattr(args, "retrain_finished", False)) and not r["overwrite_output_dir"] and \
        not r["resume_from_checkpoint"] and RunLayout.of(r["output_dir"]).finished_by(r.recipe_path)


@dataclass(frozen=True)
class Start:
    """What check_start found, which train goes on with: the checkpoint it resumes (None: a fresh run) and the
    steps PIPELINE_PROFILE asks to profile (None: none, or not rank 0)."""

    resume: Path | None
    profile: Any


def check_start(r: Any, args: Any = None, warn: bool = True) -> Start:
    """Every refusal of train that needs no model and no data, asked without writing anything: the combinations the
    trainer cannot honour (preflight), the DeepSpeed JSON (check_ds_config), PIPELINE_PROFILE, the checkpoint it
    resumes and a folder it may not start in (check_output_dir). One list, asked by train itself and, before
    overwrite_cache's build (pipeline.__main__.steps), by main: the build rewrote the data and only then was the
    run refused. `warn`: whether find_resume says which damaged checkpoints it skipped (main asks quietly; train,
    which asks again after the build, says it: once, not twice)."""
    from pipeline.train import step_profile

    if retraining(r, args):
        r = r.replace(overwrite_output_dir=True)
    preflight(r)
    check_ds_config(r)
    profile = step_profile.from_env(dist.rank())
    resume = checkpoint.find_resume(r["resume_from_checkpoint"], r["output_dir"],
                                    checkpoint.where(r, "resume_from_checkpoint"), warn=warn)
    check_output_dir(r, resume)
    return Start(resume, profile)


def run(r: Any, args: Any = None) -> int:
    retrain = retraining(r, args)
    if getattr(args, "dry_run", False):
        from pipeline.train import dryrun

        # `make train ARGS=--dry-run`: that finished run is make's to retrain or leave, not in the real run's way
        return dryrun.run(r.replace(overwrite_output_dir=True) if retrain else r, train)
    if retrain:
        if dist.is_main():
            print(f"note: {r['output_dir']} holds a finished run of {r.recipe_path} that is out of date; training "
                  "it again from scratch", file=sys.stderr)
        r = r.replace(overwrite_output_dir=True)
    return train(r).exit_code


def train(r: Any, one_step: Any = None) -> TrainResult:
    """A whole run; with `one_step` (pipeline.train.dryrun.OneStep) it stops and saves after the first step."""
    dist.init(r.get("ddp_timeout"))
    import deepspeed

    from pipeline.data.loaders import make_loader
    from pipeline.model import lora
    from pipeline.model.build import base_as_built, base_subset, build_model, build_skeleton
    from pipeline.recipe.args import recipe_args, train_args
    from pipeline.data.added_tokens import TokenNames
    from pipeline.runtime.log import Reporters, TrainLog
    from pipeline.recipe.evaluation import evaluates, train_loader, val_split_used
    from pipeline.train.loop import StopRequest, Trainer, Window, evaluate, loss_keywords
    from pipeline.train import step_profile
    from pipeline.train.optim import kept_adagrad, make_optimizer, no_startup_step
    from pipeline.train.badam import every_block_trainable
    from pipeline.train.schedule import make_scheduler

    if r["world_size"] != dist.world_size():
        raise RuntimeError(f"the recipe was resolved for {r['world_size']} ranks but torch.distributed has "
                           f"{dist.world_size()}")
    # every refusal the recipe and output_dir decide, before anything is written or the model loads (minutes)
    start = check_start(r)
    resume, profile = start.resume, start.profile
    if dist.is_main():
        precision_notice(r)
        zero3 = one_rank_zero3_notice(r)
        if zero3:
            print(zero3, file=sys.stderr, flush=True)
    notices = checkpoint.check_compatible(r, resume) if resume is not None else []
    loss_changes = checkpoint.token_loss_changes(r, resume)

    seed_everything(r["seed"])
    rank, world = dist.rank(), dist.world_size()
    loader = train_loader(r, rank=rank, world_size=world, epoch=0, shuffle=True)  # empty: refused at cutoff_len
    r = exact_steps(r, loader, data_args(r))
    if dist.is_main() and (warmup := warmup_notice(r)):  # of the steps this run makes (recipe.notices)
        print(warmup, file=sys.stderr, flush=True)
    if resume is not None:
        checkpoint.check_schedule(r, resume)  # before output_dir is touched
    if one_step is not None:
        one_step.recipe = r  # the dry-run report extrapolates from the exact step count
    # held-out rows that give no example to an evaluation the run makes: refused there, at the key (validate too)
    val_loader = make_loader(data_args(r), "val", rank=rank, world_size=world, shuffle=False) \
        if val_split_used(r) else None
    # read straight into the dtype DeepSpeed trains in; a resumed PiSSA run takes its starting pairs (the residual
    # base) from the checkpoint's converted adapter, not from the SVD again
    pissa_start = RunLayout(resume).adapter if resume is not None and r["pissa_init"] else None
    model = build_model(*recipe_args(r), dtype=compute_dtype(r), pissa_start=pissa_start)
    if r["stage"] == "ppo":
        from pipeline.train.ppo import attach_value_head

        attach_value_head(model, r["seed"])  # trained beside the adapter (pipeline.train.ppo)
    enable_features(model, r)
    output_dir = prepare_output_dir(r, resume)  # only now: a bad recipe, data or model never empties it

    check_contiguous(model)
    args = train_args(r)
    optimizer = make_optimizer(model, args)
    scheduler = make_scheduler(optimizer, args)  # before no_startup_step: it wraps the optimizer's own step
    # BAdam: masters for every layer; ZeRO: the Adagrad built here is the one stepped
    # sparse MoE blocks under ZeRO 1-3 (each rank's tokens route to other experts): pipeline.model.moe
    deepspeed_compat.z3_leaf_modules(model, zero_stage_policy(model, r.ds_config))
    with every_block_trainable(optimizer), no_startup_step(optimizer), kept_adagrad(optimizer):
        # stage ppo steps the schedule once per PPO step, not per update (TRL's PPOTrainer.step)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=r.ds_config,
                                          lr_scheduler=None if r["stage"] == "ppo" else scheduler)
    checkpoint.attach(engine)  # safetensors + JSON checkpoints, never pickle
    objective = (preference_objective(r, engine) if r["stage"] in PREFERENCE_STAGES
                 else reward_objective(r, engine) if r["stage"] == "rm"
                 else asft_objective(r, engine) if r["stage"] == "sft" and r["use_asft_loss"] else None)
    # built before the resumed RNG state is set: loading the reward model draws from it
    trainer_class, extra = (Trainer, {}) if r["stage"] != "ppo" else ppo_parts(r, engine, scheduler)
    change = checkpoint.resumed_world_change(r, resume) if resume is not None else None  # another rank count
    state = checkpoint.load(engine, resume, change) if resume is not None else TrainState()
    if resume is not None:
        if r["stage"] == "ppo":  # its schedule steps once per PPO step, outside DeepSpeed: it stands at the step
            scheduler.last_epoch = state.global_step
        # a new learning rate or schedule (docs/resume.md)
        checkpoint.apply_changes(engine, r, resume, scheduler if r["stage"] == "ppo" else None)
    hostmem.release_freed()  # what the build left free inside the heaps, before the steps add theirs
    if dist.is_main():
        write_run_files(r, output_dir)
        print_plan(r, model, loader, resume, state, loss_changes)
        for notice in [*notices, accuracy_notice(r, val_loader is not None and evaluates(args))]:
            if notice:
                print(notice, file=sys.stderr, flush=True)

    exporter = exporter_class(r)(engine, r["model_name_or_path"], r["finetuning_type"],
                        lambda: quietly(build_model, *recipe_args(r)),
                        tokenizer_from=data_args(r).tokenizer_name_or_path,
                        skeleton=lambda: build_skeleton(*recipe_args(r)),
                        pissa_start=lora.pissa_start(model),
                        frozen=((lambda names: quietly(base_subset, recipe_args(r).model, names))
                                if base_as_built(*recipe_args(r)) else None),
                        new_tokens=TokenNames.of(data_args(r)), split_special_tokens=r["split_special_tokens"],
                        dtype=weights_dtype(r))
    saved = checkpoint.saved_recipe(r, loss_changes)
    resume_step = state.global_step if resume else None
    log = TrainLog(output_dir, enabled=dist.is_main(), resume_step=resume_step,
                   reporters=Reporters(r["report_to"], r.to_dict(), output_dir, enabled=dist.is_main(),
                                       resume_step=resume_step, run_name=r["run_name"]))
    # the loaders inside the stop's scope: however the run ends, their DataLoader workers (which leave a SIGTERM or
    # Ctrl-C to this process) are ended before the handlers are given back
    with one_step or StopRequest() as stop, loader, val_loader or contextlib.nullcontext():
        evaluate_now = None
        if val_loader is not None:
            evaluate_now = ((lambda: objective.evaluate(val_loader)) if objective
                            else (lambda: evaluate(engine, val_loader, args.compute_accuracy, loss_keywords(args),
                                                   trainer.moe_aux)))
        trainer = trainer_class(engine, args, state, loader, evaluate=evaluate_now, **extra,
                          save=lambda: checkpoint.save(engine, args, state, exporter, saved, trainer.window.sums(),
                                                       trainer.checkpoint_state()),
                          log=log, stop=stop,
                          objective=objective, profiler=step_profile.StepProfiler(profile))
        if resume is not None:
            trainer.restore(checkpoint.saved_objective(resume))  # dpo's BCO running mean, ppo's KL coefficient
            trainer.last_saved_step = state.global_step  # that checkpoint exists already
            trainer.last_record = logged_so_far(output_dir)  # all_results' losses when no step is left to log
            trainer.window = (  # the log line under way, from every saved rank's share on another rank count
                Window.regrouped(checkpoint.saved_log_windows(resume, change.saved_world), dist.world_size(),
                                 dist.rank()) if change else Window.resumed(checkpoint.saved_log_window(resume)))
        try:
            with explain_out_of_memory(r, state):
                outcome = trainer.train()
            if outcome == "stopped" and one_step is not None:
                return TrainResult(0, engine, state, output_dir)
            if outcome == "stopped":
                if dist.is_main():
                    print(f"stopped at step {state.global_step}: saved {output_dir}/checkpoint-{state.global_step}; "
                          "continue with resume_from_checkpoint=latest", file=sys.stderr)
                log.close()
                return TrainResult(stop.exit_code, engine, state, output_dir)
            if trainer.last_saved_step != state.global_step:
                trainer.flush_tokens()
                checkpoint.save(engine, args, state, exporter, saved, objective=trainer.checkpoint_state())
            # the weights of the checkpoint just saved (or saved at this step before a resume): linked, not rewritten
            final = exporter.write(output_dir, same_as=checkpoint.step_dir(output_dir, state.global_step))
        except Exception as err:
            if not peer_died(err):
                raise
            report_dead_peer(err, output_dir, trainer.last_saved_step)

    log.close()
    if dist.is_main():
        train_loss = trainer.mean_loss()
        if train_loss is None:  # this call trained no step
            train_loss = earlier_train_loss(output_dir, state.global_step)
        finish(r, output_dir, {**trainer.last_record, "train_loss": train_loss}, state, loader, final, loss_changes)
    dist.barrier()
    return TrainResult(0, engine, state, output_dir, final)


def preference_objective(r: Any, engine: Any) -> Any:
    """stage dpo / kto: the preference loss with its reference (pipeline.train.preference)."""
    from pipeline.recipe.args import preference_args, recipe_args
    from pipeline.train.preference import KtoObjective, PreferenceObjective, build_reference

    pref = preference_args(r)
    reference = build_reference(pref, recipe_args(r), engine, dtype=compute_dtype(r),
                                zero3_config=r.ds_config if r["zero_stage"] == 3 else None)
    what = reference.description if reference is not None else "none (reference-free loss)"
    if r["stage"] == "kto":
        if dist.is_main():
            print(f"kto: pref_beta {pref.pref_beta}, kto_chosen_weight {pref.kto_chosen_weight}, kto_rejected_weight "
                  f"{pref.kto_rejected_weight}; reference: {what}", file=sys.stderr)
        return KtoObjective(pref, engine, reference)
    if dist.is_main():
        extras = "".join(f", {key} {value}" for key, value in (("ld_alpha", pref.ld_alpha),
                                                               ("pref_bco_weight", pref.pref_bco_weight)) if value)
        print(f"dpo: pref_loss {pref.pref_loss}, pref_beta {pref.pref_beta}{extras}; reference: {what}", file=sys.stderr)
    return PreferenceObjective(pref, engine, reference)


def exporter_class(r: Any) -> Any:
    """stage ppo writes the value head beside the adapter (pipeline.train.ppo); the others the plain Exporter."""
    from pipeline.train.export import Exporter
    from pipeline.train.ppo import ValueHeadExporter

    return ValueHeadExporter if r["stage"] == "ppo" else Exporter


def ppo_parts(r: Any, engine: Any, scheduler: Any) -> tuple[Any, dict[str, Any]]:
    """stage ppo: its trainer and what it needs beside the base Trainer's arguments: the reward model (or server), the
    reference (the starting model: the policy with its adapters off under LoRA / OFT, a frozen copy under full /
    freeze, as LLaMA-Factory's create_ref_model, which copies under OFT too: the same model), the tokenizer's pad id
    and the ids LLaMA-Factory's rollouts stop at (Template.ppo_stop_ids), the decoding keys."""
    from pipeline.data.model_tokenizer import recipe_tokenizer
    from pipeline.model.reward import ServerScorer
    from pipeline.recipe.args import GenerationArgs, ppo_args, recipe_args
    from pipeline.train.ppo import PPOTrainer, describe, load_reward_model
    from pipeline.train.preference import disable_dropout, starting_reference

    ppo, generation, data = ppo_args(r), GenerationArgs.from_recipe(r), data_args(r)
    tokenizer, template = recipe_tokenizer(data), data.chat_template()
    if ppo.reward_model_type == "api":  # a reward server: the rule checked its URL and that it answers
        reward: Any = ServerScorer.for_policy(ppo.reward_model, tokenizer, r["per_device_train_batch_size"])
    else:
        reward = load_reward_model(ppo.reward_model, ppo.reward_model_type, recipe_args(r).model, engine.device,
                                   compute_dtype(r), tokenizer.pad_id)
        disable_dropout(reward.model)
    # under ZeRO 3 a full / freeze policy's frozen copy is partitioned as the policy is (an engine of its own, as
    # TRL's PPOTrainer._prepare_deepspeed does): it is as large as the policy, and every rank runs its one forward
    # of a step, so its per-layer gathers line up whatever the responses' lengths
    reference = starting_reference(None, None, recipe_args(r), engine, dtype=compute_dtype(r),
                                   zero3_config=r.ds_config if r["zero_stage"] == 3 else None)
    describe(ppo.reward_model, ppo.reward_model_type, reward, ppo, generation, reference.description)
    return PPOTrainer, {"reward_model": reward, "reference": reference, "pad_id": tokenizer.pad_id,
                        "stop_ids": template.ppo_stop_ids(tokenizer), "generation": generation, "ppo": ppo,
                        "scheduler": scheduler, "seed": int(r["seed"])}


def asft_objective(r: Any, engine: Any) -> Any:
    """stage sft with use_asft_loss: LLaMA-Factory's ASFT loss against the starting model (pipeline.train.asft)."""
    from pipeline.recipe.args import recipe_args
    from pipeline.train.asft import AsftObjective
    from pipeline.train.preference import starting_reference

    reference = starting_reference(r["ref_model"], r["ref_model_adapters"], recipe_args(r), engine,
                                   dtype=compute_dtype(r), zero3_config=r.ds_config if r["zero_stage"] == 3 else None)
    if dist.is_main():
        print(f"sft: ASFT loss, asft_alpha {r['asft_alpha']:g}; reference: {reference.description}", file=sys.stderr)
    return AsftObjective(engine, reference, float(r["asft_alpha"]))


def reward_objective(r: Any, engine: Any) -> Any:
    """stage rm: the pairwise loss on the score of the token transformers pools (pipeline.train.reward)."""
    from pipeline.data.model_tokenizer import recipe_tokenizer
    from pipeline.recipe.args import data_args
    from pipeline.train.reward import RewardObjective

    return RewardObjective(engine, recipe_tokenizer(data_args(r)).pad_id)


def compute_dtype(r: Mapping[str, Any]) -> Any:
    """The dtype the model is built in and computes in: bf16 (bf16, or pure_bf16, where it also trains in it with
    no fp32 master copy: pipeline.recipe.dsconfig.bf16_section), fp16, else fp32."""
    import torch

    from pipeline.recipe.precision import precision

    return {"pure_bf16": torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16}.get(precision(r),
                                                                                           torch.float32)


# ---------------------------------------------------------------------------------------------- before training

def trains_in_full(r: Mapping[str, Any]) -> bool:
    """Whether a LoRA run trains whole modules beside the adapter: additional_target, or resize_vocab (set by
    new_special_tokens that add a token), which trains the embedding and the head (model.build)."""
    from pipeline.recipe.args import recipe_args

    finetune = recipe_args(r).finetune
    return bool(finetune.additional_target) or finetune.resize_vocab


def preflight(r: Mapping[str, Any]) -> None:
    """Combinations the trainer cannot honour, caught before any work."""
    if r["l1_lambda"] and r["zero_stage"] == 3:
        raise UserError("l1_lambda > 0 needs the whole trainable weights on every rank, but zero_stage 3 "
                        "partitions them; use zero_stage 2 (or lower), or set l1_lambda: 0")
    if ((uses_reference(r["stage"], r["pref_loss"], r["use_asft_loss"]) or r["stage"] == "ppo")
            and trains_adapter(r["finetuning_type"])
            and r["ref_model"] is None and r["zero_stage"] == 3 and trains_in_full(r)):
        raise UserError("additional_target modules (with resize_vocab or added tokens: the embedding and the "
                        "head) train in full, and under zero_stage 3 their starting weights cannot be kept for the "
                        f"{r['stage']} reference (the base with the adapters off); use zero_stage 2 (or lower), give "
                        "ref_model, or remove additional_target")
    from pipeline.recipe.rules.optimizers import zero_zero_settings
    from pipeline.recipe.rules.training import PURE_BF16_OFFLOAD, PURE_BF16_ZERO3

    for key, given, why in zero_zero_settings(r):
        if r["zero_stage"] != 0:  # a deepspeed JSON's stage (the recipe's own: rules.optimizers' *_fits)
            raise UserError(f"{r['deepspeed']}: zero_optimization.stage is {r['zero_stage']} with {key}: {given}: "
                            + why.format(stage=r["zero_stage"], fix="set zero_optimization.stage to 0 there",
                                         plan=run_this_for("plan", r)))
    from pipeline.recipe.rules.quantization import quantization_zero3, quantized_base

    if why := quantization_zero3(r):  # a deepspeed JSON's, as above
        raise UserError(f"{r['deepspeed']}: zero_optimization.stage is 3 {quantized_base(r).given}: "
                        + why.format(fix="set zero_optimization.stage to 2 there"))
    if r["pure_bf16"] and r["zero_stage"] == 3:  # a deepspeed JSON's, as above
        raise UserError(f"{r['deepspeed']}: zero_optimization.stage is 3 with pure_bf16: true: "
                        + PURE_BF16_ZERO3.format(fix="set zero_optimization.stage to 2 (or lower) there"))
    if r["pure_bf16"] and r["zero_stage"] in (1, 2) and r["offload_optimizer"] != "none":
        raise UserError(f"{r['deepspeed']}: zero_optimization.offload_optimizer is {r['offload_optimizer']} with "
                        f"pure_bf16: true: {PURE_BF16_OFFLOAD}")
    if r["pure_bf16"]:
        pure_bf16_device()


def pure_bf16_device() -> None:
    """pure_bf16 trains the weights in bf16: refused on a GPU without bf16 (LLaMA-Factory: "This device does not
    support `pure_bf16`"). A CPU has bf16 (emulated where it lacks avx512_bf16 / AMX: the precision notice)."""
    import torch

    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise UserError(f"pure_bf16: true trains the weights in bfloat16, which this GPU "
                        f"({torch.cuda.get_device_name()}) does not support (Ampere or newer has it); set "
                        "pure_bf16: false (fp32), or fp16: true on this GPU")


def enable_features(model: Any, r: Mapping[str, Any]) -> None:
    """Gradient checkpointing per the recipe (with the allocator policy that goes with it, pipeline.runtime.hostmem);
    NEFTune's noisy embeddings (the model being trained only: a dpo reference is another model, or this one in eval
    mode); neat_packing only where the model can honour it.

    neat_packing needs a forward that takes segment_ids (block-diagonal attention with restarting
    positions); silently training with cross-example attention instead would change the results.
    """
    import inspect

    if r["neat_packing"] and "segment_ids" not in inspect.signature(model.forward).parameters:
        raise UserError(f"{checkpoint.where(r, 'neat_packing')}: neat_packing needs an attention path that keeps "
                        f"packed examples apart, and the model {r['model_name_or_path']!r} "
                        f"({type(model).__name__}) has none; set neat_packing: false (plain packing: examples "
                        "in a row attend to each other) or packing: false")
    setter = getattr(model, "set_gradient_checkpointing", None)
    if not r["disable_gradient_checkpointing"]:
        if setter is None:
            raise UserError(f"{checkpoint.where(r, 'disable_gradient_checkpointing')}: the model "
                            f"{type(model).__name__} cannot recompute activations; set "
                            "disable_gradient_checkpointing: true")
        setter(True)
        hostmem.tune_malloc()  # memory first: freed activations go back to the system (pipeline.runtime.hostmem)
    if r["neftune_noise_alpha"]:
        model.set_neftune(float(r["neftune_noise_alpha"]))


def accuracy_notice(r: Mapping[str, Any], evaluating: bool) -> str | None:
    """compute_accuracy in a run that evaluates nothing (no val split, or eval_strategy no and do_eval false):
    LLaMA-Factory's Trainer then never calls the metric and says nothing; here the user hears why no
    eval_accuracy will be logged."""
    if not r["compute_accuracy"] or evaluating:
        return None
    return (f"notice: {checkpoint.where(r, 'compute_accuracy')}: accepted without effect: this run evaluates "
            "nothing, so no eval_accuracy is logged; hold out rows (val_size) or name an eval_dataset, with "
            "eval_strategy / eval_steps or do_eval")


def precision_notice(r: Any) -> None:
    """bf16 on a CPU that emulates it: say so before the first step (the cost measured here, ~0.1 s)."""
    import torch

    from pipeline.recipe.precision import bf16_notice, measured_slowdown

    if bf16_notice(r, cuda=torch.cuda.is_available()) is not None:
        print(bf16_notice(r, cuda=torch.cuda.is_available(), measured=measured_slowdown()), file=sys.stderr, flush=True)


def check_ds_config(r: Any) -> None:
    """DeepSpeed's own config models read the DeepSpeed JSON now, before output_dir is touched.

    deepspeed.initialize would otherwise reject an unknown or mistyped key with a pydantic traceback.
    """
    import pydantic

    try:
        deepspeed_compat.validate_config(r.ds_config, r["world_size"])
    except pydantic.ValidationError as err:
        if r["deepspeed"] is None:  # the JSON is the pipeline's own: a bug, not a user mistake
            raise
        config = r.ds_config
        raise UserError([f"{r['deepspeed']} ({checkpoint.where(r, 'deepspeed')}): "
                         f"{_ds_key_path(config, problem['loc'])}: {_ds_problem(err.title, problem)}"
                         for problem in err.errors()]) from None


def _ds_key_path(config: Any, loc: tuple) -> str:
    """Where in the JSON a pydantic error location is (DeepSpeed validates each section on its own)."""
    wanted = [str(part) for part in loc]

    def search(node: Any, path: list[str]) -> list[str] | None:
        if path[-len(wanted):] == wanted:
            return path
        children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, child in children:
            found = search(child, [*path, str(key)])
            if found:
                return found
        return None

    return ".".join(search(config, []) or wanted)


def _ds_problem(title: str, problem: Mapping[str, Any]) -> str:
    from pipeline.errors import did_you_mean

    if problem.get("type") != "extra_forbidden":
        return f"{problem['msg']} (given {json_short(problem.get('input'))})"
    allowed = deepspeed_compat.section_keys(title)
    if allowed is None:
        return "DeepSpeed does not know this key; remove it"
    key = str(problem["loc"][-1])
    return (f"DeepSpeed does not know this key{did_you_mean(key, allowed)}; this section takes "
            f"{', '.join(allowed)}")


def json_short(value: Any) -> str:
    import json

    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def check_output_dir(r: Mapping[str, Any], resume: Path | None) -> tuple[list[str], list[str]]:
    """Whether the run may start in output_dir, without changing anything there: a UserError when not (a folder
    holding another run that it neither resumes nor overwrites, or inputs that overwrite_output_dir would remove).
    Returns (output_dir's entries, the unfinished start among them). train asks first thing, before the data and
    the model are loaded (minutes for a large model, all spent before a refusal the folder alone decides), and
    prepare_output_dir asks again on the listing it then acts on."""
    output_dir = Path(r["output_dir"])
    at = checkpoint.where(r, "output_dir")
    layout = RunLayout(output_dir)
    entries = layout.entries()  # listed once: the refusal, the leftover and what is cleared all read this listing
    refusal = layout.start_refusal(at, kept=resume is not None or r["overwrite_output_dir"], entries=entries,
                                   recipe=getattr(r, "recipe_path", None), overrides=typed_overrides(r),
                                   ranks=r["world_size"])
    if refusal is not None:
        raise UserError(refusal)
    leftover = layout.unfinished_start(entries)
    if entries and resume is None and not leftover:
        from pipeline.data.build import source_files

        inputs = guard.protected({**{k: r[k] for k in guard.INPUT_KEYS}, **source_files(data_args(r))}, r.files)
        guard.refuse_to_clear(output_dir, at, "output_dir", inputs)  # overwrite_output_dir empties it
    return entries, leftover


def prepare_output_dir(r: Mapping[str, Any], resume: Path | None) -> Path:
    """A new run needs an empty output_dir (or overwrite_output_dir); a resumed one keeps it."""
    output_dir = Path(r["output_dir"])
    layout = RunLayout(output_dir)
    entries, leftover = check_output_dir(r, resume)
    if leftover and resume is None and not r["overwrite_output_dir"] and dist.is_main():
        print(f"note: {output_dir} holds only what a run that stopped before its first checkpoint wrote "
              f"({', '.join(leftover)}); starting over there", file=sys.stderr)
    dist.barrier()  # every rank has decided before rank 0 changes anything
    if dist.is_main():
        if resume is not None:  # the run goes on: an earlier finish's results no longer mark it finished
            layout.all_results.unlink(missing_ok=True)
        if entries and resume is None:  # overwrite_output_dir, or a start that never saved
            for name in entries:
                path = output_dir / name
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        output_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.clean_stale(output_dir)
    dist.barrier()
    return output_dir


def check_contiguous(model: Any) -> None:
    """Every parameter dense before DeepSpeed sees it: a bug message naming the tensor, not DeepSpeed's.

    DeepSpeed broadcasts (and ZeRO flattens) each parameter through `p.data.view(torch.uint8)`, which a
    strided view (a transposed checkpoint tensor, a slice) cannot give; the error it raises names nothing.
    Costs one flag read per parameter.
    """
    strided = [f"'{name}' (shape {list(p.shape)}, stride {list(p.stride())})"
               for name, p in model.named_parameters() if not p.is_contiguous()]
    if strided:
        raise RuntimeError(f"bug: {len(strided)} model parameter(s) are not contiguous in memory, which DeepSpeed "
                           f"cannot broadcast or partition: {', '.join(strided[:5])}"
                           f"{' ...' if len(strided) > 5 else ''}. The model loader must hand over dense tensors "
                           "(.contiguous()); please report this with the recipe's model_name_or_path")


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # every device's generator too


def quietly(func: Any, *args: Any) -> Any:
    """Call without its stderr notes (the export copy of the model repeats what the first build said)."""
    with contextlib.redirect_stderr(io.StringIO()):
        return func(*args)


def write_run_files(r: Any, output_dir: Path) -> None:
    from pipeline.io import write_json, write_text
    from pipeline.recipe import resolved_yaml

    write_text(RunLayout(output_dir).resolved_yaml, resolved_yaml(r))
    write_json(RunLayout(output_dir).ds_config, r.ds_config)


def _read_args(r: Mapping[str, Any]) -> str:
    """The optim_args that change the update (optimizer_state.effective_optim_args), for the plan's optimizer line:
    ', momentum=0.9, nesterov=True'."""
    return "".join(f", {key}={value:g}" if isinstance(value, float) else f", {key}={value}"
                   for key, value in effective_optim_args(r["optim"], r.get("optim_args")).items())


def print_plan(r: Mapping[str, Any], model: Any, loader: Any, resume: Path | None, state: TrainState,
               loss_changes: list[dict[str, Any]]) -> None:
    from pipeline.data.loaders import item_name
    from pipeline.model.lora import trainable_report
    from pipeline.model.moe import sparse_blocks
    from pipeline.recipe.precision import precision as recipe_precision

    pure = ("pure bf16 (bf16 base, the adapter in fp32 as PEFT upcasts it, with fp32 optimizer states)"
            if trains_adapter(r["finetuning_type"]) else "pure bf16 (bf16 weights and optimizer states, no fp32 "
                                                         "master copy)")
    precision = {"pure_bf16": pure}.get(recipe_precision(r), recipe_precision(r))
    items = item_name(data_args(r))
    lines = [
        trainable_report(model)[3],
        f"train: stage {r['stage']}, finetuning {r['finetuning_type']}, {precision}, ZeRO stage {r['zero_stage']}, "
        f"{dist.world_size()} rank(s)",
        f"data: {loader.num_examples:,} {items}, {len(loader):,} micro-batches of {loader.batch_size} per rank "
        f"per epoch; global batch {r['total_train_batch_size']} "
        f"({r['per_device_train_batch_size']} x {r['gradient_accumulation_steps']} accumulation x "
        f"{dist.world_size()} ranks)" + (f"; a PPO step: ppo_buffer_size {r['ppo_buffer_size']} x that"
                                          if batches_per_step(r) != r["gradient_accumulation_steps"] else ""),
        f"steps: {r['steps_per_epoch']} per epoch, {r['total_steps']} in total, {r['num_warmup_steps']} warmup, "
        f"schedule {r['lr_scheduler_type']}",
    ]
    if r["stage"] != "ppo" and not after_validate(r):  # under make, validate said it (notices.AFTER_VALIDATE)
        from pipeline.data.loaders import dropped_note

        lines += [line for line in [dropped_note(data_args(r))] if line]
    if r["loraplus_lr_ratio"] is not None or any(r[key] for key in OPTIMIZERS) or r["optim"] in OTHER_OPTIMS:
        from pipeline.recipe.args import train_args
        from pipeline.train.optim import describe, train_groups

        named = [f"{name} ({key})" for key, name in OPTIMIZERS.items() if r[key]]
        which = named[0] if named else ", ".join(
            ([f"{OTHER_OPTIMS[r['optim']]} (optim {r['optim']}{_read_args(r)})"] if r["optim"] in OTHER_OPTIMS else [])
            + ([f"LoRA+ (loraplus_lr_ratio {r['loraplus_lr_ratio']:g})"] if r["loraplus_lr_ratio"] is not None
               else []))
        lines.append(f"optimizer: {which}: {describe(train_groups(model, train_args(r)))}")
    if r["use_badam"] and r["badam_mode"] == "ratio":
        lines.append(f"badam: ratio mode, {r['badam_update_ratio']:g} of each tensor's entries ({r['badam_mask_mode']}), "
                     "the window moving on every 100 steps; embedding and head frozen")
    elif r["use_badam"]:
        start = "" if r["badam_start_block"] is None else f" from layer {r['badam_start_block']}"
        lines.append(f"badam: one decoder layer at a time, {r['badam_switch_mode']}{start}: the first for 1 step, "
                     f"each next for {r['badam_switch_interval']}; embedding, final norm and head frozen")
    if r["finetuning_type"] == "lora" and r["pissa_init"]:
        svd = "the exact SVD" if r["pissa_iter"] == -1 else f"a randomized SVD, {r['pissa_iter']} power iterations"
        start = "the resumed checkpoint's starting pairs" if resume is not None else svd
        lines.append(f"pissa: LoRA starts from the base weights' principal singular vectors ({start}) on the residual "
                     f"base; adapter/ is written converted, a rank-{2 * r['lora_rank']} LoRA for the original base")
    if r["neftune_noise_alpha"]:
        lines.append(f"neftune: uniform noise of alpha {r['neftune_noise_alpha']:g} / sqrt(length x width) on the "
                     "token embeddings in training steps")
    history = token_loss_history(loss_changes)  # resumes that changed it (checkpoint.token_loss_changes)
    if objective := token_loss_label(token_loss(r)):
        lines.append(f"loss: {objective[0]} cross-entropy ({objective[1]}): loss and eval_loss are that loss; "
                     "no eval_perplexity" + (f"; {history}" if history else ""))
    elif history:
        lines.append(f"loss: the plain cross-entropy; {history}")
    if r["stage"] in ("pt", "sft") and r["moe_aux_loss_coef"] and next(sparse_blocks(model), None) is not None:
        lines.append(f"moe: loss and eval_loss add moe_aux_loss_coef {r['moe_aux_loss_coef']:g} x the router's "
                     "load-balancing loss, as transformers' Trainer logs it (aux_loss / eval_aux_loss: the term alone; "
                     "eval_perplexity: the cross-entropy's)")
    if resume is not None:
        lines.append(f"resuming from {resume} at step {state.global_step} (epoch {state.epoch}, "
                     f"batch {state.batch_in_epoch})")
    print("\n".join(lines), file=sys.stderr, flush=True)


@contextlib.contextmanager
def explain_out_of_memory(r: Mapping[str, Any], state: TrainState) -> Any:
    """An out-of-memory error becomes a message naming the knobs that reduce memory."""
    import torch

    try:
        yield
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as err:
        text = str(err)
        if not isinstance(err, (torch.OutOfMemoryError, MemoryError)) and "can't allocate memory" not in text \
                and "out of memory" not in text.lower():
            raise
        raise UserError(
            f"out of memory at optimizer step {state.global_step + 1} ({text.splitlines()[0] if text else 'no detail'}"
            f"). To use less memory: lower per_device_train_batch_size (now {r['per_device_train_batch_size']}) and "
            f"raise gradient_accumulation_steps (now {r['gradient_accumulation_steps']}) to keep the global batch; "
            f"lower cutoff_len (now {r['cutoff_len']}); "
            + ("disable_gradient_checkpointing: false (recompute activations per block); "
               if r["disable_gradient_checkpointing"] else "")
            + f"raise zero_stage (now {r['zero_stage']}) to 2 or 3 and "
            "offload_optimizer: cpu (offload_param: cpu with stage 3); use finetuning_type: lora (now "
            f"{r['finetuning_type']}); bf16: true on GPUs that support it. {run_this_for('plan', r)} estimates "
            "this run's memory (and with any of these values changed, in the recipe or ARGS)"
        ) from None


def logged_so_far(output_dir: Path) -> dict[str, Any]:
    """The latest value of every key in trainer_log.jsonl (already cut back to the resumed step): what an
    uninterrupted run's Trainer.last_record holds at that step. A resume after a stop at the last step logs
    nothing more, and all_results.json had train_loss and eval_loss null."""
    from pipeline.runtime.log import read_log

    return {key: value for record in read_log(RunLayout(output_dir).trainer_log) for key, value in record.items()}


def earlier_train_loss(output_dir: Path, step: int) -> float | None:
    """train_loss for a resume that trained no step (a finished run resumed again, a stop at the last step):
    transformers would write 0.0 (nothing over no steps); instead the value all_results.json already has for this
    step, else the mean loss over every step in trainer_log.jsonl (each log line's loss weighs its steps)."""
    import json

    from pipeline.runtime.log import read_log

    layout = RunLayout(output_dir)
    earlier = json.loads(layout.all_results.read_text(encoding="utf-8")) if layout.all_results.is_file() else {}
    if earlier.get("global_step") == step and earlier.get("train_loss") is not None:
        return earlier["train_loss"]
    return logged_mean_loss(read_log(layout.trainer_log))


def logged_mean_loss(records: list[dict[str, Any]]) -> float | None:
    """The mean per-step loss over the log: each line's loss is the mean over the steps since the line before."""
    total, steps = 0.0, 0
    for record in records:
        if "loss" in record:
            total += record["loss"] * (record["step"] - steps)
            steps = record["step"]
    return total / steps if steps else None


# ---------------------------------------------------------------------------------------------- rank failures

def peer_died(err: BaseException) -> bool:
    """A collective failed because another rank is gone (gloo / NCCL / the TCP store lost its peer)."""
    import torch.distributed as tdist

    if dist.world_size() < 2:
        return False
    if isinstance(err, getattr(tdist, "DistError", ())):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(hint in text for hint in (
        "gloo", "nccl", "connection closed by peer", "connection reset by peer", "broken pipe"))


def report_dead_peer(err: BaseException, output_dir: Path, last_saved: int | None) -> None:
    """One message instead of the collective's traceback, then exit 1 (the launcher stops the other ranks).

    Which rank died is certain with two ranks; with more, the launcher's log names it.
    """
    import os

    me, world = dist.rank(), dist.world_size()
    who = f"rank {1 - me}" if world == 2 else "a peer rank"
    detail = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    resume = (f"the last checkpoint is {output_dir}/checkpoint-{last_saved}; continue with "
              "resume_from_checkpoint=latest") if last_saved else "no checkpoint was saved by this run"
    print(f"error: rank {me}: {who} died (its log above, or the launcher's line naming its --local_rank, says "
          f"why); stopped training ({detail}). {resume}", file=sys.__stderr__, flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)  # not a normal exit: tearing down a process group with a dead peer can hang or abort


# ---------------------------------------------------------------------------------------------- after training

def finish(r: Mapping[str, Any], output_dir: Path, last: Mapping[str, Any], state: TrainState, loader: Any,
           final: Path | None, loss_changes: list[dict[str, Any]]) -> None:
    from pipeline.data.loaders import item_name
    from pipeline.runtime.log import plot_curve, plot_loss, read_log, write_results

    records = read_log(RunLayout(output_dir).trainer_log)
    results = {
        "global_step": state.global_step,
        "epoch": last.get("epoch"),
        "train_loss": last.get("train_loss"),  # the mean over the steps (Trainer.mean_loss), not the last line
        "eval_loss": last.get("eval_loss"),
        "eval_perplexity": last.get("eval_perplexity"),
        "eval_precision": eval_precision(r, training=True) if last.get("eval_loss") is not None else None,
        # loss and eval_loss are then that objective (eval's report says so beside its plain cross-entropy)
        **token_loss(r),
        **dpo_terms(r),  # stage dpo's objective beyond eval's preference loss (eval's report says so)
        **({"token_loss_changes": list(loss_changes)} if loss_changes else {}),  # which steps trained which loss
        # loss and eval_loss then carry the router's aux term (Trainer's log), eval's report says so
        **({"moe_aux_loss_coef": r["moe_aux_loss_coef"]} if "aux_loss" in last else {}),
        **({"eval_accuracy": last.get("eval_accuracy")} if r["compute_accuracy"] or r["stage"] == "rm" else {}),
        "num_train_examples": loader.num_examples,
        "train_items": item_name(data_args(r)),  # what num_train_examples counts (packed rows, windows, ...)
        "total_steps": r["total_steps"],
        "tokens_seen": state.tokens_seen,
        "trained_tokens_seen": state.trained_tokens_seen,
        "skipped_batches": state.skipped_batches,
        "train_runtime_s": last.get("elapsed"),
        "output": str(final) if final else None,
    }
    write_results(output_dir, results)
    if r["plot_loss"]:
        name = Path(str(r["output_dir"])).name
        plot_loss(records, RunLayout(output_dir).loss_plot, title=f"{name}: loss")
        if r["stage"] == "dpo":  # how often the chosen response out-scores the rejected one, as LLaMA-Factory plots
            plot_curve(records, "rewards/accuracies", RunLayout(output_dir).accuracy_plot,
                       title=f"{name}: reward accuracy")
        if r["stage"] == "kto":  # the desirable responses' reward, as LLaMA-Factory's kto workflow plots
            plot_curve(records, "rewards/chosen", RunLayout(output_dir).rewards_plot,
                       title=f"{name}: reward of the desirable responses")
        if r["stage"] == "ppo":  # the reward model's score of the responses (before ppo_score_norm), as LLaMA-Factory
            plot_curve(records, "reward", RunLayout(output_dir).reward_plot, title=f"{name}: reward")
        if r["compute_accuracy"] or r["stage"] == "rm":  # eval_accuracy, as LLaMA-Factory's sft and rm plot it
            plot_curve(records, "accuracy", RunLayout(output_dir).eval_accuracy_plot, title=f"{name}: eval accuracy")
    print(f"done: {final} (logs in {output_dir}/trainer_log.jsonl)", file=sys.stderr)
