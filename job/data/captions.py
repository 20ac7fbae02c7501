"""Captions by SimpleTuner's ``caption_strategy``: ``filename``, ``textfile``, ``instanceprompt`` or
``huggingface`` (a Hub dataset's caption column, which ``lokr-job fetch`` writes out as ``.txt`` files).

A caption file may hold several captions, one per line (SimpleTuner's multi-caption rule); the sampler
picks one of them per use.
"""

import os

from job.config.backends import DatasetConfig


class CaptionProblem(Exception):
    """The image has no usable caption; the message ("kind: detail") is the reason in the bad-data report."""


def captions_for(image_path: str | os.PathLike[str], dataset: DatasetConfig) -> tuple[str, ...]:
    """The captions of one image, or ``CaptionProblem`` saying why there are none."""
    if dataset.caption_strategy == "instanceprompt":
        assert dataset.instance_prompt  # DatasetConfig's validator requires it for this strategy
        return (dataset.instance_prompt,)
    # os.path, not pathlib: a scan asks once per image, and a Path costs more than the answer.
    stem = os.path.splitext(os.fspath(image_path))[0]
    if dataset.caption_strategy == "filename":
        caption = caption_from_filename(os.path.basename(stem))
        if not caption:
            raise CaptionProblem("empty caption: the file name has no text (caption_strategy filename)")
        return (caption,)
    return _read_caption_file(f"{stem}.txt")


def caption_from_filename(stem: str) -> str:
    """``a_red_cat`` → ``a red cat``: underscores become spaces, runs of whitespace collapse."""
    return " ".join(stem.replace("_", " ").split())


def _read_caption_file(path: str) -> tuple[str, ...]:
    name = os.path.basename(path)
    try:
        with open(path, encoding="utf-8-sig") as file:
            text = file.read()
    except FileNotFoundError:
        raise CaptionProblem(f"missing caption file: {name}") from None
    except UnicodeDecodeError:
        raise CaptionProblem(f"caption file not UTF-8: {name}") from None
    except OSError as exc:
        raise CaptionProblem(f"cannot read caption file: {name}: {exc.strerror}") from None
    captions = tuple(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip()))
    if not captions:
        raise CaptionProblem(f"empty caption file: {name}")
    return captions
