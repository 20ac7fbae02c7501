"""Keep credentials out of everything the job writes: logs, status files, model cards, saved configs.

Secrets are read from the environment at each call, not cached, so a token set after start-up (or by a
test) is still caught.
"""

import os
import re

# Environment variables whose values are credentials. HUGGING_FACE_HUB_TOKEN is huggingface_hub's
# legacy name for HF_TOKEN and still honoured by it.
SECRET_ENV_VARS = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "WANDB_API_KEY",
)

MASK = "***"

# Values shorter than this are not real credentials, and masking them would garble ordinary text.
_MIN_SECRET_LENGTH = 8

_PATTERNS = (
    # A Hugging Face token, wherever it came from (pasted into a config, echoed by an error message).
    re.compile(r"hf_[A-Za-z0-9]{20,}"),
    # Credentials inside a URL: scheme://user:password@host.
    re.compile(r"(?<=://)[^/\s:@'\"]+:[^/\s@'\"]+(?=@)"),
)


def secret_values() -> list[str]:
    """The credential values set in the environment now, longest first (so no partial masking)."""
    values = {os.environ.get(name, "") for name in SECRET_ENV_VARS}
    return sorted((v for v in values if len(v) >= _MIN_SECRET_LENGTH), key=len, reverse=True)


def redact(text: str) -> str:
    """``text`` with every known credential replaced by ``***``."""
    for value in secret_values():
        text = text.replace(value, MASK)
    for pattern in _PATTERNS:
        text = pattern.sub(MASK, text)
    return text
