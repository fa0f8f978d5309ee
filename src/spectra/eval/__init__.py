"""Evaluation: lm-eval tasks (the ``spectra`` lm-eval model), perplexity, validation loss.

Importing this package registers the lm-eval model ``spectra``::

    import lm_eval, spectra.eval
    lm_eval.simple_evaluate(model="spectra", model_args={"pretrained": DIR}, tasks=["arc_easy"])

The one-call API used by ``spectra eval`` and the suite:

* :func:`evaluate` -- tasks (+ optional perplexity / validation loss) -> results dict
  (and ``out`` JSON + markdown next to it);
* :func:`perplexity` -- sliding-window perplexity and bits per byte of text files;
* :func:`validation_loss` -- mean token NLL on a token-shard directory.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from spectra.eval.lm import SpectraLM  # noqa: F401  (registers "spectra" with lm-eval)
from spectra.eval.perplexity import perplexity, validation_loss  # noqa: F401
from spectra.eval.results import markdown, six_task_average  # noqa: F401
from spectra.eval.tasks import GROUPS, SPECTRA6, SPECTRA13, expand_tasks  # noqa: F401

__all__ = ["SpectraLM", "evaluate", "perplexity", "validation_loss", "markdown", "six_task_average",
           "SPECTRA6", "SPECTRA13", "write_results"]


def write_results(res: dict, out: str | Path) -> tuple[Path, Path]:
    """results JSON at ``out`` and the markdown table next to it (``.md``), both atomically."""
    from spectra.fsutil import atomic_write_json, atomic_write_text

    out = Path(out)
    atomic_write_json(out, res)
    md = out.with_suffix(".md")
    atomic_write_text(md, markdown(res))
    return out, md


def evaluate(ckpt, tasks="spectra6", task_data=None, limit=None, batch_size: int = 32, out=None, *,
             tokenizer=None, ppl_files=None, ppl_seq_len: int | None = None, ppl_stride: int | None = None,
             ppl_max_tokens: int | None = None, val_data=None, val_seq_len: int = 512, val_windows: int | None = 64,
             max_batch_tokens: int = 8192, bootstrap_iters: int = 100, log_samples: bool = False,
             model_args: dict | None = None, progress: bool = True) -> dict:
    """Run lm-eval tasks (and/or perplexity, validation loss) on one checkpoint.

    ``tasks``: 'spectra6' | 'spectra13' | 'arc_easy,piqa' | list | None (no tasks).
    ``task_data``: directory of local JSON Lines in the HF schema (layout of
    `spectra tasks fetch`); without it $SPECTRA_TASK_DATA, the user cache, then the hub datasets.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    from spectra.eval import results as R
    from spectra.eval import tasks as T
    from torch import nn

    from spectra.errors import SpectraError
    from spectra.eval.loading import describe
    from spectra.store import resolve
    from spectra.store.loader import usable_kind

    if tasks and task_data is None:  # $SPECTRA_TASK_DATA, then the user cache, then the Hub
        task_data = T.resolve_task_data(None, T.expand_tasks(tasks)).path
    if task_data is not None:
        T.offline_env()
    if not isinstance(ckpt, nn.Module):
        ckpt = resolve(ckpt)  # a local path, or a Hub id looked up (or downloaded) once, here
        usable_kind(ckpt)  # a clear error for a path that is not a model, before any work
    lm_res, names, fps, skipped, notes = None, [], {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="spectra-tasks-") as tmp:
        tm = None
        if tasks:  # resolve and check tasks before loading the model: bad input fails fast
            explicit = {t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks)} - set(T.GROUPS)
            names = T.expand_tasks(tasks)
            if task_data is not None:
                T.check_local(names)
                setup = T.write_local_tasks(names, task_data, tmp, explicit=explicit)
                names, fps, skipped, notes = setup.tasks, setup.fingerprints, setup.skipped, setup.notes
                # Only our include-YAMLs are indexed (they pull lm-eval's own YAMLs in by absolute
                # path): indexing all of lm-eval's thousands of tasks costs seconds per run.
                tm = TaskManager(include_path=tmp, include_defaults=False)
            else:
                tm = TaskManager()
                T.check_known(names, tm)
        lm = SpectraLM(pretrained=ckpt, tokenizer=tokenizer, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                       **(model_args or {}))
        settings = {"limit": limit, "batch_size": batch_size, "max_batch_tokens": max_batch_tokens,
                    "max_length": lm.max_length, "task_data": str(task_data) if task_data else None,
                    "bootstrap_iters": bootstrap_iters, "num_fewshot": 0}
        t0 = time.perf_counter()
        if names:
            try:
                lm_res = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=tm, limit=limit,
                                                 num_fewshot=None, bootstrap_iters=bootstrap_iters,
                                                 log_samples=log_samples)
            except ConnectionError as e:  # hub datasets without network / cache
                raise SpectraError(f"{e}; no network or Hugging Face cache for the hub datasets: pass "
                                   f"--task-data DIR with local JSON Lines (docs/evaluation.md)") from None
    ppl = None
    if ppl_files:
        ppl = perplexity(lm.loaded, ppl_files, ppl_seq_len, ppl_stride, batch_size=max(1, min(batch_size, 8)),
                         max_tokens=ppl_max_tokens, progress=progress)
        settings.update(ppl_seq_len=ppl_seq_len or lm.max_length, ppl_stride=ppl_stride or ppl_seq_len or lm.max_length)
        from spectra.eval.tasks import sha256_file

        for f in ppl_files:
            fps[f"ppl:{f}"] = {"file": str(Path(f).resolve()), "sha256": sha256_file(Path(f))}
    vl = None
    if val_data:
        vinfo: dict = {}
        vl = validation_loss(lm.loaded, val_data, val_seq_len, val_windows, progress=progress, info=vinfo)
        settings.update(val_seq_len=val_seq_len, val_windows=val_windows)
        fps["val_data"] = vinfo
    s = lm.stats
    settings["seconds"] = round(time.perf_counter() - t0, 3)
    if s["loglikelihood_seconds"] > 0:
        settings["loglikelihood_requests_per_s"] = round(s["loglikelihood_requests"] / s["loglikelihood_seconds"], 2)
    res = R.build(describe(lm.loaded), lm_res, names, fingerprints=fps, skipped=skipped, notes=notes,
                  settings=settings, ppl=ppl, val_loss=vl)
    if lm_res is not None:
        res["lm_eval"] = {"results": lm_res.get("results", {}), "versions": lm_res.get("versions", {}),
                          "n-samples": lm_res.get("n-samples", {})}
        if log_samples:
            res["samples"] = lm_res.get("samples")
    if out is not None:
        write_results(res, out)
    return res
