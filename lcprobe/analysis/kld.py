"""llama-perplexity's KL-divergence statistics, from per-token values (numpy only).

Every formula follows ``kl_divergence()`` in llama.cpp's
``tools/perplexity/perplexity.cpp`` (the copy llama-cpp-python vendors), so the
numbers read next to ``llama-perplexity --kl-divergence``'s:

- a mean and its uncertainty: ``f = sum/n``, ``sqrt((sum2/n - f^2) / (n-1))``,
  0 when that variance is not positive or n <= 10;
- the covariance of two means: ``(sum_ab/n - (sum_a/n)(sum_b/n)) / (n-1)``, 0
  for n < 10;
- PPL = exp(mean NLL) with uncertainty PPL x (uncertainty of the mean NLL);
  ratio, ln ratio and difference propagated with that covariance;
- RMS Δp = sqrt(mean Δp^2), uncertainty 0.5/RMS x (uncertainty of mean Δp^2);
- same top p: fraction of tokens whose argmax agrees, sqrt(p(1-p)/(n-1));
- percentiles: linear interpolation at ``fraction x (n-1)``, that product in
  float32 as llama.cpp computes it; the median is the middle value or the mean
  of the two middle ones.

Inputs are the per-token values llama-perplexity accumulates: NLL of the next
token under each model, KL(base || quantized), Δp = p_q(token) - p_base(token)
and whether the two argmaxes agree. Sums are taken in float64.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

#: kld.json's "final" keys, in llama-perplexity's print order.
FINAL_KEYS = (
    "mean_ppl_q", "mean_ppl_base", "cor_ln_ppl", "mean_ln_ppl_ratio", "mean_ppl_ratio", "mean_ppl_diff",
    "kld_mean", "kld_mean_err", "kld_max", "kld_p999", "kld_p99", "kld_p95", "kld_p90", "kld_median",
    "kld_p10", "kld_p05", "kld_p01", "kld_p001", "kld_min",
    "dp_mean", "dp_mean_err", "dp_max", "dp_p999", "dp_p99", "dp_p95", "dp_p90", "dp_p75", "dp_median",
    "dp_p25", "dp_p10", "dp_p05", "dp_p01", "dp_p001", "dp_min", "dp_rms", "dp_rms_err",
    "same_top", "same_top_err",
)
#: Uncertainties llama-perplexity prints for the perplexity block (kept next to FINAL_KEYS).
PPL_ERR_KEYS = ("mean_ppl_q_err", "mean_ppl_base_err", "mean_ln_ppl_ratio_err", "mean_ppl_ratio_err",
                "mean_ppl_diff_err")
#: kld.json's per-layer keys.
LAYER_KEYS = ("layer", "kld_mean", "kld_median", "kld_p99", "same_top", "dp_rms", "rel_l2", "cosine",
              "rel_l2_mid", "cosine_mid")

# (key suffix, fraction) of the percentiles llama-perplexity prints, top down.
KLD_PERCENTILES = (("p999", 0.999), ("p99", 0.990), ("p95", 0.950), ("p90", 0.900),
                   ("p10", 0.100), ("p05", 0.050), ("p01", 0.010), ("p001", 0.001))
DP_PERCENTILES = (("p999", 0.999), ("p99", 0.990), ("p95", 0.950), ("p90", 0.900), ("p75", 0.750),
                  ("p25", 0.250), ("p10", 0.100), ("p05", 0.050), ("p01", 0.010), ("p001", 0.001))

#: llama-perplexity prints no final block below this many tokens.
MIN_TOKENS = 100


def mean_and_uncertainty(total: float, total2: float, count: int) -> tuple[float, float]:
    """perplexity.cpp's ``mean_and_uncertainty``: the mean and the standard error of the mean."""
    if count < 1:
        return 0.0, 0.0
    f = total / count
    df = total2 / count - f * f
    return f, (math.sqrt(df / (count - 1)) if df > 0 and count > 10 else 0.0)


def covariance(total_a: float, total_b: float, total_ab: float, count: int) -> float:
    """perplexity.cpp's ``covariance`` of the two means (already divided by n - 1)."""
    if count < 10:
        return 0.0
    return (total_ab / count - (total_a / count) * (total_b / count)) / (count - 1)


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """perplexity.cpp's ``percentile`` on ascending values (float32 interpolation, as there)."""
    v = np.asarray(sorted_values, dtype=np.float32)
    if len(v) == 0:
        return math.nan
    if fraction <= 0:
        return float(v[0])
    if fraction >= 1:
        return float(v[-1])
    p = np.float32(fraction) * np.float32(len(v) - 1)
    ip = int(p)
    p = np.float32(p - np.float32(ip))
    return float((np.float32(1) - p) * v[ip] + p * v[min(ip + 1, len(v) - 1)])


def median(sorted_values: np.ndarray) -> float:
    v = np.asarray(sorted_values, dtype=np.float32)
    n = len(v)
    if n == 0:
        return math.nan
    if n % 2 == 0:
        return float(np.float32(0.5) * (v[n // 2] + v[n // 2 - 1]))
    return float(v[n // 2])


def _sums(x: np.ndarray) -> tuple[float, float]:
    x = np.asarray(x, dtype=np.float64)
    return float(x.sum()), float(np.dot(x, x))


def _spread(out: dict, name: str, values, table) -> None:
    """max, the percentiles above the median, median, those below, min: llama-perplexity's order."""
    v = np.sort(np.asarray(values, np.float32))
    out[f"{name}_max"] = float(v[-1])
    for key, frac in table:
        if frac < 0.5 and f"{name}_median" not in out:
            out[f"{name}_median"] = median(v)
        out[f"{name}_{key}"] = percentile(v, frac)
    out[f"{name}_min"] = float(v[0])


def final_stats(nll_q: np.ndarray, nll_base: np.ndarray, kld: np.ndarray, dp: np.ndarray,
                same_top: np.ndarray) -> dict[str, float]:
    """llama-perplexity's final block: :data:`FINAL_KEYS` plus :data:`PPL_ERR_KEYS`.

    Δp and same top p are fractions (llama-perplexity prints them x 100);
    ``cor_ln_ppl`` too. Needs at least two tokens.
    """
    nll_q = np.asarray(nll_q, np.float64)
    nll_base = np.asarray(nll_base, np.float64)
    n = len(nll_q)
    if n < 2 or not len(nll_base) == len(kld) == len(dp) == len(same_top) == n:
        raise ValueError(f"final_stats needs equally long per-token arrays of at least 2 tokens, got {n}")
    lq, lq_err = mean_and_uncertainty(*_sums(nll_q), n)
    lb, lb_err = mean_and_uncertainty(*_sums(nll_base), n)
    cov = covariance(float(nll_q.sum()), float(nll_base.sum()), float(np.dot(nll_q, nll_base)), n)
    ppl_q, ppl_b = math.exp(lq), math.exp(lb)
    ppl_q_err, ppl_b_err = ppl_q * lq_err, ppl_b * lb_err
    ln_ratio = lq - lb
    ln_ratio_err = math.sqrt(max(lq_err ** 2 + lb_err ** 2 - 2.0 * cov, 0.0))
    ratio = math.exp(ln_ratio)
    denom = lq_err * lb_err
    out: dict[str, float] = {
        "mean_ppl_q": ppl_q, "mean_ppl_base": ppl_b,
        "cor_ln_ppl": cov / denom if denom > 0 else math.nan,
        "mean_ln_ppl_ratio": ln_ratio, "mean_ppl_ratio": ratio, "mean_ppl_diff": ppl_q - ppl_b,
        "mean_ppl_q_err": ppl_q_err, "mean_ppl_base_err": ppl_b_err, "mean_ln_ppl_ratio_err": ln_ratio_err,
        "mean_ppl_ratio_err": ratio * ln_ratio_err,
        "mean_ppl_diff_err": math.sqrt(max(ppl_q_err ** 2 + ppl_b_err ** 2 - 2.0 * ppl_q * ppl_b * cov, 0.0)),
    }
    out["kld_mean"], out["kld_mean_err"] = mean_and_uncertainty(*_sums(kld), n)
    _spread(out, "kld", kld, KLD_PERCENTILES)
    out["dp_mean"], out["dp_mean_err"] = mean_and_uncertainty(*_sums(dp), n)
    _spread(out, "dp", dp, DP_PERCENTILES)
    dp2 = np.square(np.asarray(dp, np.float64))
    mse, mse_err = mean_and_uncertainty(float(dp2.sum()), float(np.dot(dp2, dp2)), n)
    out["dp_rms"] = math.sqrt(mse)
    out["dp_rms_err"] = 0.5 / out["dp_rms"] * mse_err if out["dp_rms"] > 0 else 0.0
    p = float(np.count_nonzero(same_top)) / n
    out["same_top"], out["same_top_err"] = p, math.sqrt(p * (1.0 - p) / (n - 1))
    return out


def layer_stats(layer: int, kld: np.ndarray, dp: np.ndarray, same_top: np.ndarray,
                rel_l2: Sequence[float], cosine: Sequence[float], rel_l2_mid: Sequence[float],
                cosine_mid: Sequence[float]) -> dict[str, float | int | None]:
    """One row of kld.json's ``layers``: lens KLD mean/median/99%, same top, RMS Δp, and the
    residual's mean relative L2 error and cosine after the block and after attention."""
    k = np.sort(np.asarray(kld, np.float32))
    d = np.asarray(dp, np.float64)

    def mean(x: Sequence[float]) -> float | None:
        a = np.asarray(x, np.float64)
        return float(a.mean()) if a.size else None

    return {
        "layer": int(layer),
        "kld_mean": float(np.asarray(kld, np.float64).mean()),
        "kld_median": median(k),
        "kld_p99": percentile(k, 0.99),
        "same_top": float(np.count_nonzero(same_top)) / len(k),
        "dp_rms": float(math.sqrt(np.mean(d * d))),
        "rel_l2": mean(rel_l2), "cosine": mean(cosine),
        "rel_l2_mid": mean(rel_l2_mid), "cosine_mid": mean(cosine_mid),
    }


def token_stats(logp_base: np.ndarray, logp_q: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Per-token values from full log-probability rows ``(n, vocab)`` of base and quantized model.

    ``nll_base``/``nll_q`` of ``targets``, ``kld`` = KL(base || q) summed over the
    whole vocabulary in float64, ``dp`` = p_q(target) - p_base(target) and
    ``same_top`` (argmax equality; ties go to the lowest id, as llama.cpp's loop).
    """
    from lcprobe.analysis.lens import kl_rows

    rows = np.arange(len(targets))
    t = np.asarray(targets, np.int64)
    lb = logp_base[rows, t].astype(np.float64)
    lq = logp_q[rows, t].astype(np.float64)
    return {
        "nll_base": -lb, "nll_q": -lq,
        "kld": kl_rows(logp_base, logp_q),
        "dp": np.exp(lq) - np.exp(lb),
        "same_top": np.argmax(logp_base, axis=1) == np.argmax(logp_q, axis=1),
    }


def residual_error(h_base: np.ndarray, h_q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row relative L2 error ||h_q - h_base|| / ||h_base|| and cosine similarity."""
    b = np.asarray(h_base, np.float64)
    q = np.asarray(h_q, np.float64)
    nb = np.linalg.norm(b, axis=1)
    nq = np.linalg.norm(q, axis=1)
    rel = np.linalg.norm(q - b, axis=1) / np.where(nb > 0, nb, np.nan)
    cos = np.einsum("nd,nd->n", b, q) / np.where(nb * nq > 0, nb * nq, np.nan)
    return rel, cos
