"""Keys that only some stages read (neat_packing, packing, train_on_prompt, mask_history, compute_accuracy,
label_smoothing_factor, use_dft_loss, use_eaft_loss, use_asft_loss): refused, with the reason, in a stage that would ignore them.
The preference keys (pref_*, dpo_*, simpo_gamma, kto_*, ref_model) have their own rules: preference.py.
"""
from __future__ import annotations

import json

from pipeline.recipe.rules.core import Context, rule


# Keys that mean something in some stages only, and why each other stage cannot honour them: set there, they
# would be ignored without a word (LLaMA-Factory refuses train_on_prompt and mask_history outside sft too).
STAGE_ONLY: dict[str, dict[str, str]] = {
    "neat_packing": {"pt": "pt always concatenates documents into windows of cutoff_len, see "
                           "docs/packing-and-scale.md",
                     "dpo": "a dpo row is a chosen/rejected pair, never packed",
                     "kto": "a kto row is scored with its own KL sequence, never packed",
                     "rm": "an rm row is a chosen/rejected pair, never packed",
                     "ppo": "a ppo row is a prompt the policy answers, never packed"},
    "packing": {"dpo": "a dpo row is a chosen/rejected pair, never packed",
                "kto": "a kto row is scored with its own KL sequence, never packed",
                "rm": "an rm row is a chosen/rejected pair, never packed",
                "ppo": "a ppo row is a prompt the policy answers, never packed"},
    "train_on_prompt": {"pt": "pt has no prompt: every token is trained",
                        "dpo": "dpo scores the responses only; the prompt is never part of the loss",
                        "kto": "kto scores the responses only; the prompt is never part of the loss",
                        "rm": "rm scores each whole sequence at its last token; no token is a label",
                        "ppo": "ppo trains on the generated responses only"},
    "mask_history": {"pt": "pt has no conversation turns",
                     "dpo": "dpo always scores the last response only, the history being the prompt",
                     "kto": "kto always scores the last response only, the history being the prompt",
                     "rm": "rm scores each whole sequence at its last token; no token is a label",
                     "ppo": "ppo generates the last response only, the history being the prompt"},
    # LLaMA-Factory wires its ComputeAccuracy into the sft workflow only, and ignores the key elsewhere
    "compute_accuracy": {"pt": "token accuracy is computed for stage sft only, as in LLaMA-Factory; pt's evaluation "
                               "reports eval_loss and eval_perplexity",
                         "dpo": "token accuracy is computed for stage sft only, as in LLaMA-Factory; dpo's evaluation "
                                "reports eval_rewards/accuracies, how often the chosen response out-scores the "
                                "rejected one",
                         "kto": "token accuracy is computed for stage sft only, as in LLaMA-Factory; kto's evaluation "
                                "reports eval_loss, eval_rewards/chosen, eval_rewards/rejected and eval_kl",
                         "rm": "stage rm always reports eval_accuracy, how often the chosen response out-scores "
                               "the rejected one (LLaMA-Factory's ComputeAccuracy); the key is for sft's token "
                               "accuracy",
                         "ppo": "stage ppo evaluates nothing, as in LLaMA-Factory"},
    # LLaMA-Factory hands it to transformers' Trainer, whose DPO / KTO / pairwise losses never read it
    "label_smoothing_factor": {"dpo": "LLaMA-Factory's dpo ignores it too; use dpo_label_smoothing, dpo's own "
                                      "label smoothing (conservative DPO, pref_loss: sigmoid)",
                               "kto": "LLaMA-Factory's kto ignores it too; KTO's loss has no label smoothing",
                               "rm": "LLaMA-Factory's rm ignores it too; the pairwise loss has no label smoothing",
                               "ppo": "LLaMA-Factory's ppo ignores it too; the PPO loss has no label smoothing"},
    # LLaMA-Factory installs them as compute_loss_func in its sft trainer only (train/sft/trainer.py)
    "use_dft_loss": {stage: "LLaMA-Factory's DFT loss is an sft loss: its other trainers ignore the key"
                     for stage in ("pt", "dpo", "kto", "rm", "ppo")},
    "use_eaft_loss": {stage: "LLaMA-Factory's EAFT loss is an sft loss: its other trainers ignore the key"
                      for stage in ("pt", "dpo", "kto", "rm", "ppo")},
    "use_asft_loss": {stage: "LLaMA-Factory's ASFT loss is an sft loss: its other trainers ignore the key"
                      for stage in ("pt", "dpo", "kto", "rm", "ppo")},
    # LLaMA-Factory refuses PPO's evaluation ("PPO training does not support evaluation")
    "val_size": {"ppo": "stage ppo evaluates nothing, as in LLaMA-Factory; evaluate the tuned model with "
                        "`python -m pipeline eval` on an sft recipe"},
    "eval_dataset": {"ppo": "stage ppo evaluates nothing, as in LLaMA-Factory; evaluate the tuned model with "
                            "`python -m pipeline eval` on an sft recipe"},
}


@rule(*STAGE_ONLY, "stage")
def stage_only_keys(ctx: Context) -> list[tuple[str, str]]:
    stage = ctx.values["stage"]
    return [(key, f"given {json.dumps(ctx.values[key])}, but it has no meaning for stage: {stage} ({why[stage]}); "
                  "remove it")
            for key, why in STAGE_ONLY.items() if ctx.values[key] and stage in why]
