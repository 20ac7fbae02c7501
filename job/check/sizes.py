"""Sizes against the transformer's positional grid, before any GPU time.

Every size a run trains or renders at must fit the grid on each side (``job.data.geometry``): each
``validation_resolution``, each dataset's buckets (``job.cache.plan.check_config``), and the bucket
alignment itself. ``check`` lists these problems with the others; ``run`` and its stages raise them before
they fetch, warm or train, with the flavour's known grid until the model is fetched and its own after.
"""

from job.cache.plan import check_config
from job.config.loader import ResolvedConfig
from job.data.geometry import ModelGeometry
from job.errors import ConfigError


def size_problems(cfg: ResolvedConfig, geometry: ModelGeometry) -> list[str]:
    """What in config.json cannot be trained or rendered by a model of ``geometry`` (datasets aside)."""
    job, where = cfg.job, cfg.config_path
    problems = []
    if geometry.bucket_step % geometry.alignment:
        patch = geometry.alignment
        problems.append(
            f"{where}: aspect_bucket_alignment {job.aspect_bucket_alignment}: bucket sides must be multiples "
            f"of the transformer's {patch} px patch; use a multiple of {patch} (64 is SimpleTuner's for AuraFlow)"
        )
    for width, height in job.validation_sizes:
        if why := geometry.render_problem(width, height):
            problems.append(f"{where}: validation_resolution {width}x{height}: {why}")
    return problems


def require_sizes_fit(cfg: ResolvedConfig, geometry: ModelGeometry) -> None:
    """``ConfigError`` naming every size, of config.json and of the datasets, that ``geometry`` refuses."""
    problems = size_problems(cfg, geometry)
    try:
        check_config(cfg.datasets, geometry)
    except ConfigError as exc:
        problems += exc.problems
    if problems:
        raise ConfigError(problems)


def require_render_size(width: int, height: int, geometry: ModelGeometry, key: str) -> None:
    """``ConfigError`` when an image of ``width``×``height`` cannot be rendered; ``key`` names the option."""
    if why := geometry.render_problem(width, height):
        raise ConfigError(f"{key} {width}x{height}: {why}")
