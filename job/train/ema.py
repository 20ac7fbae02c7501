"""An exponential moving average of the LoKr weights (``use_ema``), kept in fp32.

The decay warms up as diffusers' ``EMAModel`` does (which SimpleTuner uses): min(ema_decay, (1+t)/(10+t))
after optimizer step t, so the first steps do not drag the average towards the zero-initialised adapter.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class AdapterEMA:
    def __init__(self, named_parameters: list[tuple[str, torch.nn.Parameter]], decay: float):
        self.decay = decay
        self.parameters = dict(named_parameters)
        self.shadow = {name: p.detach().float().clone() for name, p in self.parameters.items()}
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        decay = self.current_decay()
        # shadow += (1 - decay) * (parameter - shadow), all tensors in one kernel launch per group.
        torch._foreach_lerp_(
            list(self.shadow.values()), [p.detach().float() for p in self.parameters.values()], 1 - decay
        )
        self.updates += 1

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
        state = {f"shadow.{name}": tensor for name, tensor in self.shadow.items()}
        state["updates"] = torch.tensor(self.updates, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [name for name in self.shadow if f"shadow.{name}" not in state]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} weights, e.g. {missing[0]}")
        for name in self.shadow:
            self.shadow[name].copy_(state[f"shadow.{name}"])
        self.updates = int(state["updates"])
