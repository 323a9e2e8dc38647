"""What a ppo recipe's reward_model folder holds, read from its files without torch (the recipe rule checks it before
train loads anything; pipeline.train.ppo.load_reward_model loads what this finds).

Three forms, the first two as transformers / PEFT score them, the last as LLaMA-Factory does:

- a score head (transformers' XForSequenceClassification): a stage rm run here, its merged/ or model/, a
  transformers `save_pretrained` folder (reward_model_type full), or a LoRA adapter with task_type SEQ_CLS (ours or
  PEFT's, reward_model_type lora);
- LLaMA-Factory's stage rm output: its AutoModelForCausalLMWithValueHead saved as a causal LM (a LoRA adapter with
  task_type CAUSAL_LM, or a full model folder) with value_head.safetensors beside it (v_head.summary.weight (1, H)
  and .bias (1,), its callbacks' fix_valuehead_checkpoint). LLaMA-Factory's PPO reads that head, bias included, at
  the last attended token (train/ppo/trainer.py get_rewards: `values.gather(-1, attention_mask.sum(-1) - 1)`).

A folder of another model than the policy's (a LoRA reward adapter must sit on the policy's base: its head is then as
wide as the policy's hidden size; a full reward model reads the policy's token ids, so its vocabulary holds every id
of the policy's tokenizer and, where the folder holds tokenizer files, each of those ids is the same token there) and
a value head of the wrong size are refused here, at the recipe's key.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import UserError
from pipeline.names import V_HEAD_WEIGHTS

if TYPE_CHECKING:
    from pipeline.data.tokenizer import Tokenizer

V_HEAD_KEYS = ("v_head.summary.weight", "v_head.summary.bias")  # TRL's ValueHead: Linear(hidden, 1) with a bias


@dataclass(frozen=True)
class RewardSource:
    """folder: the adapter (lora) or model (full) folder; value_head: LLaMA-Factory's value_head.safetensors when the
    folder is its causal LM with a value head (None: a score head, transformers' XForSequenceClassification)."""
    folder: Path
    value_head: Path | None

    @property
    def form(self) -> str:
        return "value head (LLaMA-Factory's)" if self.value_head else "score head"


def reward_source(folder: Path, kind: str, hidden: int | None, tokenizer: Tokenizer | None = None) -> RewardSource:
    """The reward model in `folder` (pipeline.recipe.run_folders.reward_folder finds it) under reward_model_type `kind`,
    checked against the policy's hidden size `hidden` and (a full one) its tokenizer (None: unknown here, not
    checked): a UserError whose messages start with 'reward_model: '."""
    if kind == "lora":
        scored = _adapter_config(folder).get("task_type") == "SEQ_CLS"
        head_width = _score_width(folder) if scored else None
        what = "a LoRA adapter of a language model (task_type CAUSAL_LM)"
    else:  # the head reads the reward model's own hidden states
        from pipeline.model.config import read_config

        config = read_config(folder)
        if tokenizer is not None:
            _check_vocabulary(folder, config.vocab_size, tokenizer)
        scored, hidden, head_width = bool(config.num_labels), config.emb_dim, None
        what = "a language model (no score head)"
    source = RewardSource(folder, None if scored else folder / V_HEAD_WEIGHTS)
    if source.value_head is not None:
        if not source.value_head.is_file():
            raise UserError(f"reward_model: {folder} is {what} and holds no {V_HEAD_WEIGHTS}; expected a reward model:"
                            f" LLaMA-Factory's stage rm output ({what} with {V_HEAD_WEIGHTS} beside it), a stage rm "
                            "run's output_dir here, or a transformers XForSequenceClassification folder "
                            "(reward_model_type: full) / a PEFT adapter with task_type SEQ_CLS (reward_model_type: lora)")
        head_width = _value_head_width(source.value_head)
    if hidden is not None and head_width is not None and head_width != hidden:
        where = ("the policy's model (model_name_or_path), which a LoRA reward adapter must be trained on"
                 if kind == "lora" else "its config.json's hidden_size")
        raise UserError(f"reward_model: {source.value_head or folder}: its head reads {head_width} hidden values, "
                        f"but {where} has {hidden}: a reward model of another base model; train it on "
                        "model_name_or_path, or give a full reward model folder (reward_model_type: full)")
    return source


def _check_vocabulary(folder: Path, rows: int, tokenizer: Tokenizer) -> None:
    """A full reward model of `rows` embedding rows is given the policy's token ids as they are (ids up to the policy
    tokenizer's n_vocab; pipeline.train.ppo.PPOTrainer.rollout, as LLaMA-Factory 0.9.5's get_rewards feeds the
    policy's input_ids to the reward model): fewer rows are another tokenizer, and the first id past them would stop
    the run at its first reward with an index error. More rows are accepted: a model's embedding is often its
    tokenizer's padded (Qwen's 151,936 rows for 151,665 ids). Where the folder holds tokenizer files, those decide:
    _check_same_tokens."""
    vocab = tokenizer.n_vocab
    if rows < vocab:
        raise UserError(f"reward_model: {folder}: its vocabulary has {rows:,} token ids (vocab_size in config.json), "
                        f"expected at least the {vocab:,} of the policy's tokenizer: {ANOTHER_TOKENIZER}")
    _check_same_tokens(folder, tokenizer)


ANOTHER_TOKENIZER = ("a reward model of another base model. It is given the policy's token ids as they are, so it must "
                     "share the policy's tokenizer (LLaMA-Factory requires that too: its PPO feeds the policy's token "
                     "ids to the reward model); train the reward model (stage rm) on model_name_or_path or a model of "
                     "its family, or set reward_model_type: lora with an adapter trained on model_name_or_path")


def _check_same_tokens(folder: Path, policy: Tokenizer) -> None:
    """Where the reward model's folder holds tokenizer files, every id the policy's tokenizer has must be the same
    token in them (the same bytes; ids past the policy's, a padded or grown vocabulary, are never produced by the
    policy and not compared). A tokenizer of another family, or one trained apart, gives the policy's ids other
    tokens although its vocabulary is as large: the reward model would score text the policy never wrote."""
    from pipeline.data.tokenizer_files import read_tokenizer, tokenizer_file

    source = tokenizer_file(folder)
    if source is None:
        return  # no tokenizer files (a model/ saved by a run here, a save_pretrained of the model alone): rows only
    try:
        own = read_tokenizer(folder)
    except UserError as err:
        raise UserError(f"reward_model: {source}: its tokenizer cannot be read "
                        f"({err.messages[0]}), so it is not the policy's: {ANOTHER_TOKENIZER}") from None
    differ = [i for i in range(policy.n_vocab) if _token(policy, i) != _token(own, i)]
    if differ:
        first = differ[0]
        raise UserError(f"reward_model: {source}: its tokenizer gives {len(differ):,} of the policy tokenizer's "
                        f"{policy.n_vocab:,} token ids another token (the first, id {first:,}: "
                        f"{_shown(_token(own, first))} there, {_shown(_token(policy, first))} in the policy's): "
                        f"{ANOTHER_TOKENIZER}")


def _token(tokenizer: Tokenizer, token: int) -> bytes | None:
    """The bytes of a token id (a special token's text), None for an id without a token."""
    try:
        return tokenizer.token_bytes(token)
    except KeyError:
        return None


def _shown(token: bytes | None) -> str:
    return "no token" if token is None else repr(token.decode("utf-8", errors="replace"))


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"reward_model: {path}: not readable as JSON ({err})") from None
    return value if isinstance(value, dict) else {}


def _adapter_config(folder: Path) -> dict:
    from pipeline.names import ADAPTER_CONFIG

    return _json(folder / ADAPTER_CONFIG)


def _shapes(path: Path) -> dict[str, list[int]]:
    """key -> shape from a safetensors file's header (no tensor read); a UserError for a file that has none."""
    from pipeline.model.safetensors_header import safetensors_shapes

    shapes = safetensors_shapes(path)
    if not shapes:
        raise UserError(f"reward_model: {path}: not a readable safetensors file")
    return shapes


def _score_width(folder: Path) -> int | None:
    """The width of a SEQ_CLS adapter's score head (its `...score.weight`, (1, H)), None when it holds none."""
    from pipeline.names import ADAPTER_WEIGHTS

    file = folder / ADAPTER_WEIGHTS
    shapes = _shapes(file) if file.is_file() else {}
    return next((shape[-1] for key, shape in shapes.items() if key.endswith("score.weight")), None)


def _value_head_width(path: Path) -> int:
    """H of LLaMA-Factory's value head, refused unless the file holds exactly its two tensors, (1, H) and (1,)."""
    shapes = _shapes(path)
    weight, bias = (shapes.get(key) for key in V_HEAD_KEYS)
    if set(shapes) != set(V_HEAD_KEYS) or weight is None or len(weight) != 2 or weight[0] != 1 or bias != [1]:
        got = ", ".join(f"{key} {shape}" for key, shape in sorted(shapes.items())) or "no tensors"
        raise UserError(f"reward_model: {path}: holds {got}; expected LLaMA-Factory's value head: "
                        f"{V_HEAD_KEYS[0]} [1, hidden] and {V_HEAD_KEYS[1]} [1]")
    return weight[1]
