"""Hub ids offline: a huggingface_hub cache pre-populated in the exact Hub layout with a small
SpectraSuite-style repo (MP=6 TriLM, fp16), then `spectra import/eval OWNER/NAME`; model cards and
--push-to-hub (HfApi monkeypatched)."""

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("huggingface_hub", reason="huggingface_hub not installed (the hub extra)")

from spectra.cli import main  # noqa: E402
from spectra.config import ModelConfig  # noqa: E402
from helpers.release_dirs import write_release_dir  # noqa: E402  (tests/helpers)

REPO_ID = "SpectraTest/TriLM_tiny_Unpacked"


def populate_hub_cache(cache: Path, repo_id: str, src: Path, commit: str, refs=("main",)) -> Path:
    """Files of ``src`` as huggingface_hub stores a download: blobs/<sha256>, snapshots/<commit>/<file>
    -> ../../blobs/<sha256> symlinks, refs/<branch> = commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        data = f.read_bytes()
        h = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / h).write_bytes(data)
        link = snap / f.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / h, link.parent))
    for r in refs:
        (repo / "refs" / r).write_text(commit)
    return snap


@pytest.fixture(scope="module")
def hub_repo(tmp_path_factory):
    from spectra.data.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("hub")
    cfg = ModelConfig(dim=192, n_layers=2, n_heads=6, ffn_dim=384, vocab_size=768, mp=6, max_seq_len=64).validate()
    src = write_release_dir(root / "release", cfg, seed=6, dtype=torch.float16)
    text = " ".join(f"the ternary model {i} reads {i * 7 % 13} tokens and writes {i % 5} more." for i in range(400))
    tok = train_bpe([text], 600)
    tok.save(str(src / "tokenizer.json"))
    (root / "text.txt").write_text(text)
    cache = root / "cache"
    snap = populate_hub_cache(cache, REPO_ID, src, "1" * 40)
    (src / "config.json").write_text(json.dumps({**json.loads((src / "config.json").read_text()), "note": "v1"}))
    populate_hub_cache(cache, REPO_ID, src, "2" * 40, refs=("v1",))
    return cache, snap, root


@pytest.fixture
def offline_cache(hub_repo, monkeypatch):
    cache = hub_repo[0]
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub_repo


def test_import_hub_id_offline(offline_cache, tmp_path, capsys):
    from spectra.store import read_weights

    _, snap, _ = offline_cache
    assert main(["import", REPO_ID, "--out", str(tmp_path / "ck")]) == 0
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["spectra"]["family"] == "trilm" and cfg["pretraining_model_parallel"] == 6
    layout = json.loads((tmp_path / "ck" / "ternary_layout.json").read_text())
    assert layout["mp"] == 6
    # the same weights as the snapshot the cache holds
    a, b = read_weights(snap), read_weights(tmp_path / "ck")
    k = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a[k].float(), b[k].float())
    # --revision picks another ref of the same repository
    assert main(["import", REPO_ID, "--revision", "v1", "--out", str(tmp_path / "ck1")]) == 0
    assert "imported" in capsys.readouterr().out


def test_eval_hub_id_offline(offline_cache, tmp_path):
    root = offline_cache[2]
    out = tmp_path / "r.json"
    assert main(["eval", REPO_ID, "--ppl", str(root / "text.txt"), "--ppl-seq-len", "32", "--ppl-max-tokens", "96",
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    ppl = res["ppl"][str(root / "text.txt")]
    assert ppl["tokens"] == 96 and ppl["ppl"] > 1


@pytest.mark.parametrize("args", [["import", "Nobody/NotCached", "--out", "X"], ["eval", "Nobody/NotCached", "--ppl", "x"],
                                  ["import", REPO_ID, "--revision", "v9", "--out", "X"]])
def test_uncached_id_one_line_error(offline_cache, capsys, args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "HF_HUB_OFFLINE=1" in err and "not in the Hugging Face cache" in err


def test_revision_with_local_path_refused(offline_cache, capsys, tmp_path):
    snap = offline_cache[1]
    assert main(["import", str(snap), "--revision", "v1", "--out", str(tmp_path / "x")]) == 2
    assert "--revision" in capsys.readouterr().err


def _front_matter(text: str) -> dict:
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed (dev extra)")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_export_writes_model_card(offline_cache, tmp_path):
    assert main(["import", REPO_ID, "--out", str(tmp_path / "ck")]) == 0
    res = {"tasks": {"arc_easy": {"acc": 0.25, "acc_norm": 0.5, "n": 4}, "boolq": {"acc": 0.75, "n": 4}},
           "six_task_avg": None, "settings": {"limit": 4}}
    (tmp_path / "res.json").write_text(json.dumps(res))
    assert main(["export", str(tmp_path / "ck"), "--to", "hf", "--out", str(tmp_path / "hf"),
                 "--eval-results", str(tmp_path / "res.json")]) == 0
    md = _front_matter((tmp_path / "hf" / "README.md").read_text())
    assert md["library_name"] == "transformers" and md["pipeline_tag"] == "text-generation"
    assert {"spectra", "trilm", "ternary"} <= set(md["tags"])
    s = md["spectra"]
    assert s["family"] == "trilm" and s["pretraining_model_parallel"] == 6 and s["layers"] == 2
    from spectra.sizes import size_bits
    from spectra.model import build_meta, param_counts
    from spectra.store import read_model_config

    cfg, _ = read_model_config(tmp_path / "ck")
    c = param_counts(build_meta(cfg))
    assert s["params"] == c["total"] and s["size_bits"] == pytest.approx(size_bits(c, "trilm", cfg))
    assert "training_tokens" in s
    metrics = {r["dataset"]["name"]: r["metrics"][0] for r in md["model-index"][0]["results"]}
    assert metrics == {"arc_easy": {"type": "acc_norm", "value": 0.5}, "boolq": {"type": "acc", "value": 0.75}}
    text = (tmp_path / "hf" / "README.md").read_text()
    assert "| arc_easy | acc_norm | 0.5000 |" in text and "first 4 examples" in text


def test_model_card_records_training_tokens(tmp_path):
    pytest.importorskip("yaml", reason="PyYAML not installed (dev extra)")
    from spectra.interop.modelcard import model_card
    from spectra.store import save_model
    from spectra.model import Transformer

    cfg = ModelConfig(dim=64, n_layers=1, n_heads=2, ffn_dim=128, vocab_size=256, max_seq_len=32).validate()
    save_model(Transformer(cfg).init_weights(0), tmp_path / "m", "floatlm", meta={"tokens": 123456, "step": 7})
    md = _front_matter(model_card(tmp_path / "m"))
    assert md["spectra"]["training_tokens"] == 123456 and md["spectra"]["training_step"] == 7
    assert md["spectra"]["family"] == "floatlm" and "model-index" not in md


def test_push_to_hub_wiring(offline_cache, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            calls.append(("create", repo_id, kw))

        def upload_folder(self, **kw):
            calls.append(("upload", kw["repo_id"], kw))
            assert (Path(kw["folder_path"]) / "README.md").is_file()  # the card goes up with the weights
            return type("Info", (), {"commit_url": f"https://huggingface.co/{kw['repo_id']}/commit/abc"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert main(["import", REPO_ID, "--out", str(tmp_path / "ck")]) == 0
    assert main(["export", str(tmp_path / "ck"), "--to", "hf", "--out", str(tmp_path / "hf"),
                 "--push-to-hub", "me/my-trilm", "--private"]) == 0
    assert [c[:2] for c in calls] == [("create", "me/my-trilm"), ("upload", "me/my-trilm")]
    assert calls[0][2]["private"] is True and calls[1][2]["folder_path"] == str(tmp_path / "hf")
    assert "commit/abc" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "ck"), "--to", "hf", "--out", str(tmp_path / "hf2"),
                 "--push-to-hub", "not a repo"]) == 2


def test_generate_hub_id_offline(offline_cache, capsys):
    assert main(["generate", REPO_ID, "--prompt-ids", "1,2,3", "--max-new-tokens", "3", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert len(rec["tokens"]) == 3 and rec["prompt_tokens"] == 3


def test_pack_hub_id_offline(offline_cache, tmp_path):
    cache = offline_cache[0]
    cfg = ModelConfig(dim=256, n_layers=1, n_heads=4, ffn_dim=512, vocab_size=512, mp=2, max_seq_len=32).validate()
    src = write_release_dir(tmp_path / "rel", cfg, seed=2, dtype=torch.float16)
    populate_hub_cache(cache, "SpectraTest/TriLM_256", src, "4" * 40)
    assert main(["pack", "SpectraTest/TriLM_256", "--out", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "packed.json").is_file()
