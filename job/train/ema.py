"""An exponential moving average of the LoKr weights (``use_ema``), kept in fp32.

The decay follows SimpleTuner's ``EMAModel.get_decay`` (simpletuner/helpers/training/ema.py), a function
of the optimizer step t (counted from 1) it is updated at: the first step copies the weights (decay 0),
then min(ema_decay, t/(9+t)), so the early steps do not drag the average towards the zero-initialised
adapter. With ``ema_warmup_steps`` W > 0 it copies the weights before step W and uses ``ema_decay``
from then on. The loop updates it every ``ema_update_interval`` steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class AdapterEMA:
    def __init__(
        self, named_parameters: list[tuple[str, torch.nn.Parameter]], decay: float, *, warmup_steps: int = 0
    ):
        self.decay = decay
        self.warmup_steps = warmup_steps
        self.parameters = dict(named_parameters)
        self.shadow = {name: p.detach().float().clone() for name, p in self.parameters.items()}

    def decay_at(self, step: int) -> float:
        if self.warmup_steps > 0:
            return 0.0 if step < self.warmup_steps else self.decay
        since_first = step - 1
        if since_first <= 0:
            return 0.0
        return min(self.decay, (1 + since_first) / (10 + since_first))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold the current weights in after optimizer step ``step`` (counted from 1)."""
        decay = self.decay_at(step)
        # shadow += (1 - decay) * (parameter - shadow), all tensors in one kernel launch per group.
        torch._foreach_lerp_(
            list(self.shadow.values()), [p.detach().float() for p in self.parameters.values()], 1 - decay
        )

    @contextmanager
    @torch.no_grad()
    def swapped_in(self) -> Iterator[None]:
        """Within the block the parameters hold the average (to save or evaluate it); restored on exit."""
        saved = {name: p.detach().clone() for name, p in self.parameters.items()}
        for name, parameter in self.parameters.items():
            parameter.copy_(self.shadow[name])
        try:
            yield
        finally:
            for name, parameter in self.parameters.items():
                parameter.copy_(saved[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"shadow.{name}": tensor for name, tensor in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [name for name in self.shadow if f"shadow.{name}" not in state]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} weights, e.g. {missing[0]}")
        for name in self.shadow:
            self.shadow[name].copy_(state[f"shadow.{name}"])
