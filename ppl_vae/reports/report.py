r"""The evaluation report: dataset means of per-datapoint estimates, the k̂ verdict on
log p(x), bits per dimension where they mean something, active units, and the table.

Input: the per-datapoint arrays of :func:`ppl_vae.reports.evaluation.evaluate_blocks` over n datapoints
(those of every block, gathered).
Output: a JSON-ready dict in nats per datapoint (the sign of a log-density), with two kinds of
standard error for each mean: ``*_stderr``, the Monte Carlo error on these datapoints,
√(Σ_i se_i²)/n, and ``*_stderr_across_datapoints``, std_i/√n, the datapoints' own spread
(:class:`ppl_vae.inference.estimators.Estimate`).

Honesty rules (``docs/estimators.md``):

* log p(x) ≈ IWAE_K is flagged "lower bound; SE unreliable" when the Pareto k̂ of the weights
  exceeds min(1 − 1/log10 K, 0.7) (:func:`ppl_vae.inference.psis.khat_threshold`, Vehtari et al. 2024)
  on more than :data:`UNRELIABLE_FRACTION` of the datapoints (``log_px_reliable = False``).
  Measured at k̂ ≈ 1.5, the delta-method SE then understates the spread of repeated
  estimates 2–3×.
* bits/dim = −log p(x) / (D ln 2) is reported only where it bounds a code length, each with
  what it is (``bits_per_dim_label``: of which data, and through which bound;
  :mod:`ppl_vae.reports.bits`): for discrete data, where p(x) is a probability, and for a density of
  uniformly dequantized 8-bit images, as a bound on the 8-bit images' bits/dim; for any other
  density it is omitted with the reason (``bits_per_dim_omitted``).
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch

from ..inference import estimators, psis
from . import collapse, latents
from .bits import NO_BITS, BitsScale

UNRELIABLE_FRACTION = 0.1  # log p(x) is flagged when k̂ > khat_threshold(K) on more than this fraction
MEAN, MC_VAR = "posterior_mean:", "posterior_mc_var:"  # per-site keys of the block results, (d, M)
KL = "kl:"  # per-site key of each layer's KL term, (M,)


def bits_per_dim(nats: float, dim: int) -> float:
    """−log p / (D ln 2): a log-probability per datapoint in nats → bits per dimension."""
    return -nats / (dim * math.log(2))


def summarize(
    res: dict,
    ks,
    num_samples: int,
    dim: int,
    discrete: bool,
    mean_samples: int = 0,
    likelihood: str | None = None,
    bits: BitsScale | str | None = None,
    kl_warmup: float | None = None,
) -> dict:
    """Dataset means of :func:`~ppl_vae.reports.evaluation.evaluate_blocks`' arrays with their Monte Carlo standard errors
    (``*_stderr``: :meth:`~ppl_vae.inference.estimators.Estimate.mean_stderr`) and, under
    ``*_stderr_across_datapoints``, the spread of the datapoints themselves
    (:meth:`~ppl_vae.inference.estimators.Estimate.across_datapoints_stderr`); k̂ against
    ``khat_threshold(K)`` with the verdict ``log_px_reliable`` (``None`` when k̂ needs a larger K);
    bits per dimension on the :class:`~ppl_vae.reports.bits.BitsScale` ``bits``, or, a string, the
    reason there are none (None: ``"discrete data"`` when ``discrete``, else none); the active
    units of each latent site (``None`` for a single datapoint; ``mean_samples``: the guide draws behind a mean that was not exact), each
    layer's KL ``kl_per_site`` and the ``collapse`` lines of :func:`ppl_vae.reports.collapse.warnings_for`
    (``likelihood`` and ``kl_warmup``: the program's and its run's, for their remedies)."""

    def est(name, i=None):
        value, se = (
            (res[name], res[name + "_stderr"]) if i is None else (res[name][i], res[name + "_stderr"][i])
        )
        return estimators.Estimate(torch.from_numpy(np.asarray(value)), torch.from_numpy(np.asarray(se)))

    if bits is None:
        bits = BitsScale("discrete data") if discrete else NO_BITS
    scale = bits if isinstance(bits, BitsScale) else None
    s = {
        "n": len(res["log_px"]),
        "num_samples": num_samples,
        "dim": dim,
        "units": "nats per datapoint" + (f" (bits_per_dim = {scale.formula})" if scale else ""),
    }
    for name in ("elbo_analytic", "elbo_mc", "log_px"):
        e = est(name)
        s[name], s[name + "_stderr"] = e.mean(), e.mean_stderr()
        s[name + "_stderr_across_datapoints"] = e.across_datapoints_stderr()
    if res.get("elbo_analytic_na"):  # a latent site without closed-form KL: the analytic ELBO is n/a
        s["elbo_analytic_na"] = res["elbo_analytic_na"]
    s["gap_elbo"] = "elbo_analytic" if math.isfinite(s["elbo_analytic"]) else "elbo_mc"
    s["gap"] = s["log_px"] - s[s["gap_elbo"]]
    s["gap_stderr"] = math.hypot(s["log_px_stderr"], s[s["gap_elbo"] + "_stderr"])
    if scale:
        s["bits_per_dim"] = scale.bits(s["log_px"], dim)
        s["elbo_bits_per_dim"] = scale.bits(s[s["gap_elbo"]], dim)
        s["gap_bits_per_dim"] = -bits_per_dim(s["gap"], dim)  # a difference: no shift
        s["bits_per_dim_label"], s["bits_per_dim_of"] = scale.label, scale.data
        s["bits_per_dim_bound"], s["bits_per_dim_shift"] = scale.bound, dim * scale.shift
    else:
        s["bits_per_dim_omitted"] = bits
    s["iwae_by_k"] = {str(k): est("iwae_by_k", i).mean() for i, k in enumerate(ks)}
    s["iwae_by_k_stderr"] = {str(k): est("iwae_by_k", i).mean_stderr() for i, k in enumerate(ks)}
    # NaN: K too small to fit a tail; −inf: tied weights (n/a, exact); inf: no fit, counts as above
    khat = res["khat"][~np.isnan(res["khat"])]
    finite = khat[np.isfinite(khat)]
    s["khat_threshold"] = psis.khat_threshold(num_samples)
    s["khat_n"], s["khat_n_tied"] = len(khat), int(np.isneginf(khat).sum())
    s["khat_n_above_threshold"] = int((khat > s["khat_threshold"]).sum())
    frac = {
        key: float(np.mean(khat > t)) if len(khat) else None
        for key, t in (
            ("khat_frac_above_threshold", s["khat_threshold"]),
            ("khat_frac_above_0_7", 0.7),
            ("khat_frac_above_0_5", 0.5),
        )
    }
    s.update(frac, khat_mean=float(np.mean(finite)) if len(finite) else None)
    above = frac["khat_frac_above_threshold"]
    s["log_px_reliable"] = None if above is None else above <= UNRELIABLE_FRACTION
    s["ess_median"] = float(np.median(res["ess"]))
    means = {}
    for name in (k[len(MEAN) :] for k in res if k.startswith(MEAN)):
        mc_var = torch.from_numpy(res[MC_VAR + name].T)  # (M, d)
        exact = bool((mc_var == 0).all())  # else every block averaged mean_samples draws
        means[name] = latents.PosteriorMean(
            torch.from_numpy(res[MEAN + name].T), mc_var, exact, 1 if exact else mean_samples
        )
    s["active_units_skipped"] = mean_samples == 0
    s["active_units"] = latents.active_units(means) if s["n"] > 1 and mean_samples else None
    s["kl_per_site"] = {
        k[len(KL) :]: float(np.mean(v)) for k, v in res.items() if k.startswith(KL) and len(v)
    }
    s["collapse"] = (
        collapse.warnings_for(s["kl_per_site"], s["active_units"], likelihood, kl_warmup)
        if s["n"] > 1
        else []
    )
    return s


def json_safe(obj):
    """NaN/inf (e.g. the standard error of a single draw) → ``null``: strict JSON."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def verdict(s: dict) -> str:
    """What log p(x) is worth, from the k̂ fraction above ``khat_threshold(K)``."""
    if s["log_px_reliable"] is None:
        return f"reliability unknown: k̂ needs K >= {psis.PSIS_MIN_SAMPLES}"
    n, above, t = s["khat_n"], s["khat_n_above_threshold"], s["khat_threshold"]
    if s["log_px_reliable"]:
        return f"k̂ <= {t:.2f} on {n - above:,} of {n:,} datapoints"
    return f"lower bound; SE unreliable: k̂ > {t:.2f} on {above:,} of {n:,} datapoints"


def headline(s: dict) -> tuple[str, str] | None:
    """Which estimate of log p(x) to quote, ``"ais"`` or ``"iwae"``, and why (``None`` without AIS).
    Both are stochastic lower bounds, so the higher is the tighter when they differ by more than
    2 standard errors; when they agree, the one whose diagnostics hold."""
    if s.get("ais") is None:
        return None
    d, se = s["ais"] - s["log_px"], math.hypot(s["ais_stderr"], s["log_px_stderr"])
    iwae = f"IWAE_{s['num_samples']}"
    if d > 2 * se:
        why = f"AIS is {d:.3f} nats above {iwae}; both are lower bounds in expectation, so the higher is the tighter"
        pick = "ais"
    elif d < -2 * se:
        why = f"AIS is {-d:.3f} nats below {iwae}: too few steps for this model (raise --ais)"
        pick = "iwae"
    else:
        pick = "iwae" if s["log_px_reliable"] else "ais"
        trust = {True: "its k̂ says its SE holds", False: "its k̂ says its SE does not hold"}.get(
            s["log_px_reliable"], f"its k̂ is not computed (K < {psis.PSIS_MIN_SAMPLES})"
        )
        why = f"AIS and {iwae} agree within 2 SE ({d:+.3f} nats), and {trust}"
    if pick == "ais" and s.get("ais_untrusted_frac", 0) > UNRELIABLE_FRACTION:
        why += f"; AIS's SE is unreliable on {100 * s['ais_untrusted_frac']:.0f} % of datapoints (chains' ESS < C/2)"
    if s.get("bdmc_n"):
        why += (
            f"; on {s['bdmc_n']} simulated datapoints AIS's bracket is {max(s['bdmc_gap'], 0):.3f} nats wide"
        )
    return pick, why


def bracket(s: dict) -> str:
    """BDMC's bracket, lower ≤ log p(x) ≤ upper (means). Both ends are stochastic, so when AIS's
    error is below their Monte Carlo error the means can cross; that reads as a width of zero
    within the error, not as a negative width."""
    lo, up, gap = s["bdmc_lower"], s["bdmc_upper"], s["bdmc_gap"]
    se = math.hypot(s.get("bdmc_lower_stderr") or 0.0, s.get("bdmc_upper_stderr") or 0.0)
    if gap >= 0:
        return f"{lo:.3f} ≤ log p(x) ≤ {up:.3f} (means), mean width {gap:.3f} nats"
    if -gap <= 2 * se:
        return (
            f"lower {lo:.3f}, upper {up:.3f} (means): they cross by {-gap:.3f} nats, within their Monte Carlo "
            f"error (SE {se:.3f}): the width is 0 to that precision"
        )
    return (
        f"lower {lo:.3f}, upper {up:.3f} (means): they cross by {-gap:.3f} nats, beyond their Monte Carlo error "
        f"(SE {se:.3f}): not a valid bracket; check the program and the simulated data"
    )


def format_table(s: dict, header: str | None = None) -> str:
    """The report as the table ``evaluate`` prints (a bits/dim column where there are bits/dim, and
    a line saying what they are: of which data, through which bound)."""
    bits, w = "bits_per_dim" in s, 40 if "ais" in s else 28  # first column: wider for the AIS row

    shift = s.get("bits_per_dim_shift", 0.0)  # −D log 256 nats under dequantization

    def row(label, value, se, gap=False):
        if value is None or not math.isfinite(value):
            return f"{label:<{w}}{'n/a':>12}  (no closed-form KL)"
        b = -bits_per_dim(value, s["dim"]) if gap else bits_per_dim(value + shift, s["dim"])
        return f"{label:<{w}}{value:>12.3f}{se:>10.3f}" + (f"{b:>12.4f}" if bits else "")

    header = header or f"n = {s['n']}, K = {s['num_samples']}, D = {s['dim']}; nats per datapoint"
    lines = [
        header,
        f"{'':<{w}}{'nats':>12}{'± MC SE':>10}" + (f"{'bits/dim':>12}" if bits else ""),
        row("ELBO (analytic KL)", s["elbo_analytic"], s["elbo_analytic_stderr"]),
        row("ELBO (Monte Carlo)", s["elbo_mc"], s["elbo_mc_stderr"]),
    ]
    for k, v in s["iwae_by_k"].items():
        if k not in ("1", str(s["num_samples"])):  # IWAE_1 is the Monte Carlo ELBO, IWAE_K log p(x)
            lines.append(row(f"IWAE k={k}", v, s["iwae_by_k_stderr"][k]))
    lines.append(
        row(f"log p(x) (IWAE K={s['num_samples']})", s["log_px"], s["log_px_stderr"]) + "  " + verdict(s)
    )
    if "ais" in s:
        accept = "n/a (T = 1)" if s["ais_accept"] is None else f"{s['ais_accept']:.2f}"
        label = f"log p(x) (AIS, {s['ais_steps']} steps × {s['ais_chains']} chains)"
        start = "; from the prior p(z)" if s.get("ais_init") == "prior" else ""  # else from the guide
        lines.append(row(label, s["ais"], s["ais_stderr"]) + f"  acceptance {accept}{start}")
        if "ais_minus_iwae" in s:
            lines.append(
                f"AIS − IWAE K={s['num_samples']}, paired per datapoint: {s['ais_minus_iwae']:+.3f} nats "
                f"(MC SE {s['ais_minus_iwae_stderr']:.3f}; across datapoints "
                f"{s['ais_minus_iwae_stderr_across_datapoints']:.3f}, the SE for the whole split)"
            )
    if s.get("bdmc_n"):
        lines.append(f"BDMC on {s['bdmc_n']} datapoints simulated from the model: " + bracket(s))
    if headline(s):
        pick, why = headline(s)
        lines.append(
            f"headline: {'AIS' if pick == 'ais' else 'IWAE'} ({s['ais' if pick == 'ais' else 'log_px']:.3f}): {why}"
        )
    lines.append(row("gap log p(x) − ELBO", s["gap"], s["gap_stderr"], gap=True))
    if s["khat_frac_above_threshold"] is None:
        lines.append(
            f"Pareto k̂: not computed (needs K >= {psis.PSIS_MIN_SAMPLES}); median ESS {s['ess_median']:.1f} of K"
        )
    else:
        mean = "n/a" if s["khat_mean"] is None else f"{s['khat_mean']:.3f}"
        tied = s["khat_n_tied"]
        if tied:
            mean += f" (n/a on {tied:,} datapoints with tied weights: their estimates are exact)"
        lines.append(
            f"Pareto k̂: mean {mean}; above {s['khat_threshold']:.2f}, the threshold for K = {s['num_samples']}, "
            f"on {s['khat_n_above_threshold']:,} of {s['khat_n']:,} datapoints; "
            f"median PSIS ESS {s['ess_median']:.1f} of K"
        )
    if bits:  # which data, which bound: binarized and 8-bit images are different data
        lines.append(
            f"{s.get('bits_per_dim_label', 'bits/dim')}: {s['bits_per_dim']:.4f} (log p(x), IWAE "
            f"K={s['num_samples']}; the column: {s.get('bits_per_dim_bound', '-nats / (D ln 2)')})"
        )
    else:
        lines.append(f"bits/dim: {s['bits_per_dim_omitted']}")
    if s.get("active_units_skipped"):
        units = "skipped (mean_samples=0: no posterior means were drawn)"
    elif s["active_units"] is None:
        units = "n/a (needs 2 datapoints)"
    else:
        units = latents.describe(s["active_units"])
    lines.append(f"active units (Cov_x E_q[z_u|x] > {latents.ACTIVE_THRESHOLD:g}): {units}")
    if s.get("kl_per_site"):
        lines.append(
            "KL(q ‖ p) per layer: "
            + ", ".join(f"{k} {v:.2f}" for k, v in s["kl_per_site"].items())
            + " nats per datapoint"
        )
    lines.extend(f"warning: {line}" for line in s.get("collapse", []))
    lines.append(
        f"across-datapoint SE of log p(x): {s['log_px_stderr_across_datapoints']:.3f} nats "
        f"(the datapoints' own spread; the ± column is Monte Carlo error only)"
    )
    return "\n".join(lines)


class Report(dict):
    """What :func:`ppl_vae.reports.evaluation.evaluate` returns: the summary dict (the CLI's ``--json``; keys
    as :func:`summarize`, plus ``ks``, ``seed``, ``batch_size``, ``chunk_size``, ``discrete``,
    ``seconds``), with ``per_datapoint`` (the arrays of :func:`~ppl_vae.reports.evaluation.evaluate_blocks`),
    :meth:`table` and :meth:`to_json` (strict JSON: NaN and inf become ``null``)."""

    def __init__(self, summary: dict, per_datapoint: dict):
        super().__init__(summary)
        self.per_datapoint = per_datapoint

    def table(self, header: str | None = None) -> str:
        return format_table(self, header)

    def to_json(self) -> str:
        return json.dumps(json_safe(dict(self)), indent=2, allow_nan=False) + "\n"
