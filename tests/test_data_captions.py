"""Caption strategies: filename, textfile (one caption per line), instanceprompt; and their bad cases."""

from pathlib import Path

import pytest

from job.config.backends import DatasetConfig
from job.data.captions import CaptionProblem, caption_from_filename, captions_for


def _dataset(strategy: str, **extra: object) -> DatasetConfig:
    return DatasetConfig(id="d", instance_data_dir="/data", caption_strategy=strategy, **extra)


def test_filename_turns_underscores_into_spaces() -> None:
    assert captions_for(Path("/data/a_red__cat_ on_blue.png"), _dataset("filename")) == ("a red cat on blue",)
    assert caption_from_filename("  spaced\tout_ ") == "spaced out"


def test_filename_without_text_is_a_problem() -> None:
    with pytest.raises(CaptionProblem, match="empty caption"):
        captions_for(Path("/data/___.png"), _dataset("filename"))


def test_textfile_reads_the_txt_beside_the_image(tmp_path: Path) -> None:
    (tmp_path / "cat.txt").write_text("\ufeff  a photo of a cat \n", encoding="utf-8")
    assert captions_for(tmp_path / "cat.jpg", _dataset("textfile")) == ("a photo of a cat",)


def test_textfile_lines_are_separate_captions(tmp_path: Path) -> None:
    (tmp_path / "cat.txt").write_text("first\n\nsecond\nfirst\n")
    assert captions_for(tmp_path / "cat.png", _dataset("textfile")) == ("first", "second")


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "missing caption file: cat.txt"),
        (b" \n\t\n", "empty caption file"),
        (b"\xff\xfe\xfa", "not UTF-8"),
    ],
)
def test_textfile_problems(tmp_path: Path, content: bytes | None, reason: str) -> None:
    if content is not None:
        (tmp_path / "cat.txt").write_bytes(content)
    with pytest.raises(CaptionProblem, match=reason):
        captions_for(tmp_path / "cat.png", _dataset("textfile"))


def test_instanceprompt_captions_every_image_alike() -> None:
    dataset = _dataset("instanceprompt", instance_prompt="sks dog")
    assert captions_for(Path("/data/x/IMG_0001.jpg"), dataset) == ("sks dog",)


def test_huggingface_strategy_reads_the_caption_files_fetch_wrote(tmp_path: Path) -> None:
    (tmp_path / "row_0001.txt").write_text("a caption from the dataset's caption column\n")
    dataset = DatasetConfig(
        id="hub", type="huggingface", dataset_name="me/photos", caption_strategy="huggingface"
    )
    assert captions_for(tmp_path / "row_0001.jpg", dataset) == (
        "a caption from the dataset's caption column",
    )
