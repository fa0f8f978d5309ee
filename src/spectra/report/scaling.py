"""Scaling-law fits: L(N) = A / N^alpha + eps (Levenberg-Marquardt, as in the paper)."""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class PowerLawFit:
    A: float
    alpha: float
    eps: float
    A_err: float
    alpha_err: float
    eps_err: float
    n_points: int
    rmse: float

    def predict(self, n) -> np.ndarray:
        return self.A / np.power(np.asarray(n, dtype=float), self.alpha) + self.eps

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (f"L(N) = {self.A:.4g}(±{self.A_err:.2g}) / N^{self.alpha:.4f}(±{self.alpha_err:.2g}) "
                f"+ {self.eps:.4f}(±{self.eps_err:.2g})  [{self.n_points} points, rmse {self.rmse:.3g}]")


def _initial_guess(n: np.ndarray, loss: np.ndarray) -> tuple[float, float, float]:
    """Grid over eps, log-linear regression for (A, alpha); keep the best residual."""
    best = None
    lo = float(loss.min())
    for frac in np.linspace(0.0, 0.98, 50):
        eps = frac * lo
        y = np.log(loss - eps)
        slope, icpt = np.polyfit(np.log(n), y, 1)
        alpha, A = -slope, math.exp(icpt)
        if alpha <= 0:
            continue
        r = float(np.sum((A / n**alpha + eps - loss) ** 2))
        if best is None or r < best[0]:
            best = (r, A, alpha, eps)
    if best is None:
        return float(loss.max() - lo) * float(n.min()) ** 0.3, 0.3, 0.9 * lo
    return best[1], best[2], best[3]


def fit_power_law(n, loss, p0: tuple[float, float, float] | None = None) -> PowerLawFit:
    """Fit L(N) = A/N^alpha + eps with scipy's Levenberg-Marquardt; errors are 1-sigma from the covariance.

    Needs at least 3 points (3 parameters); with exactly 3 the fit is exact and the
    uncertainties are reported as NaN.
    """
    from scipy.optimize import OptimizeWarning, curve_fit

    n = np.asarray(n, dtype=float)
    loss = np.asarray(loss, dtype=float)
    if n.shape != loss.shape or n.ndim != 1:
        raise ValueError("n and loss must be 1-D arrays of the same length")
    if len(n) < 3:
        raise ValueError(f"a 3-parameter power law needs at least 3 points, got {len(n)}")
    if np.any(n <= 0) or not np.all(np.isfinite(loss)):
        raise ValueError("parameter counts must be positive and losses finite")
    A0, a0, e0 = p0 or _initial_guess(n, loss)
    # Fit in a scaled parameterisation (A' = A / N_ref^alpha) so LM is well conditioned.
    nref = float(np.exp(np.mean(np.log(n))))
    x = n / nref

    def f(x, a_scaled, alpha, eps):
        return a_scaled / np.power(x, alpha) + eps

    p_init = (A0 / nref**a0, a0, e0)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        # With exactly 3 points the covariance is undefined: the errors become NaN below and
        # the report says the fit is exact, so scipy's OptimizeWarning would only be noise.
        warnings.simplefilter("ignore", OptimizeWarning)
        popt, pcov = curve_fit(f, x, loss, p0=p_init, method="lm", maxfev=20000)
    a_s, alpha, eps = popt
    A = a_s * nref**alpha
    resid = f(x, *popt) - loss
    dof = len(n) - 3
    if dof > 0 and np.all(np.isfinite(pcov)):
        perr = np.sqrt(np.abs(np.diag(pcov)))
        # propagate to A = a_s * nref^alpha: dA = A * sqrt((da/a)^2 + (ln nref * dalpha)^2) (+ covariance)
        ln = math.log(nref)
        var_A = (nref**alpha) ** 2 * (pcov[0, 0] + (a_s * ln) ** 2 * pcov[1, 1] + 2 * a_s * ln * pcov[0, 1])
        A_err, alpha_err, eps_err = math.sqrt(abs(var_A)), float(perr[1]), float(perr[2])
    else:
        A_err = alpha_err = eps_err = float("nan")
    return PowerLawFit(float(A), float(alpha), float(eps), A_err, alpha_err, eps_err, len(n),
                       float(np.sqrt(np.mean(resid**2))))
