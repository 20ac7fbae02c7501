"""Sizes and transforms: resolution units, 16 px snapping, AuraFlow's positional grid, crops and aspects."""

import pytest
from PIL import Image

from job.config.backends import DatasetConfig
from job.data.geometry import (
    ModelGeometry,
    bucket_size,
    is_larger_than,
    is_smaller_than,
    resolution_problem,
)
from job.data.transform import ASPECT_CHOICES, Transform, TransformPlanner, apply_transform, plan_transform

AURAFLOW = ModelGeometry(alignment=16, max_patches=9216)
TINY = ModelGeometry(alignment=16, max_patches=1024)
SHA = "ab" * 32


def _dataset(**settings: object) -> DatasetConfig:
    base = {"id": "d", "instance_data_dir": "/data", "resolution": 32, "resolution_type": "pixel_area"}
    return DatasetConfig(**{**base, **settings})


def _plan(
    width: int,
    height: int,
    seed: int = 0,
    sha: str = SHA,
    rounding: int | None = None,
    geometry: ModelGeometry = TINY,
    **settings: object,
) -> Transform:
    return plan_transform(
        width, height, _dataset(**settings), geometry, seed=seed, image_sha256=sha, aspect_rounding=rounding
    )


def test_auraflow_grid_allows_1536_px_a_side() -> None:
    assert AURAFLOW.max_side == 1536
    assert TINY.max_side == 512


@pytest.mark.parametrize(
    ("aspect", "resolution", "kind", "expected"),
    [
        (1.0, 1024, "pixel_area", (1024, 1024)),
        (1.5, 1024, "pixel_area", (1248, 832)),
        (2 / 3, 1024, "pixel_area", (832, 1248)),
        (0.75, 1024, "pixel", (1024, 1360)),
        (1.0, 1.0, "area", (1024, 1024)),  # SimpleTuner reads 1.0 megapixels as 1024²
        (1.0, 0.36, "area", (608, 608)),
        (1.25, 64, "pixel_area", (80, 64)),  # small sizes keep their aspect
    ],
)
def test_bucket_sizes(aspect: float, resolution: float, kind: str, expected: tuple[int, int]) -> None:
    assert bucket_size(aspect, resolution, kind, AURAFLOW) == expected


@pytest.mark.parametrize("aspect", [0.2, 0.5, 1.0, 1.7, 3.0, 6.0])
@pytest.mark.parametrize("resolution", [256, 1024, 1536, 4096])
def test_buckets_snap_to_16_and_stay_inside_the_positional_grid(aspect: float, resolution: int) -> None:
    width, height = bucket_size(aspect, resolution, "pixel_area", AURAFLOW)
    assert width % 16 == 0 and height % 16 == 0
    assert AURAFLOW.fits(width, height)
    assert width <= 1536 and height <= 1536 and (width // 16) * (height // 16) <= 9216


def test_a_resolution_past_the_grid_names_the_dataset_and_key() -> None:
    assert resolution_problem(_dataset(resolution=1536), AURAFLOW) is None
    problem = resolution_problem(_dataset(id="big", resolution=2048), AURAFLOW)
    assert problem is not None
    assert "'big'" in problem and "resolution 2048" in problem and "1536x1536" in problem
    assert resolution_problem(_dataset(resolution=600, resolution_type="pixel"), TINY) is not None
    assert resolution_problem(_dataset(resolution=2.0, resolution_type="area"), AURAFLOW) is None
    assert resolution_problem(_dataset(resolution=4.0, resolution_type="area"), AURAFLOW) is not None


def test_size_limits_use_the_resolution_unit() -> None:
    assert is_smaller_than(1000, 2000, 1024, "pixel")  # shorter side
    assert not is_smaller_than(1280, 960, 1024, "pixel_area")  # area 1.23M ≥ 1024²
    assert is_smaller_than(1000, 1000, 1024, "pixel_area")
    assert is_smaller_than(1000, 1000, 1.0, "area")
    assert is_larger_than(2000, 2000, 1536, "pixel_area") and not is_larger_than(
        1500, 1500, 1536, "pixel_area"
    )


def test_square_center_crop_at_the_image_scale() -> None:
    transform = _plan(100, 60, crop=True, crop_aspect="square", crop_style="center")
    assert transform.resized == (100, 60)
    assert transform.crop_box == (34, 14, 66, 46)
    assert transform.bucket == (32, 32)


def test_centre_is_center() -> None:
    assert _plan(100, 60, crop=True, crop_style="centre") == _plan(100, 60, crop=True, crop_style="center")


def test_corner_crop_is_bottom_right() -> None:
    assert _plan(100, 60, crop=True, crop_style="corner").crop_box == (68, 28, 100, 60)


def test_random_crop_is_seeded_by_job_seed_and_image() -> None:
    first = _plan(300, 200, seed=1, crop=True, crop_style="random")
    assert first == _plan(300, 200, seed=1, crop=True, crop_style="random")
    boxes = {_plan(300, 200, seed=s, crop=True, crop_style="random").crop_box for s in range(20)}
    boxes |= {_plan(300, 200, sha=f"{i:064x}", crop=True, crop_style="random").crop_box for i in range(20)}
    assert len(boxes) > 10
    for left, top, right, bottom in boxes:
        assert (right - left, bottom - top) == (32, 32)
        assert min(left, top) >= 0 and right <= 300 and bottom <= 200


def test_downsample_before_crop_when_larger_than_maximum() -> None:
    settings = {"crop": True, "maximum_image_size": 64, "target_downsample_size": 48}
    transform = _plan(400, 300, **settings)
    width, height = transform.resized
    assert abs(width * height - 48 * 48) < 200 and abs(width / height - 4 / 3) < 0.05
    assert _plan(60, 60, **settings).resized == (60, 60)  # under the maximum: cropped as is


def test_small_images_are_upscaled_to_cover_the_bucket() -> None:
    transform = _plan(20, 10, crop=True, crop_aspect="square")
    assert transform.resized == (64, 32) and transform.bucket == (32, 32)


def test_no_crop_resizes_to_the_bucket_keeping_aspect() -> None:
    assert _plan(80, 64, resolution=64, crop=False).crop_box == (0, 0, 80, 64)
    transform = _plan(400, 200, crop=False)
    assert transform.bucket == (32, 16) and transform.resized == (32, 16)


def test_preserve_keeps_the_image_aspect() -> None:
    transform = _plan(900, 600, resolution=512, geometry=AURAFLOW, crop=True, crop_aspect="preserve")
    assert transform.bucket == (624, 416) and transform.resized == (900, 600)


def test_aspect_rounding_merges_near_square_images_into_the_square_bucket() -> None:
    assert _plan(1001, 1000, resolution=256, rounding=2).bucket == (256, 256)


def test_closest_picks_the_nearest_listed_aspect() -> None:
    transform = _plan(1000, 600, resolution=256, crop=True, crop_aspect="closest")
    width, height = transform.bucket
    assert abs(width / height - 16 / 9) < 0.1


def test_random_aspect_is_seeded_and_picks_only_listed_aspects_that_fit() -> None:
    def pick(index: int, size: tuple[int, int] = (2000, 2000)) -> tuple[int, int]:
        return _plan(*size, sha=f"{index:064x}", resolution=256, crop=True, crop_aspect="random").bucket

    assert [pick(i) for i in range(10)] == [pick(i) for i in range(10)]
    listed = {bucket_size(aspect, 256, "pixel_area", TINY) for aspect in ASPECT_CHOICES}
    picks = {pick(i) for i in range(60)}
    assert len(picks) > 3 and picks <= listed
    # A 300x300 image fits only the buckets no wider or taller than itself.
    assert {pick(i, (300, 300)) for i in range(60)} <= {(w, h) for w, h in listed if w <= 300 and h <= 300}


@pytest.mark.parametrize(
    "settings",
    [
        {"crop": True, "crop_style": "random"},
        {"crop": True, "crop_aspect": "random", "crop_style": "random"},
        {"crop": True, "crop_aspect": "closest", "crop_style": "corner"},
        {"crop": False},
    ],
)
def test_a_scan_s_planner_gives_each_image_the_transform_it_gets_alone(settings: dict[str, object]) -> None:
    # Same-sized images of different content (a random crop or aspect tells them apart), sizes met again.
    images = [
        (w, h, f"{i:02x}" * 32) for i, (w, h) in enumerate([(64, 48), (64, 48), (32, 32), (48, 64)] * 3)
    ]
    planner = TransformPlanner(_dataset(**settings), TINY, seed=3, aspect_rounding=None)
    planned = [planner.plan(w, h, sha) for w, h, sha in images]
    assert planned == [_plan(w, h, seed=3, sha=sha, **settings) for w, h, sha in images]


def test_apply_gives_an_image_of_the_bucket_size() -> None:
    image = Image.new("RGB", (100, 60), (1, 2, 3))
    for settings in ({"crop": True}, {"crop": False}, {"crop": True, "crop_aspect": "closest"}):
        transform = _plan(100, 60, **settings)
        assert apply_transform(image, transform).size == transform.bucket
