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
