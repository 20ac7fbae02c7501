"""Pairing each image of a dataset with its loss mask, as SimpleTuner pairs them.

SimpleTuner's masked loss (documentation/DREAMBOOTH.md, "Masked loss") reads a mask backend whose files
are named as the images they mask: the mask of ``<images>/a/b.png`` is ``<masks>/a/b.png``, the same
relative path, extension included. Every image needs one (an all-white mask masks nothing). A mask gets
its image's crop and bucket, so it must have its image's size. A mask that is missing, unreadable or of
another size stops warm before anything is encoded (exit 3), naming each image.
"""

import os
from dataclasses import dataclass
from pathlib import Path

from job.data.discovery import IMAGE_EXTENSIONS, find_images
from job.data.scan import Sample, probe_files
from job.errors import DataError

_SHOWN_PROBLEMS = 10


@dataclass(frozen=True)
class MaskFiles:
    """The mask of each image of a dataset: the masks' folder and each image's mask content hash."""

    dataset_id: str
    root: Path
    sha256: dict[str, str]  # image (and mask) relpath → the mask file's sha256


def match_masks(
    dataset_id: str, mask_id: str, samples: list[Sample], root: Path, probe_path: Path
) -> MaskFiles:
    """Each sample's mask in ``root``; ``DataError`` naming every image whose mask is missing or unusable."""
    if not root.is_dir():
        raise DataError(
            f"dataset {dataset_id!r}: its mask backend {mask_id!r} has no folder at {root}; run lokr-job fetch, "
            "or point the mask backend's instance_data_dir at the masks"
        )
    found = find_images(root)
    by_path = {image.relpath: image for image in found}
    wanted = [by_path[s.relpath] for s in samples if s.relpath in by_path]
    probes, _ = probe_files(root, wanted, probe_path)
    problems: list[str] = []
    sha256: dict[str, str] = {}
    for sample in samples:
        probe = probes.get(sample.relpath)
        if probe is None:
            problems.append(
                f"{sample.relpath}: no mask {root / sample.relpath}{_near_name(sample.relpath, by_path)}"
            )
        elif "error" in probe:
            problems.append(
                f"{sample.relpath}: its mask {root / sample.relpath} is unreadable ({probe['error']})"
            )
        elif (probe["width"], probe["height"]) != sample.size:
            problems.append(
                f"{sample.relpath}: its mask is {probe['width']}x{probe['height']} but the image is "
                f"{sample.size[0]}x{sample.size[1]}; a mask must have its image's size (it gets the image's crop)"
            )
        else:
            sha256[sample.relpath] = probe["sha256"]
    if problems:
        shown = "\n  ".join(problems[:_SHOWN_PROBLEMS])
        more = f"\n  and {len(problems) - _SHOWN_PROBLEMS} more" if len(problems) > _SHOWN_PROBLEMS else ""
        raise DataError(
            f"dataset {dataset_id!r}: {len(problems)} of its {len(samples)} images have no usable mask in mask "
            f"backend {mask_id!r} ({root}); every image needs a mask of the same name and size (all white to "
            f"mask nothing):\n  {shown}{more}"
        )
    return MaskFiles(dataset_id, root, sha256)


def _near_name(relpath: str, masks: dict[str, object]) -> str:
    """A hint when a mask of the same name with another extension exists (SimpleTuner will not match it)."""
    stem = os.path.splitext(relpath)[0]
    for extension in sorted(IMAGE_EXTENSIONS):
        candidate = stem + extension
        if candidate != relpath and candidate in masks:
            return (
                f" ({candidate} is there: masks are matched by the whole name, extension included; rename it)"
            )
    return ""
