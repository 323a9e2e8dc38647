"""The loop LLaMA-Factory's third-party optimizers share (its Muon, galore_torch's and apollo_torch's AdamW): every
parameter with a gradient is updated on its own, by the group it is in. pipeline.train.muon, galore and apollo
define `_update`; this is the torch.optim.Optimizer around it."""
from __future__ import annotations

from typing import Any, Callable

import torch


class PerParameterOptimizer(torch.optim.Optimizer):
    """step() = `_update(param, group)` for each parameter that has a gradient, in the groups' order."""

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group)
        return loss

    def _update(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        raise NotImplementedError
