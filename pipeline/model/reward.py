"""Reward models (stage rm): the score head's start, which token scores a sequence, and the pairwise loss.

The model is transformers' XForSequenceClassification with num_labels 1 (what users load a reward model as):
the decoder, then `score`, a Linear hidden -> 1 without bias, at every position (pipeline.model.gpt). A
sequence's score is the value at the token transformers pools: the rightmost token whose id is not the
config's pad_token_id. Training pools the same token with the same pad id (the one batches are padded with,
written to the exported config.json), so the exported model scores as the trained one. When pad = eos (GPT-2,
most Llama 3 tokenizers) that is the last response token, not the EOS after it: transformers cannot tell
that EOS from padding, so neither does training.

The loss is LLaMA-Factory's (train/rm/trainer.py): -log sigmoid(score_chosen - score_rejected), the mean over
the pairs; its metric the accuracy, how often chosen out-scores rejected. A bias on `score` would add the same
constant to both scores: its gradient under this loss is zero, which is why transformers' head has none.

Stage ppo scores its rollouts with a RewardScorer (a reward model loaded here) or, under reward_model_type api, a
ServerScorer (a reward server's scores of the decoded texts): the same call, (input_ids, attention_mask) -> (B,).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from pipeline.data.tokenizer import Tokenizer

SCORE_INIT_STD = 0.02  # transformers' initializer_range (the default of GPT2Config, LlamaConfig, Qwen2/3Config)


def new_score_weight(emb_dim: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A fresh score head (1, emb_dim): N(0, initializer_range) as transformers' _init_weights draws a Linear,
    from a generator seeded with the recipe's seed (the same head every run)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.empty(1, emb_dim).normal_(0.0, SCORE_INIT_STD, generator=generator).to(dtype)


def last_token_index(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """(B,) the rightmost position whose token is not pad_id: transformers' XForSequenceClassification rule
    (`(arange(T) * (input_ids != pad)).argmax(-1)`), right or left padding alike; 0 for a row of pads only."""
    return _rightmost(input_ids != pad_id)


def _rightmost(keep: torch.Tensor) -> torch.Tensor:
    """(B,) the rightmost True position of each row of `keep` (B, T); 0 for a row without one."""
    positions = torch.arange(keep.shape[-1], device=keep.device)
    return (positions * keep.to(torch.int64)).argmax(-1)


def last_attended_index(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    """(B,) last_token_index of each row on its attended tokens alone: the rightmost attended token that is not
    pad_id, or with pad_id None the rightmost attended one (LLaMA-Factory's PPO, `attention_mask.sum(-1) - 1` on its
    right-padded rows; transformers' score of a sequence given alone when its config has no pad_token_id)."""
    keep = attention_mask.bool() if pad_id is None else attention_mask.bool() & (input_ids != pad_id)
    return _rightmost(keep)


@dataclass
class RewardScorer:
    """A frozen reward model and the token it scores a sequence at: the rightmost attended token that is not
    `pad_id` (transformers' rule with the pad id the model was trained and saved with), or with pad_id None the
    last attended token (LLaMA-Factory's value head; a transformers folder without pad_token_id)."""
    model: nn.Module
    pad_id: int | None
    form: str = "score head"  # what scores (pipeline.model.reward_folder.RewardSource.form), for the run's log

    def __str__(self) -> str:
        at = "the last attended token" if self.pad_id is None else f"the last token that is not pad id {self.pad_id}"
        return f"its {self.form} at {at}"

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B,) fp32 scores of the rows."""
        values = self.model(input_ids, attention_mask=attention_mask)
        return scores_at(values, last_attended_index(input_ids, attention_mask, self.pad_id))


@dataclass
class ServerScorer:
    """reward_model_type api: the scores of a reward server (pipeline.model.reward_server), as LLaMA-Factory 0.9.5's
    get_rewards asks for them: each row's attended tokens (prompt + response, the stop token kept) decoded by
    `decode` (the policy tokenizer's, special tokens kept: its skip_special_tokens=False), posted in requests of
    `rows_per_request` rows (per_device_train_batch_size: LLaMA-Factory asks once per mini-batch). for_policy
    builds it as stage ppo does."""
    url: str
    decode: Callable[[list[int]], str]
    rows_per_request: int
    model: None = None  # no model here: nothing to cast, freeze or count

    @classmethod
    def for_policy(cls, url: str, tokenizer: Tokenizer, rows_per_request: int) -> ServerScorer:
        """The scorer of stage ppo: the policy tokenizer's text as transformers 4's batch_decode gives it
        (Tokenizer.decode_transformers4: the checkpoint's clean_up_tokenization_spaces applied), which LLaMA-Factory
        0.9.5's PPO (TRL 0.8.6-0.9.6, released for transformers 4) sends."""
        return cls(url, tokenizer.decode_transformers4, rows_per_request)

    def __str__(self) -> str:
        return (f"the server's scores of the decoded prompt + response texts (special tokens kept), "
                f"{self.rows_per_request} row{'s' if self.rows_per_request != 1 else ''} a request")

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B,) fp32 scores of the rows, on input_ids' device."""
        from pipeline.model.reward_server import request_scores

        keep = attention_mask.bool().cpu()
        texts = [self.decode(row[mask].tolist()) for row, mask in zip(input_ids.cpu(), keep)]
        size = self.rows_per_request
        scores = [score for start in range(0, len(texts), size)
                  for score in request_scores(self.url, texts[start:start + size])]
        return torch.tensor(scores, dtype=torch.float32, device=input_ids.device)


def sequence_scores(values: torch.Tensor, input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """(B,) fp32 scores from the head's per-position values (B, T, 1) at last_token_index."""
    return scores_at(values, last_token_index(input_ids, pad_id))


def scores_at(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B,) fp32: each row's value (B, T, 1) at its position `index` (B,)."""
    rows = torch.arange(values.shape[0], device=values.device)
    return values[rows, index.to(values.device), 0].float()


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per pair: -log sigmoid(chosen - rejected); metrics per pair (accuracy: chosen > rejected, strictly, as
    LLaMA-Factory's ComputeAccuracy counts; the two scores)."""
    losses = -F.logsigmoid(chosen - rejected)
    return losses, {"accuracy": (chosen > rejected).float(), "scores/chosen": chosen.detach(),
                    "scores/rejected": rejected.detach()}
