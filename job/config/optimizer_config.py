"""``optimizer_config``: SimpleTuner's comma-separated ``key=value`` optimizer settings, parsed its way.

SimpleTuner (simpletuner/helpers/training/optimizer_param.py, ``convert_arg_to_parameters``) reads a value
with a ``.`` or an ``e-`` as a float, all digits as an int, ``true``/``false``/``none`` as such, and
anything else as a string; the result overrides the chosen optimizer's default settings. Kept free of
torch so the schema can check the format when the config loads.
"""

from typing import Any


def parse_optimizer_config(text: str) -> dict[str, Any]:
    """``"eps=1e-6,weight_decay=0.0"`` → ``{"eps": 1e-06, "weight_decay": 0.0}``; ValueError on a bad pair."""
    settings: dict[str, Any] = {}
    for pair in text.split(","):
        key, sep, value = (part.strip() for part in pair.partition("="))
        if not sep or not key or not value:
            raise ValueError(
                f"{pair.strip()!r} is not key=value; write comma-separated pairs such as "
                "'weight_decay=0.01,eps=1e-8'"
            )
        settings[key] = _value(value)
    return settings


def _value(text: str) -> Any:
    words = {"true": True, "false": False, "none": None}
    if text.lower() in words:
        return words[text.lower()]
    if text.isdigit():
        return int(text)
    if "." in text or "e-" in text:
        try:
            return float(text)
        except ValueError:
            # SimpleTuner fails on this too (float() of it); say which value.
            raise ValueError(f"{text!r} is not a number") from None
    return text
