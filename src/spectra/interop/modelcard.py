"""Model cards for exported Hugging Face directories, and ``--push-to-hub``.

``spectra export --to hf`` writes ``README.md`` with YAML front matter the Hub reads:
``library_name``, ``pipeline_tag``, ``tags``, ``model-index`` (the evaluation results
in the Hub's schema, when a `spectra eval` results JSON is given) and a ``spectra``
block: family, parameters, size in bits (embedding and head at 16 bits, as the paper
counts), training tokens and step, the TriLM model-parallel degree. Values come from
the checkpoint's config.json only: nothing is guessed.
"""

from __future__ import annotations

import json
from pathlib import Path

from spectra.errors import SpectraError

FAMILY_TEXT = {"floatlm": "FloatLM (half-precision weights)",
               "trilm": "TriLM (ternary weights γ·{-1, 0, +1} per model-parallel shard, trained from scratch)",
               "bilm": "BiLM (binary weights, an ablation)", "quantlm": "QuantLM (GPTQ post-training quantization)"}


def _yaml_scalar(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v), ensure_ascii=False)  # a JSON string is a valid YAML scalar


def to_yaml(obj, indent: int = 0) -> str:
    """Block YAML for dicts/lists of scalars (enough for card metadata; no PyYAML needed to write)."""
    pad = " " * indent
    lines = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, (dict, list)) and v:
                lines.append(f"{pad}{k}:")
                lines.append(to_yaml(v, indent + 2))
            else:
                lines.append(f"{pad}{k}: {_yaml_scalar(v) if not isinstance(v, (dict, list)) else '[]'}")
    else:
        for v in obj:
            if isinstance(v, dict):
                body = to_yaml(v, indent + 2).splitlines()
                lines.append(f"{pad}- {body[0].lstrip()}")
                lines.extend(body[1:])
            else:
                lines.append(f"{pad}- {_yaml_scalar(v)}")
    return "\n".join(lines)


def card_metadata(ckpt: str | Path, eval_results: dict | None = None, name: str | None = None) -> dict:
    from spectra.sizes import size_bits
    from spectra.model import build_meta, param_counts
    from spectra.store import family_of, read_model_config

    cfg, d = read_model_config(ckpt)
    fam = family_of(d)
    c = param_counts(build_meta(cfg))
    meta = d.get("spectra") or {}
    name = name or Path(ckpt).resolve().name
    info = {"family": fam, "params": int(c["total"]), "non_embedding_params": int(c["non_embedding"]),
            "size_bits": float(size_bits(c, fam, cfg)), "training_tokens": meta.get("tokens"),
            "training_step": meta.get("step"), "hidden": cfg.dim, "layers": cfg.n_layers, "heads": cfg.n_heads,
            "ffn": cfg.ffn_dim, "vocab": cfg.vocab_size, "context": cfg.max_seq_len}
    if fam in ("trilm", "bilm"):
        info["pretraining_model_parallel"] = cfg.mp
    md = {"library_name": "transformers", "pipeline_tag": "text-generation",
          "tags": ["spectra", "spectra-lm", fam, "llama"] + (["ternary"] if fam == "trilm" else []),
          "spectra": info}
    rows = eval_rows(eval_results) if eval_results else []
    if rows:
        md["model-index"] = [{"name": name, "results": [
            {"task": {"type": "text-generation"}, "dataset": {"name": t, "type": t},
             "metrics": [{"type": m, "value": round(v, 4)}]} for t, m, v in rows]}]
    return md


def eval_rows(res: dict) -> list[tuple[str, str, float]]:
    """(task, metric, value) for each task of a `spectra eval` results dict (headline metric first)."""
    from spectra.eval.tasks import SIX_TASK_METRIC

    tasks = res.get("tasks")
    if not isinstance(tasks, dict):
        raise SpectraError("eval results: no 'tasks' object; pass the results JSON `spectra eval --out` writes")
    rows = []
    for t, m in tasks.items():
        if not isinstance(m, dict):
            continue
        key = SIX_TASK_METRIC.get(t) or next((k for k in ("acc_norm", "acc", "exact_match", "pct_stereotype",
                                                          "perplexity") if isinstance(m.get(k), (int, float))), None)
        if key and isinstance(m.get(key), (int, float)):
            rows.append((t, key, float(m[key])))
    return rows


def model_card(ckpt: str | Path, eval_results: dict | None = None, name: str | None = None) -> str:
    md = card_metadata(ckpt, eval_results, name)
    info = md["spectra"]
    name = name or Path(ckpt).resolve().name
    lines = ["---", to_yaml(md), "---", "", f"# {name}", "",
             f"A {FAMILY_TEXT.get(info['family'], info['family'])} language model in the Spectra layout (LLaMA-style "
             "decoder: RMSNorm, RoPE, SwiGLU, untied head), exported by "
             "[spectra-lm](https://arxiv.org/abs/2407.12327) as a plain `LlamaForCausalLM` "
             "(loads with `transformers`, no custom code).", "",
             "| | |", "|---|---|",
             f"| parameters | {info['params']:,} ({info['non_embedding_params']:,} non-embedding) |",
             f"| size | {info['size_bits'] / 1e9:.3f} Gbit (embedding and head counted at 16 bits) |",
             f"| shape | hidden {info['hidden']}, {info['layers']} layers, {info['heads']} heads, GLU {info['ffn']}, "
             f"vocab {info['vocab']}, context {info['context']} |"]
    if info.get("training_tokens") is not None:
        lines.append(f"| training | {info['training_tokens']:,} tokens ({info.get('training_step')} steps) |")
    if "pretraining_model_parallel" in info:
        lines.append(f"| model-parallel shards (one γ each) | {info['pretraining_model_parallel']} |")
    rows = eval_rows(eval_results) if eval_results else []
    if rows:
        lines += ["", "## Evaluation (lm-evaluation-harness, zero-shot)", "", "| task | metric | value |",
                  "|---|---|---|"] + [f"| {t} | {m} | {v:.4f} |" for t, m, v in rows]
        if eval_results.get("six_task_avg") is not None:
            lines.append(f"\n6-task average (ARC-C/E, HellaSwag, PIQA acc_norm; BoolQ, WinoGrande acc): "
                         f"{100 * eval_results['six_task_avg']:.1f}")
        lim = (eval_results.get("settings") or {}).get("limit")
        if lim:
            lines.append(f"\nEvaluated on the first {lim} examples per task (`--limit`), not the full sets.")
    return "\n".join(lines) + "\n"


def load_eval_results(path: str | Path) -> dict:
    p = Path(path)
    try:
        res = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SpectraError(f"--eval-results '{p}': cannot read JSON ({e}); pass the file `spectra eval --out` "
                           "writes") from None
    if not isinstance(res, dict):
        raise SpectraError(f"--eval-results '{p}': not a JSON object; pass the file `spectra eval --out` writes")
    eval_rows(res)  # a clear error for a file without tasks
    return res


def write_model_card(ckpt: str | Path, out_dir: str | Path, eval_results: str | Path | dict | None = None,
                     name: str | None = None) -> Path:
    """README.md in ``out_dir`` (atomically); ``eval_results``: a `spectra eval` results JSON (path or dict)."""
    from spectra.fsutil import atomic_write_text

    if eval_results is not None and not isinstance(eval_results, dict):
        eval_results = load_eval_results(eval_results)
    out = Path(out_dir) / "README.md"
    atomic_write_text(out, model_card(ckpt, eval_results, name))
    return out


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                message: str | None = None) -> str:
    """Create ``repo_id`` if needed and upload ``folder`` (HfApi.upload_folder); returns the commit URL."""
    from spectra.store.hub import hub_id

    if hub_id(repo_id) is None:
        raise SpectraError(f"--push-to-hub '{repo_id}' is not a Hub repository id; use OWNER/NAME")
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise SpectraError("--push-to-hub needs huggingface_hub: pip install 'spectra-lm[hub]'") from None
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", revision=revision,
                                 commit_message=message or f"Upload {Path(folder).name} with spectra-lm")
    except Exception as e:  # noqa: BLE001  (auth, network, permissions: one line, the cause named)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SpectraError(f"push to '{repo_id}' failed: {first} (log in with `hf auth login` or set HF_TOKEN)") from None
    return str(getattr(info, "commit_url", info))
