"""AuraFlow's flavours as SimpleTuner names them: each one's Hub repo and the prompt length it trains with.

Standard library only: ``lokr-job infer``'s options are built from it when ``lokr-job --help`` runs.
"""

from __future__ import annotations

FLAVOUR_REPOS = {
    "v0.1": "fal/AuraFlow",
    "v0.2": "fal/AuraFlow-v0.2",
    "v0.3": "terminusresearch/auraflow-v0.3",
    "pony": "purplesmartai/pony-v7-base",
}
DEFAULT_FLAVOUR = "v0.3"


def token_limit(flavour: str) -> int:
    """The tokens a prompt keeps when ``tokenizer_max_length`` is unset: SimpleTuner's 120 for AuraFlow, 768
    for pony (simpletuner/helpers/models/auraflow/model.py, ``Auraflow.check_user_config``)."""
    return 768 if flavour == "pony" else 120


def flavour_of(model: str) -> str:
    """The flavour whose Hub repo ``model`` names; the default flavour for anything else (a local folder)."""
    by_repo = {repo.lower(): flavour for flavour, repo in FLAVOUR_REPOS.items()}
    return by_repo.get(model.strip().lower(), DEFAULT_FLAVOUR)
