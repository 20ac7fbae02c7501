"""Keep credentials out of everything the job writes: errors, logs, status files, model cards, saved configs.

Three nets, because a credential can arrive from three places:

- the environment (``SECRET_ENV_VARS``), read at each call, not cached, so a token set after start-up (or
  by a test) is still caught;
- the config files: ``remember_secrets`` records the values of secret-named keys (``is_secret_name``) as
  the loader reads each file, so a key pasted into ``multidatabackend.json`` is masked wherever it shows up
  later (an exception from boto3, a repr in a warning);
- shapes: Hub tokens, AWS access key ids and the 40-character secret written next to one, values assigned
  to secret-named keys (``name=value``, ``"name": "value"``) and passwords in URLs, from any source.
"""

import os
import re
import threading
from typing import Any

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

# A key names a credential when it says secret/password/signature anywhere, names a kind of key
# (api_key, access_key, private_key; not caption_column or cache_key), or ends in "token" (hf_token,
# aws_session_token; not tokenizer_max_length, whose "token" is a word piece, not a credential).
_SECRET_NAME = re.compile(
    r"secret|passw(?:or)?d|signature|credential|api_?key|access_?key|private_?key|(?:^|[^a-z0-9])token$",
    re.IGNORECASE,
)

_PATTERNS = (
    # A Hugging Face token, wherever it came from (pasted into a config, echoed by an error message).
    re.compile(r"hf_[A-Za-z0-9]{20,}"),
    # Credentials inside a URL: scheme://user:password@host.
    re.compile(r"(?<=://)[^/\s:@'\"]+:[^/\s@'\"]+(?=@)"),
    # An AWS access key id: long-term (AKIA) or temporary (ASIA), 16 more upper-case letters and digits.
    re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])"),
)

# What an AWS secret access key looks like: 40 base64 characters. Alone that would also match many
# things, so only one written near an access key id or a secret-named key is masked, and never a
# lower-case hex digest (a git commit id beside a key id stays readable).
_AWS_SECRET = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+=]{40}(?![A-Za-z0-9/+=])")
_AWS_ANCHOR = re.compile(r"(?:AKIA|ASIA)[A-Z0-9]{16}|secret_?access_?key", re.IGNORECASE)
_HEX = re.compile(r"[0-9a-f]{40}")
_NEAR = 80  # characters either side of a key id (or a secret-named key) searched for the secret

# A value given to a secret-named key: name=value (env, URL queries, kwargs) or "name": "value" (JSON,
# Python reprs). "name: value" is left alone: that is how errors and warnings name a key.
_ASSIGNED = re.compile(r"(?P<name>[A-Za-z_][\w.-]*)\s*=\s*[\"']?(?P<value>[^\s\"'&;,)}\]]+)")
_QUOTED = re.compile(r"(?P<q>[\"'])(?P<name>[\w.-]+)(?P=q)\s*:\s*(?P<v>[\"'])(?P<value>[^\"']+)(?P=v)")

_remembered: set[str] = set()
_lock = threading.Lock()


def is_secret_name(name: str) -> bool:
    """Whether a config key or variable named ``name`` holds a credential (``aws_secret_access_key``,
    ``hf_token``, ``api_key``), as opposed to an ordinary setting (``caption_column``,
    ``tokenizer_max_length``)."""
    return bool(_SECRET_NAME.search(name))


def remember(value: str) -> None:
    """Mask ``value`` in everything ``redact`` sees from now on in this process."""
    if len(value) >= _MIN_SECRET_LENGTH:
        with _lock:
            _remembered.add(value)


def remember_secrets(data: Any) -> None:
    """Remember the value of every secret-named key in ``data`` (a parsed config file, nested or not)."""
    if isinstance(data, dict):
        for key, value in data.items():
            if isinstance(value, str) and is_secret_name(str(key)):
                remember(value)
            else:
                remember_secrets(value)
    elif isinstance(data, list):
        for item in data:
            remember_secrets(item)


def masked(data: Any) -> Any:
    """``data`` (a parsed config value) with the values of secret-named keys replaced by ``***``: safe to
    show in an error message that quotes what the user wrote."""
    if isinstance(data, dict):
        return {
            k: MASK if is_secret_name(str(k)) and v not in (None, "") else masked(v) for k, v in data.items()
        }
    if isinstance(data, list):
        return [masked(item) for item in data]
    return redact(data) if isinstance(data, str) else data


def secret_values() -> list[str]:
    """The credential values known now (environment and config files), longest first (so no partial
    masking)."""
    values = {os.environ.get(name, "") for name in SECRET_ENV_VARS}
    with _lock:
        values |= _remembered
    return sorted((v for v in values if len(v) >= _MIN_SECRET_LENGTH), key=len, reverse=True)


def redact(text: str) -> str:
    """``text`` with every known credential replaced by ``***``."""
    for value in secret_values():
        text = text.replace(value, MASK)
    text = _mask_aws_secrets(text)
    for pattern in _PATTERNS:
        text = pattern.sub(MASK, text)
    return _QUOTED.sub(_mask_value, _ASSIGNED.sub(_mask_value, text))


def _mask_aws_secrets(text: str) -> str:
    anchors = [m.span() for m in _AWS_ANCHOR.finditer(text)]
    if not anchors:
        return text

    def near_anchor(match: re.Match[str]) -> str:
        close = any(match.start() - _NEAR <= end and start <= match.end() + _NEAR for start, end in anchors)
        return MASK if close and not _HEX.fullmatch(match[0]) else match[0]

    return _AWS_SECRET.sub(near_anchor, text)


def _mask_value(match: re.Match[str]) -> str:
    if not is_secret_name(match["name"]) or match["value"] == MASK:
        return match[0]
    begin, end = match.span("value")
    offset = match.start()
    return match[0][: begin - offset] + MASK + match[0][end - offset :]
