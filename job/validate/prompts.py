"""Which prompts validation renders, each under a nickname that becomes its file name.

``validation_prompt`` is the nickname ``validation``; ``user_prompt_library`` entries follow, with
SimpleTuner's ``<token>`` placeholder replaced by the subject's instance prompt in prompts and nicknames.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from job.config.loader import ResolvedConfig

log = logging.getLogger("lokr.validate")

TOKEN = "<token>"
VALIDATION_NICKNAME = "validation"
# Room for a "-1024x1024.png" suffix inside the usual 255-byte file name limit.
_MAX_NICKNAME = 120


def validation_prompts(cfg: ResolvedConfig) -> dict[str, str]:
    """Nickname → prompt, in config order; nicknames are unique and safe as file names."""
    prompts: dict[str, str] = {}
    if cfg.job.validation_prompt:
        prompts[VALIDATION_NICKNAME] = cfg.job.validation_prompt
    subject = instance_prompt(cfg)
    if subject is None and any(TOKEN in k + v for k, v in cfg.prompt_library.items()):
        log.warning(
            "user_prompt_library uses %s but no dataset has an instance_prompt; the placeholder is left out",
            TOKEN,
        )
    for nickname, prompt in cfg.prompt_library.items():
        name = _unique(safe_nickname(nickname.replace(TOKEN, subject or "")), prompts)
        prompts[name] = _fill(prompt, subject or "")
    return prompts


def instance_prompt(cfg: ResolvedConfig) -> str | None:
    """The subject: the first training (not regularisation) dataset's instance prompt, else any's."""
    ordered = sorted(cfg.datasets, key=lambda d: d.is_regularisation_data)
    return next((d.instance_prompt for d in ordered if d.instance_prompt), None)


def safe_nickname(nickname: str) -> str:
    """Letters, digits, ``.``, ``_`` and ``-`` only; never empty, never hidden, bounded in length."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", nickname).strip("._-")[:_MAX_NICKNAME].rstrip("._-")
    return name or "prompt"


def _fill(prompt: str, subject: str) -> str:
    text = prompt.replace(TOKEN, subject)
    # With no subject, "a photo of <token>, red" would read "a photo of , red".
    return re.sub(r"\s+([,.;:!?])", r"\1", re.sub(r"\s{2,}", " ", text)).strip()


def _unique(name: str, taken: dict[str, str]) -> str:
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}-{n}", n + 1
    return candidate
