"""The Gaussian-process test of AutoWU: has the training-loss curve's minimum already passed?

The paper's procedure (kakaobrain/autowu), step for step:

1. Fit the GP's constant mean, output scale and noise by 100 Adam steps (lr 0.01) of the exact marginal
   likelihood on at most 100 losses drawn without replacement. The RBF lengthscale is fixed at 0.2 on
   x = step index / number of losses so far. Hyperparameters and Adam's moments carry over from test to test;
   the mean restarts at the mean loss each test.
2. Five times: condition on at most 500 other drawn losses, predict the latent curve f on a 500-point grid of
   [0, 1], and compute ``max_{i<k} P(f_i < f_k)`` (k the last grid point).
3. Pass when a majority of the five exceed the confidence (0.95).

What is new here is only how it is computed. An RBF kernel with lengthscale 0.2 on [0, 1] is, to 1e-14, a
rank-26 kernel: ``k(x, x') = phi(x) . phi(x')`` with ``phi`` the stable Nystrom features of a fixed 64-point
grid on [-0.25, 1.25]. So the GP is a Bayesian linear model on 26 weights: the marginal likelihood and its
gradient come from one SVD per test, each prediction from one 26 x 26 Cholesky, in float64 numpy. The
decisions match the plain gpytorch procedure (``autowu.gp_gpytorch``) at about 1/80 of its time
(``benchmarks/bench_gp.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

import numpy as np
import torch
from numba import njit

from .errors import ConfigError


@dataclass(frozen=True)
class GPTestSettings:
    """Settings of the test; the defaults are the paper's."""
    lengthscale: float = 0.2
    fit_points: int = 100          # losses the hyperparameters are fitted on
    fit_iterations: int = 100      # Adam steps per test
    fit_lr: float = 0.01
    condition_points: int = 500    # losses each prediction is conditioned on
    grid_points: int = 500         # prediction grid on [0, 1]
    num_fits: int = 5              # independent subsamples that vote
    confidence: float = 0.95
    noise_init: float = 1e-3
    noise_floor: float = 1e-4      # gpytorch GaussianLikelihood's GreaterThan(1e-4) constraint
    diff_jitter: float = 1e-4      # added to Var(f_i - f_k), as the paper's code does

    def __post_init__(self):
        for name in ("fit_points", "fit_iterations", "condition_points", "grid_points", "num_fits"):
            if getattr(self, name) < 1:
                raise ConfigError(f"GPTestSettings.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.5 <= self.confidence < 1.0:
            raise ConfigError(f"GPTestSettings.confidence must be in [0.5, 1), got {self.confidence}")
        if self.lengthscale <= 0:
            raise ConfigError(f"GPTestSettings.lengthscale must be > 0, got {self.lengthscale}")


def softplus(x: float) -> float:
    return x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x))


def inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


@dataclass
class GPHyperparameters:
    """The fitted hyperparameters in gpytorch's raw (unconstrained) form, with Adam's state.

    Order of the three parameters everywhere: (raw_noise, raw_outputscale, mean).
    """
    raw: np.ndarray
    adam_exp_avg: np.ndarray = field(default_factory=lambda: np.zeros(3))
    adam_exp_avg_sq: np.ndarray = field(default_factory=lambda: np.zeros(3))
    adam_step: int = 0

    @classmethod
    def initial(cls, settings: GPTestSettings) -> "GPHyperparameters":
        raw_noise = inverse_softplus(settings.noise_init - settings.noise_floor)
        return cls(raw=np.array([raw_noise, 0.0, 0.0]))  # gpytorch's raw outputscale starts at 0

    def noise(self, settings: GPTestSettings) -> float:
        return softplus(float(self.raw[0])) + settings.noise_floor

    def outputscale(self) -> float:
        return softplus(float(self.raw[1]))

    def state_dict(self) -> dict:
        return {"raw": self.raw.tolist(), "adam_exp_avg": self.adam_exp_avg.tolist(),
                "adam_exp_avg_sq": self.adam_exp_avg_sq.tolist(), "adam_step": self.adam_step}

    @classmethod
    def from_state_dict(cls, state: dict) -> "GPHyperparameters":
        return cls(raw=np.array(state["raw"], dtype=np.float64),
                   adam_exp_avg=np.array(state["adam_exp_avg"], dtype=np.float64),
                   adam_exp_avg_sq=np.array(state["adam_exp_avg_sq"], dtype=np.float64),
                   adam_step=int(state["adam_step"]))

    def copy(self) -> "GPHyperparameters":
        return GPHyperparameters.from_state_dict(self.state_dict())


@dataclass(frozen=True)
class GPTestResult:
    """What one test measured. ``passed`` is the majority vote; nothing here decides the schedule."""
    probabilities: Tuple[float, ...]   # max_{i<k} P(f_i < f_k) of each fit
    votes: int                         # fits whose probability exceeds the confidence
    passed: bool
    argmin_x: Tuple[float, ...]        # each fit's predicted argmin on [0, 1]
    grid: np.ndarray                   # prediction grid on [0, 1]
    curve_mean: np.ndarray             # predicted latent curve, averaged over the fits
    curve_std: np.ndarray              # its marginal standard deviation, averaged over the fits
    failed_fits: int = 0               # fits that hit a numerical failure and were redrawn

    @classmethod
    def from_fits(cls, fits, grid: np.ndarray, settings: GPTestSettings, failed_fits: int = 0) -> "GPTestResult":
        """The result of the fits' predictions: ``(curve, Var(f_i - f_k), Var(f_i))`` on ``grid`` each."""
        probabilities = tuple(past_minimum_probability(curve, diff_var, settings.diff_jitter)
                              for curve, diff_var, _ in fits)
        votes = sum(p > settings.confidence for p in probabilities)
        nan_curve = np.full_like(grid, np.nan)
        return cls(probabilities=probabilities, votes=votes, passed=votes > settings.num_fits / 2,
                   argmin_x=tuple(float(grid[int(np.argmin(curve))]) for curve, _, _ in fits), grid=grid,
                   curve_mean=np.mean([f[0] for f in fits], axis=0) if fits else nan_curve,
                   curve_std=np.mean([np.sqrt(np.maximum(f[2], 0.0)) for f in fits], axis=0) if fits else nan_curve,
                   failed_fits=failed_fits)

    @property
    def probability(self) -> float:
        """The median of the fits' probabilities: above the confidence exactly when the majority is."""
        return float(np.median(self.probabilities)) if self.probabilities else float("nan")


def subsample(valid_indices: np.ndarray, max_points: int, generator: torch.Generator) -> np.ndarray:
    """Sorted draw without replacement, as the paper's code does it (torch multinomial on uniform weights).

    A fixed-seed torch generator makes every data-parallel rank, and a resumed run, draw the same indices.
    """
    if len(valid_indices) <= max_points:
        return valid_indices
    picked = torch.ones(len(valid_indices)).multinomial(max_points, generator=generator)
    return valid_indices[np.sort(picked.numpy())]


def past_minimum_probability(mean: np.ndarray, diff_var: np.ndarray, diff_jitter: float) -> float:
    """``max_{i<k} P(f_i < f_k)`` from the means and the variances of ``f_i - f_k``.

    Phi is monotone, so the max of the probabilities is Phi of the max standardised gap.
    """
    z = (mean[-1] - mean[:-1]) / np.sqrt(np.maximum(diff_var[:-1], 0.0) + diff_jitter)
    return 0.5 * math.erfc(-float(z.max()) / math.sqrt(2.0))


@njit(cache=True)
def _adam_fit(lam, u_y, u_1, y_perp, ones_perp, raw, exp_avg, exp_avg_sq, step, iterations, lr, noise_floor):
    """The Adam loop of ``PastMinimumTest._fit``, compiled: updates ``raw`` and the moments in place and
    returns the new step count. Stops early, keeping the last finite values, if a gradient is not finite."""
    n = len(y_perp)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    grad = np.empty(3)
    for _ in range(iterations):
        raw_noise, raw_scale, mean = raw[0], raw[1], raw[2]
        noise = np.log1p(np.exp(-abs(raw_noise))) + max(raw_noise, 0.0) + noise_floor
        scale = np.log1p(np.exp(-abs(raw_scale))) + max(raw_scale, 0.0)
        d = scale * lam + noise
        p = u_y - mean * u_1              # U^T (y - mean)
        r_perp = y_perp - mean * ones_perp
        alpha = p / d                     # U^T A^{-1} (y - mean)
        rr = np.dot(r_perp, r_perp)
        grad_mean = -(np.dot(u_1, alpha) + np.dot(ones_perp, r_perp) / noise) / n
        grad_scale = 0.5 * (np.sum(lam / d) - np.sum(lam * alpha ** 2)) / n
        grad_noise = 0.5 * (np.sum(1.0 / d) + (n - len(d)) / noise - np.sum(alpha ** 2) - rr / noise ** 2) / n
        grad[0] = grad_noise / (1.0 + np.exp(-raw_noise))
        grad[1] = grad_scale / (1.0 + np.exp(-raw_scale))
        grad[2] = grad_mean
        if not np.all(np.isfinite(grad)):
            break
        step += 1
        bias1 = 1.0 - beta1 ** step
        bias2 = 1.0 - beta2 ** step
        for k in range(3):
            exp_avg[k] = beta1 * exp_avg[k] + (1.0 - beta1) * grad[k]
            exp_avg_sq[k] = beta2 * exp_avg_sq[k] + (1.0 - beta2) * grad[k] * grad[k]
            raw[k] -= (lr / bias1) * exp_avg[k] / (np.sqrt(exp_avg_sq[k]) / np.sqrt(bias2) + eps)
    return step


class RBFFeatures:
    """Stable Nystrom features of the RBF kernel on [0, 1]: ``k(x, x') = phi(x) . phi(x')`` to ~1e-14."""

    def __init__(self, lengthscale: float, relative_cutoff: float = 1e-14):
        # The inducing grid reaches past [0, 1] so that the edges are as exact as the middle; its spacing
        # (well under the lengthscale) decides the accuracy, its eigen-cutoff the conditioning.
        num_inducing = max(64, int(math.ceil(1.5 / lengthscale * 8)))
        self.lengthscale = lengthscale
        self.inducing = np.linspace(-0.25, 1.25, num_inducing)
        eigvals, eigvecs = np.linalg.eigh(self._kernel(self.inducing, self.inducing))
        keep = eigvals > eigvals.max() * relative_cutoff
        self.projection = eigvecs[:, keep] / np.sqrt(eigvals[keep])

    def _kernel(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.exp(-0.5 * ((a[:, None] - b[None, :]) / self.lengthscale) ** 2)

    @property
    def rank(self) -> int:
        return self.projection.shape[1]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self._kernel(x, self.inducing) @ self.projection


class PastMinimumTest:
    """The paper's test, computed in the GP's 26-dimensional weight space. Stateless: state is passed in."""

    def __init__(self, settings: Optional[GPTestSettings] = None):
        self.settings = settings or GPTestSettings()
        self.features = RBFFeatures(self.settings.lengthscale)
        self.grid = np.linspace(0.0, 1.0, self.settings.grid_points)
        self.grid_features = self.features(self.grid)
        self._grid_diff = self.grid_features - self.grid_features[-1]  # phi(x_i) - phi(x_k)

    def __call__(self, losses: np.ndarray, valid: np.ndarray, hyper: GPHyperparameters,
                 generator: torch.Generator) -> Tuple[GPTestResult, GPHyperparameters]:
        """Run one test on ``losses`` (float64, one a step so far) where ``valid`` is True.

        Returns the result and the refitted hyperparameters; ``hyper`` itself is left untouched.
        """
        s = self.settings
        num_losses = len(losses)
        valid_indices = np.flatnonzero(valid)
        if len(valid_indices) < 2:
            raise ValueError(f"the GP test needs at least 2 valid losses, got {len(valid_indices)}")
        hyper = hyper.copy()
        hyper.raw[2] = losses[valid_indices].mean()  # the paper re-initialises the constant mean each test

        fit_indices = subsample(valid_indices, s.fit_points, generator)
        self._fit(fit_indices / num_losses, losses[fit_indices], hyper)

        noise, outputscale, mean = hyper.noise(s), hyper.outputscale(), float(hyper.raw[2])
        fits, failed = [], 0
        while len(fits) < s.num_fits and failed < 2 * s.num_fits:
            indices = subsample(valid_indices, s.condition_points, generator)
            prediction = self._predict(indices / num_losses, losses[indices] - mean, noise, outputscale)
            if prediction is None:
                failed += 1
                continue
            curve, diff_var, marginal_var = prediction
            fits.append((curve + mean, diff_var, marginal_var))
        result = GPTestResult.from_fits(fits, self.grid, s, failed)
        return result, hyper

    def _fit(self, x: np.ndarray, y: np.ndarray, hyper: GPHyperparameters) -> None:
        """100 Adam steps on -log p(y) / n, exactly as torch.optim.Adam takes them, with the analytic gradient.

        With ``K0 = U diag(lam) U^T`` (rank r from the features) the covariance ``s K0 + noise I`` has
        eigenvalues ``d = s lam + noise`` on U and ``noise`` on its complement, so every term is a sum.
        """
        s = self.settings
        u, sv, _ = np.linalg.svd(self.features(x), full_matrices=False)
        u_y, u_1 = u.T @ y, u.T @ np.ones(len(x))
        y_perp, ones_perp = y - u @ u_y, 1.0 - u @ u_1  # the parts of y and 1 outside U
        hyper.adam_step = _adam_fit(sv ** 2, u_y, u_1, y_perp, ones_perp, hyper.raw, hyper.adam_exp_avg,
                                    hyper.adam_exp_avg_sq, hyper.adam_step, s.fit_iterations, s.fit_lr,
                                    s.noise_floor)

    def _predict(self, x: np.ndarray, centred_y: np.ndarray, noise: float, outputscale: float):
        """Posterior of the latent curve on the grid: mean, Var(f_i - f_k) and Var(f_i); None on failure.

        Weight space: ``f = phi w``, ``w ~ N(0, s I)``; the posterior precision ``phi^T phi / noise + I / s``
        is r x r. A Cholesky that fails (not positive definite) is retried with growing jitter.
        """
        feats = self.features(x)
        precision = feats.T @ feats / noise + np.eye(feats.shape[1]) / outputscale
        jitter = 0.0
        for _ in range(4):
            try:
                chol = np.linalg.cholesky(precision + jitter * np.eye(len(precision)))
                break
            except np.linalg.LinAlgError:
                jitter = max(jitter * 10, 1e-8 * float(np.abs(np.diag(precision)).max()))
        else:
            return None
        chol_inv = np.linalg.inv(chol)  # r x r: cheaper than triangular solves against 500 right-hand sides
        weights_mean = chol_inv.T @ (chol_inv @ (feats.T @ centred_y / noise))
        whitened_diff = chol_inv @ self._grid_diff.T       # L^{-1} (phi_i - phi_k)
        whitened = chol_inv @ self.grid_features.T
        curve = self.grid_features @ weights_mean
        if not np.all(np.isfinite(curve)):
            return None
        return curve, (whitened_diff ** 2).sum(axis=0), (whitened ** 2).sum(axis=0)
