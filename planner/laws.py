"""Parametric scaling-law forms: predict loss L(N, D), fit gradients, compute-optimal allocation.

A form is the shape of a law; a law (``planner.published.Law``) is a form plus parameter values.
Each form works in two parametrisations:

- ``params``: the published, natural one (``E, A, B, alpha, beta`` for Chinchilla);
- ``raw``: the one the optimiser moves, where every coordinate is unconstrained and the log-loss is
  a log-sum-exp of affine terms (Hoffmann et al. 2022, Appendix D.2), so fits are well conditioned.

All array functions broadcast: ``raw`` has shape ``(S, P)`` for S candidate parameter vectors,
``log_n`` and ``log_d`` have shape ``(M,)`` for M runs, and predictions have shape ``(S, M)``.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Mapping

import numpy as np
from numpy.typing import ArrayLike, NDArray

from planner.errors import InputError

FloatArray = NDArray[np.float64]

# Training compute of a dense transformer: C = 6 N D (Kaplan et al. 2020, sec. 2.1).
FLOPS_PER_PARAM_TOKEN = 6.0


def _softmax_terms(terms: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Log-sum-exp over the last axis and the softmax weights (its gradient)."""
    top = terms.max(axis=-1, keepdims=True)
    exp = np.exp(terms - top)
    total = exp.sum(axis=-1, keepdims=True)
    return (top + np.log(total))[..., 0], exp / total


class Form(ABC):
    """The shape of a scaling law L(N, D)."""

    name: str
    param_names: tuple[str, ...]
    raw_names: tuple[str, ...]

    @abstractmethod
    def to_raw(self, params: Mapping[str, float]) -> FloatArray:
        """Natural parameters -> the optimiser's unconstrained coordinates."""

    @abstractmethod
    def to_params(self, raw: ArrayLike) -> dict[str, float]:
        """The optimiser's coordinates (one vector) -> natural parameters."""

    @abstractmethod
    def value_and_grad(
        self, raw: FloatArray, log_n: FloatArray, log_d: FloatArray
    ) -> tuple[FloatArray, FloatArray]:
        """log L for each (candidate, run): shape (S, M), and d log L / d raw: shape (S, M, P)."""

    @abstractmethod
    def init_grid(self) -> FloatArray:
        """The grid of starting points (K, P) in raw coordinates for a multi-start fit."""

    @abstractmethod
    def loss(self, params: Mapping[str, float], n: ArrayLike, d: ArrayLike) -> FloatArray:
        """Predicted loss at N parameters and D tokens (broadcasting)."""

    @abstractmethod
    def optimal_n(self, params: Mapping[str, float], compute_flops: ArrayLike) -> FloatArray:
        """The N that minimises L(N, C / 6N) at training compute C."""

    @abstractmethod
    def tokens_for_loss(
        self, params: Mapping[str, float], n: ArrayLike, target_loss: float
    ) -> FloatArray:
        """Tokens D at which a model of N parameters reaches the target loss (NaN: never)."""

    def log_loss(self, raw: FloatArray, log_n: FloatArray, log_d: FloatArray) -> FloatArray:
        return self.value_and_grad(raw, log_n, log_d)[0]

    def check_params(self, params: Mapping[str, float], where: str) -> None:
        """Raise InputError unless ``params`` has exactly this form's finite parameters."""
        missing = [name for name in self.param_names if name not in params]
        extra = [name for name in params if name not in self.param_names]
        if missing or extra:
            raise InputError(
                f"{where}: form '{self.name}' takes parameters {', '.join(self.param_names)}"
                f" (missing: {', '.join(missing) or 'none'}; unknown: {', '.join(extra) or 'none'})"
            )
        for name in self.param_names:
            value = params[name]
            if not np.isfinite(value):
                raise InputError(f"{where}: parameter {name}={value} is not a finite number")


class ChinchillaForm(Form):
    """L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, eq. 2)."""

    name = "chinchilla"
    param_names = ("E", "A", "B", "alpha", "beta")
    raw_names = ("e", "a", "b", "alpha", "beta")  # E = exp(e), A = exp(a), B = exp(b)

    def to_raw(self, params: Mapping[str, float]) -> FloatArray:
        with np.errstate(divide="ignore"):
            return np.array(
                [
                    np.log(params["E"]),
                    np.log(params["A"]),
                    np.log(params["B"]),
                    params["alpha"],
                    params["beta"],
                ],
                dtype=float,
            )

    def to_params(self, raw: ArrayLike) -> dict[str, float]:
        e, a, b, alpha, beta = (float(v) for v in np.asarray(raw, dtype=float))
        return {"E": np.exp(e), "A": np.exp(a), "B": np.exp(b), "alpha": alpha, "beta": beta}

    def value_and_grad(
        self, raw: FloatArray, log_n: FloatArray, log_d: FloatArray
    ) -> tuple[FloatArray, FloatArray]:
        # log L = LSE(a - alpha log N, b - beta log D, e)   (Hoffmann et al. 2022, App. D.2)
        e, a, b, alpha, beta = (raw[:, i : i + 1] for i in range(5))
        terms = np.stack(
            np.broadcast_arrays(a - alpha * log_n, b - beta * log_d, e + 0.0 * log_n), axis=-1
        )
        value, weight = _softmax_terms(terms)
        w_n, w_d, w_e = weight[..., 0], weight[..., 1], weight[..., 2]
        grad = np.stack([w_e, w_n, w_d, -w_n * log_n, -w_d * log_d], axis=-1)
        return value, grad

    def init_grid(self) -> FloatArray:
        # Hoffmann et al.'s 4500 starting points (App. D.2): 5 x 5 x 5 x 6 x 6.
        alphas = np.arange(0.0, 2.5, 0.5)
        betas = np.arange(0.0, 2.5, 0.5)
        es = np.arange(-1.0, 1.5, 0.5)
        as_ = np.arange(0.0, 30.0, 5.0)
        bs = np.arange(0.0, 30.0, 5.0)
        grid = itertools.product(es, as_, bs, alphas, betas)
        return np.array(list(grid), dtype=float)

    def loss(self, params: Mapping[str, float], n: ArrayLike, d: ArrayLike) -> FloatArray:
        n_arr, d_arr = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        return np.asarray(
            params["E"]
            + params["A"] / n_arr ** params["alpha"]
            + params["B"] / d_arr ** params["beta"]
        )

    def optimal_n(self, params: Mapping[str, float], compute_flops: ArrayLike) -> FloatArray:
        # N_opt = G (C/6)^(beta/(alpha+beta)), G = (alpha A / (beta B))^(1/(alpha+beta))
        # (Hoffmann et al. 2022, eq. 4 and App. D.2)
        alpha, beta = params["alpha"], params["beta"]
        g = (alpha * params["A"] / (beta * params["B"])) ** (1.0 / (alpha + beta))
        c = np.asarray(compute_flops, dtype=float) / FLOPS_PER_PARAM_TOKEN
        return np.asarray(g * c ** (beta / (alpha + beta)))

    def tokens_for_loss(
        self, params: Mapping[str, float], n: ArrayLike, target_loss: float
    ) -> FloatArray:
        n_arr = np.asarray(n, dtype=float)
        gap = target_loss - params["E"] - params["A"] / n_arr ** params["alpha"]
        with np.errstate(divide="ignore", invalid="ignore"):
            d = np.where(gap > 0, (params["B"] / gap) ** (1.0 / params["beta"]), np.nan)
        return np.asarray(d)


class KaplanForm(Form):
    """L(N, D) = ((N_c / N)^(alpha_N / alpha_D) + D_c / D)^alpha_D (Kaplan et al. 2020, eq. 1.5)."""

    name = "kaplan"
    param_names = ("N_c", "D_c", "alpha_N", "alpha_D")
    raw_names = ("log_N_c", "log_D_c", "alpha_N", "alpha_D")

    def to_raw(self, params: Mapping[str, float]) -> FloatArray:
        with np.errstate(divide="ignore"):
            return np.array(
                [
                    np.log(params["N_c"]),
                    np.log(params["D_c"]),
                    params["alpha_N"],
                    params["alpha_D"],
                ],
                dtype=float,
            )

    def to_params(self, raw: ArrayLike) -> dict[str, float]:
        log_nc, log_dc, alpha_n, alpha_d = (float(v) for v in np.asarray(raw, dtype=float))
        return {
            "N_c": np.exp(log_nc),
            "D_c": np.exp(log_dc),
            "alpha_N": alpha_n,
            "alpha_D": alpha_d,
        }

    def value_and_grad(
        self, raw: FloatArray, log_n: FloatArray, log_d: FloatArray
    ) -> tuple[FloatArray, FloatArray]:
        # log L = alpha_D * LSE(p (log N_c - log N), log D_c - log D),  p = alpha_N / alpha_D
        log_nc, log_dc, alpha_n, alpha_d = (raw[:, i : i + 1] for i in range(4))
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = alpha_n / alpha_d
        u_n = ratio * (log_nc - log_n)
        terms = np.stack(np.broadcast_arrays(u_n, log_dc - log_d), axis=-1)
        lse, weight = _softmax_terms(terms)
        w_n, w_d = weight[..., 0], weight[..., 1]
        value = alpha_d * lse
        grad = np.stack(
            np.broadcast_arrays(
                w_n * alpha_n,  # d/d log N_c = alpha_D * w_n * p
                w_d * alpha_d,  # d/d log D_c
                w_n * (log_nc - log_n),  # d/d alpha_N
                lse - w_n * u_n,  # d/d alpha_D
            ),
            axis=-1,
        )
        return value, grad

    def init_grid(self) -> FloatArray:
        log_ncs = np.log(10.0) * np.arange(8.0, 17.0, 2.0)
        log_dcs = np.log(10.0) * np.arange(8.0, 17.0, 2.0)
        alphas = np.array([0.03, 0.06, 0.1, 0.2, 0.4])
        grid = itertools.product(log_ncs, log_dcs, alphas, alphas)
        return np.array(list(grid), dtype=float)

    def loss(self, params: Mapping[str, float], n: ArrayLike, d: ArrayLike) -> FloatArray:
        n_arr, d_arr = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        ratio = params["alpha_N"] / params["alpha_D"]
        inner = (params["N_c"] / n_arr) ** ratio + params["D_c"] / d_arr
        return np.asarray(inner ** params["alpha_D"])

    def optimal_n(self, params: Mapping[str, float], compute_flops: ArrayLike) -> FloatArray:
        # Minimise (N_c/N)^p + 6 D_c N / C over N:  N^(p+1) = p N_c^p C / (6 D_c).
        p = params["alpha_N"] / params["alpha_D"]
        c = np.asarray(compute_flops, dtype=float)
        log_n = (
            np.log(p) + p * np.log(params["N_c"]) + np.log(c) - np.log(6.0 * params["D_c"])
        ) / (p + 1.0)
        return np.asarray(np.exp(log_n))

    def tokens_for_loss(
        self, params: Mapping[str, float], n: ArrayLike, target_loss: float
    ) -> FloatArray:
        n_arr = np.asarray(n, dtype=float)
        p = params["alpha_N"] / params["alpha_D"]
        gap = target_loss ** (1.0 / params["alpha_D"]) - (params["N_c"] / n_arr) ** p
        with np.errstate(divide="ignore", invalid="ignore"):
            d = np.where(gap > 0, params["D_c"] / gap, np.nan)
        return np.asarray(d)


FORMS: dict[str, Form] = {form.name: form for form in (ChinchillaForm(), KaplanForm())}


def get_form(name: str, where: str = "form") -> Form:
    """The form called ``name``, or an InputError listing the known ones."""
    try:
        return FORMS[name]
    except KeyError:
        raise InputError(f"{where}: '{name}' is not one of: {', '.join(FORMS)}") from None
