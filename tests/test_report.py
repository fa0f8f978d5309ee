import json
import math

import numpy as np
import pytest

from spectra.report import fit_families, write_report
from spectra.report.collect import ModelRecord
from spectra.report.paper import PAPER_PARAMS, SCALING
from spectra.report.scaling import fit_power_law


@pytest.mark.parametrize("fam", ["trilm", "floatlm"])
def test_fit_recovers_paper_law(fam):
    law = SCALING[fam]
    n = np.array(list(PAPER_PARAMS.values()))
    loss = law["A"] / n ** law["alpha"] + law["eps"]
    rng = np.random.default_rng(0)
    loss = loss * (1 + rng.normal(0, 1e-4, size=loss.shape))  # tiny measurement noise
    fit = fit_power_law(n, loss)
    for k, v in [("A", fit.A), ("alpha", fit.alpha), ("eps", fit.eps)]:
        assert abs(v - law[k]) / law[k] < 0.05, (k, v, law[k])
    assert fit.A_err > 0 and fit.alpha_err > 0 and fit.eps_err > 0


def test_fit_needs_three_points():
    with pytest.raises(ValueError, match="at least 3"):
        fit_power_law([1e6, 2e6], [3.0, 2.9])


def _records():
    recs = []
    law = {"floatlm": (159.0, 0.26, 1.67), "trilm": (185.0, 0.26, 1.76)}
    for i, (size, n) in enumerate([("a", 1e6), ("b", 4e6), ("c", 1.6e7), ("d", 6.4e7)]):
        for fam, (A, al, e) in law.items():
            L = A / n**al + e
            toks = [1000 * 2**k for k in range(8)]
            recs.append(ModelRecord(id=f"{fam}-{size}", family=fam, size=size, params=int(n), non_embedding=int(n * .7),
                                    size_bits=n * (16 if fam == "floatlm" else 1.58), val_loss=L,
                                    curve={"tokens": toks, "loss": [L + 3 / (k + 1) for k in range(8)]},
                                    val_curve={"tokens": toks, "val_loss": [L + 3 / (k + 1) for k in range(8)]},
                                    checkpoints=[{"step": k, "tokens": t, "val_loss": L + 3 / (k + 1)} for k, t in enumerate(toks)]))
        recs.append(ModelRecord(id=f"q4-{size}", family="q4", size=size, params=int(n), size_bits=n * 4.25,
                                val_loss=law["floatlm"][0] / n ** 0.26 + 1.7))
    return recs


def test_write_report(tmp_path):
    recs = _records()
    fits, notes = fit_families(recs)
    assert set(fits) == {"floatlm", "trilm", "q4"}
    md = write_report([], tmp_path, paper=True, records=recs)
    text = md.read_text()
    assert "L(N) = A / N^α + ε" in text and "TriLM" in text and "Table 7" in text
    assert "gap shrinks" in text
    for png in ["loss_curves.png", "scaling_params.png", "scaling_bits.png", "ppl_vs_bits.png",
                "checkpoints_val_loss.png", "score_vs_bits.png"]:
        p = tmp_path / png
        assert p.exists() and p.read_bytes()[:4] == b"\x89PNG", png
        assert f"]({png})" in text
    data = json.loads((tmp_path / "results.json").read_text())
    assert abs(data["fits"]["trilm"]["alpha"] - 0.26) < 0.01
    assert (tmp_path / "results.csv").read_text().count("\n") == len(recs) + 1


def test_report_cli_errors(tmp_path):
    from spectra.cli import main

    assert main(["report", str(tmp_path / "missing")]) == 2


def test_quantlm_seeds_are_averaged(tmp_path):
    from spectra.report.collect import average_seeds

    recs = [r for r in _records() if r.family != "q4"]
    for size, n in [("a", 1e6), ("b", 4e6), ("c", 1.6e7)]:
        for seed, dl in enumerate([0.00, 0.02, 0.04]):
            recs.append(ModelRecord(id=f"q3-{size}-s{seed}", family="q3", size=size, params=int(n), size_bits=n * 3.25,
                                    val_loss=3.0 + dl, six_task_avg=40.0 + seed,
                                    tasks={"piqa": {"acc": 0.6 + 0.01 * seed, "acc_norm": 0.61}}))
    avg = average_seeds(recs)
    q3 = [r for r in avg if r.family == "q3"]
    assert len(q3) == 3 and len(avg) == len(recs) - 6
    a = next(r for r in q3 if r.size == "a")
    assert a.id == "q3-a" and a.val_loss == pytest.approx(3.02) and a.six_task_avg == pytest.approx(41.0)
    assert a.tasks["piqa"]["acc"] == pytest.approx(0.61) and a.tasks["piqa"]["acc_norm"] == pytest.approx(0.61)
    assert a.extra["val_loss_std"] == pytest.approx(0.02) and [s["id"] for s in a.extra["seeds"]] == [
        "q3-a-s0", "q3-a-s1", "q3-a-s2"]
    # Unchanged: single-seed QuantLMs and the other families, in order.
    assert [r.id for r in avg if r.family != "q3"] == [r.id for r in recs if r.family != "q3"]
    text = write_report([], tmp_path, records=recs).read_text()
    assert "means over calibration seeds" in text and "q3-a" in text and "q3-a-s1" not in text.split("per seed")[0]
    data = json.loads((tmp_path / "results.json").read_text())
    assert sum(m["family"] == "q3" for m in data["models"]) == 3
