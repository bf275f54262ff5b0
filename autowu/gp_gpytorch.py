"""The paper's GP test in plain gpytorch: the reference that ``autowu.gp.PastMinimumTest`` is checked against.

Same inputs, same state and same random draws as the fast test, computed the way kakaobrain/autowu does it:
an ExactGP (constant mean, scaled RBF kernel, Gaussian likelihood), 100 steps of torch Adam on the exact
marginal likelihood, then five predictive distributions with full 500 x 500 covariances. Select it with
``AutoWU(..., gp_backend="gpytorch")``; it is about 80 times slower on a CPU (benchmarks/bench_gp.py).
"""
from __future__ import annotations

from typing import Optional, Tuple

import gpytorch
import numpy as np
import torch

from .gp import GPHyperparameters, GPTestResult, GPTestSettings, subsample


class _ExactGP(gpytorch.models.ExactGP):
    def __init__(self, likelihood):
        super().__init__(None, None, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


class GPyTorchPastMinimumTest:
    """Drop-in for ``PastMinimumTest``; ``dtype=torch.float32`` is what the paper's code runs in."""

    def __init__(self, settings: Optional[GPTestSettings] = None, dtype: torch.dtype = torch.float64):
        self.settings = settings or GPTestSettings()
        self.dtype = dtype
        self.grid = np.linspace(0.0, 1.0, self.settings.grid_points)

    def __call__(self, losses: np.ndarray, valid: np.ndarray, hyper: GPHyperparameters,
                 generator: torch.Generator) -> Tuple[GPTestResult, GPHyperparameters]:
        s, dt = self.settings, self.dtype
        num_losses = len(losses)
        valid_indices = np.flatnonzero(valid)
        if len(valid_indices) < 2:
            raise ValueError(f"the GP test needs at least 2 valid losses, got {len(valid_indices)}")
        likelihood = gpytorch.likelihoods.GaussianLikelihood(
            noise_constraint=gpytorch.constraints.GreaterThan(s.noise_floor)).to(dt)
        model = _ExactGP(likelihood).to(dt)
        model.covar_module.base_kernel.lengthscale = s.lengthscale
        params = [likelihood.noise_covar.raw_noise, model.covar_module.raw_outputscale,
                  model.mean_module.raw_constant]
        with torch.no_grad():
            for param, value in zip(params, hyper.raw):
                param.fill_(float(value))
            params[2].fill_(float(losses[valid_indices].mean()))
        optimizer = torch.optim.Adam(params, lr=s.fit_lr)
        if hyper.adam_step > 0:
            optimizer.load_state_dict({"state": {
                i: {"step": torch.tensor(float(hyper.adam_step)),
                    "exp_avg": torch.tensor(hyper.adam_exp_avg[i], dtype=dt).reshape(params[i].shape),
                    "exp_avg_sq": torch.tensor(hyper.adam_exp_avg_sq[i], dtype=dt).reshape(params[i].shape)}
                for i in range(3)}, "param_groups": optimizer.state_dict()["param_groups"]})

        def condition(max_points):
            idx = subsample(valid_indices, max_points, generator)
            x = torch.as_tensor(idx / num_losses, dtype=dt)
            model.set_train_data(x, torch.as_tensor(losses[idx], dtype=dt), strict=False)
            return x, model.train_targets

        x, y = condition(s.fit_points)
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
        model.train()
        for _ in range(s.fit_iterations):
            optimizer.zero_grad()
            (-mll(model(x), y)).backward()
            optimizer.step()

        new_hyper = GPHyperparameters(
            raw=np.array([float(p.detach()) for p in params]),
            adam_exp_avg=np.array([float(optimizer.state[p]["exp_avg"]) for p in params]),
            adam_exp_avg_sq=np.array([float(optimizer.state[p]["exp_avg_sq"]) for p in params]),
            adam_step=int(optimizer.state[params[0]]["step"]))

        grid = torch.as_tensor(self.grid, dtype=dt)
        fits, failed = [], 0
        model.eval()
        while len(fits) < s.num_fits and failed < 2 * s.num_fits:
            condition(s.condition_points)
            try:
                with torch.no_grad():
                    dist = model(grid)
                    mean, cov = dist.mean.double().numpy(), dist.covariance_matrix.double().numpy()
            except gpytorch.utils.errors.NotPSDError:
                failed += 1
                continue
            fits.append((mean, np.diag(cov) + cov[-1, -1] - 2 * cov[:, -1], np.diag(cov)))
        result = GPTestResult.from_fits(fits, self.grid, s, failed)
        return result, new_hyper
