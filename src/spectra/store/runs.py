"""Training run directories: where the final model, the checkpoints and the metrics are.

Layout (written by :mod:`spectra.train`)::

    RUN/train_config.json       the resolved training config
    RUN/metrics.jsonl           one JSON record per logged step (a torn last line is skipped)
    RUN/checkpoints/step-NNNNNNN/   a model directory + train_state/ (complete when its
                                    train_state/state.json lists every file at its size)
    RUN/final/                  the final model directory

A suite directory (``spectra suite``) indexes its models in ``SUITE/models.json``
(:func:`write_suite_index` / :func:`read_suite_index`): the plan and one record per
model (:class:`spectra.report.collect.ModelRecord` as a dict), which the report reads.

The completeness rule belongs to :mod:`spectra.train.checkpointing` (it writes the
checkpoints); this module calls its public functions rather than restating the rule.
"""

from __future__ import annotations

import json
from pathlib import Path

from spectra.errors import SpectraError
from spectra.store.kinds import METRICS_FILE, Kind, detect


def is_run_dir(path) -> bool:
    return detect(path) is Kind.RUN


def metrics_path(run) -> Path:
    return Path(run) / METRICS_FILE


def read_metrics(run) -> list[dict]:
    """The records of ``RUN/metrics.jsonl`` (empty when absent)."""
    from spectra.train.metrics import read_metrics as _read

    return _read(run)


def checkpoints(run) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first, as (step, path)."""
    from spectra.train.checkpointing import list_checkpoints

    return list_checkpoints(run)


def final_model(run) -> Path | None:
    """``RUN/final`` when complete, else the newest complete checkpoint; None when the run has neither."""
    from spectra.train.checkpointing import final_checkpoint

    try:
        return final_checkpoint(run)
    except SpectraError:
        return None


SUITE_INDEX = "models.json"


def is_suite_dir(path) -> bool:
    return (Path(path) / SUITE_INDEX).is_file()


def write_suite_index(suite_dir, plan: dict, models: list[dict]) -> Path:
    from spectra.fsutil import atomic_write_json

    out = Path(suite_dir) / SUITE_INDEX
    atomic_write_json(out, {"plan": plan, "models": models})
    return out


def read_suite_index(suite_dir) -> list[dict]:
    """The model records of a suite directory's index."""
    f = Path(suite_dir) / SUITE_INDEX
    try:
        data = json.loads(f.read_text())
        models = data["models"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SpectraError(f"{f}: not a suite index ({type(e).__name__}: {e}); re-run 'spectra suite' to rewrite it") from None
    if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
        raise SpectraError(f"{f}: 'models' must be a list of objects")
    return models
