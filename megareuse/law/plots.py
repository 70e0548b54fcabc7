"""Figures: the per-D1 analysis (three panels), predicted vs observed on held-out runs, the plan.

matplotlib is optional (the `plot` extra) and imported only here, lazily, with the Agg
backend. Each function returns {file name: bytes} so callers can write files atomically, or
an empty dict and a note when matplotlib is missing.
"""
from __future__ import annotations

import io
from typing import Optional

import numpy as np

NO_MPL = "figures skipped: matplotlib is not installed (pip install 'megareuse[plot]')"


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(fig, stem: str, formats=("png", "svg")) -> dict[str, bytes]:
    out = {}
    for fmt in formats:
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=130, bbox_inches="tight", metadata={"Date": None} if fmt == "svg" else None)
        out[f"{stem}.{fmt}"] = buf.getvalue()
    return out


def _log_ticks(axis, values, n_max: int = 7) -> None:
    """Label a log axis at a few round-ish values inside the data range (no cluttered minor labels)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter
    values = np.unique(np.asarray(values, dtype=float))
    if len(values) > n_max:
        values = np.geomspace(values.min(), values.max(), n_max)
    axis.set_major_locator(FixedLocator(values))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    axis.set_minor_formatter(NullFormatter())


def figure_per_d1(analysis: dict, source: str = "") -> tuple[dict[str, bytes], Optional[str]]:
    """Left: loss vs D2 per D1 with fitted curves; middle: alpha(D1) with the log-linear fit;
    right: A(D1) with the power fit."""
    plt = _pyplot()
    if plt is None:
        return {}, NO_MPL
    u, uname = analysis["units"]["tokens"], analysis["units"]["tokens_name"]
    per = analysis["per_d1"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(per)))
    for row, color in zip(per, colors):
        d2 = np.array(row["D2"])
        axes[0].scatter(d2, row["loss"], color=color, s=18, label=f"D1 = {row['D1']:.3g}")
        grid = np.geomspace(d2.min(), d2.max(), 50)
        axes[0].plot(grid, row["A"] * (grid / u) ** (-row["alpha"]) + row["E"], color=color, lw=1)
    axes[0].set(xscale="log", yscale="log", xlabel="D2 (tokens)", ylabel="loss",
                title="loss vs D2 per D1")
    all_d2 = np.concatenate([r["D2"] for r in per])
    all_loss = np.concatenate([r["loss"] for r in per])
    _log_ticks(axes[0].xaxis, all_d2)
    _log_ticks(axes[0].yaxis, np.geomspace(all_loss.min(), all_loss.max(), 5))
    axes[0].legend(fontsize=7)
    d1 = np.array([r["D1"] for r in per])
    grid = np.geomspace(d1.min(), d1.max(), 50)
    af, sf = analysis["alpha_fit"], analysis["scale_fit"]
    axes[1].scatter(d1, [r["alpha"] for r in per], color="k", s=20)
    axes[1].plot(grid, af["a2"] - af["a3"] * np.log(grid / u), "r-",
                 label=f"a2 - a3 ln D1: a2={af['a2']:.3g}, a3={af['a3']:.3g}")
    axes[1].set(xscale="log", xlabel=f"D1 (tokens; ln D1 in {uname} units)", ylabel="alpha(D1)",
                title="exponent vs D1")
    _log_ticks(axes[1].xaxis, d1)
    axes[1].legend(fontsize=7)
    axes[2].scatter(d1, [r["A"] for r in per], color="k", s=20)
    axes[2].plot(grid, sf["A"] * (grid / u) ** (-sf["a1"]), "r-", label=f"A D1^-a1: A={sf['A']:.3g}, a1={sf['a1']:.3g}")
    axes[2].set(xscale="log", yscale="log", xlabel="D1 (tokens)", ylabel="A(D1)", title="scale factor vs D1")
    _log_ticks(axes[2].xaxis, d1)
    a_values = [r["A"] for r in per]
    _log_ticks(axes[2].yaxis, np.geomspace(min(a_values), max(a_values), 5))
    axes[2].legend(fontsize=7)
    fig.suptitle((source + "; " if source else "") + f"E {analysis['E_mode']}", fontsize=9)
    fig.tight_layout()
    try:
        return _save(fig, "figure1"), None
    finally:
        plt.close(fig)


def figure_heldout(check: dict, source: str = "") -> tuple[dict[str, bytes], Optional[str]]:
    """Predicted vs observed loss for held-out runs, with prediction intervals when present."""
    plt = _pyplot()
    if plt is None:
        return {}, NO_MPL
    rows = check["rows"]
    obs = np.array([r["observed"] for r in rows])
    pred = np.array([r["predicted"] for r in rows])
    fig, ax = plt.subplots(figsize=(5, 5))
    if "lo" in rows[0]:
        err = np.array([pred - [r["lo"] for r in rows], [r["hi"] for r in rows] - pred])
        ax.errorbar(obs, pred, yerr=np.maximum(err, 0), fmt="o", ms=4, capsize=2,
                    label=f"{int(100 * check['level'])}% prediction interval")
    else:
        ax.plot(obs, pred, "o", ms=4)
    lo, hi = min(obs.min(), pred.min()), max(obs.max(), pred.max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="predicted = observed")
    ax.set(xlabel="observed loss", ylabel="predicted loss",
           title=f"{check['form']}: held out {check['rule']} (MARE {100 * check['mare']:.2f}%)")
    ax.legend(fontsize=7)
    if source:
        fig.suptitle(source, fontsize=8)
    try:
        return _save(fig, "heldout", ("png",)), None
    finally:
        plt.close(fig)


def figure_plan(plan: dict, law, scratch=None) -> tuple[dict[str, bytes], Optional[str]]:
    """Left: loss vs D2 per D1 (and the scratch law vs D); right: token saving vs D2."""
    plt = _pyplot()
    if plt is None:
        return {}, NO_MPL
    d1s = sorted({r["D1"] for r in plan["rows"]})
    d2 = np.array(sorted({r["D2"] for r in plan["rows"]}))
    grid = np.geomspace(d2.min(), d2.max(), 80)
    fig, axes = plt.subplots(1, 2 if scratch is not None else 1, figsize=(12 if scratch is not None else 6, 4.5),
                             squeeze=False)
    ax = axes[0][0]
    for d1 in d1s:
        ax.plot(grid, law.predict(D1=d1, D2=grid), label=f"reuse, D1 = {d1:.3g}")
    if scratch is not None:
        N = plan.get("N")
        ls = scratch.predict(D=grid, N=N) if "N" in scratch.form.inputs else scratch.predict(D=grid)
        ax.plot(grid, ls, "k--", label="from scratch (D2 = all tokens)")
    ax.set(xscale="log", xlabel="D2 (tokens)", ylabel="predicted loss")
    ax.set_title(plan["law"], fontsize=9)
    _log_ticks(ax.xaxis, d2)
    ax.legend(fontsize=7)
    if scratch is not None:
        from megareuse.law.plan import scratch_tokens
        ax = axes[0][1]
        for d1 in d1s:
            sav = [scratch_tokens(scratch, float(law.predict(D1=d1, D2=g)), plan.get("N")) - g for g in grid]
            ax.plot(grid, sav, label=f"D1 = {d1:.3g}")
        ax.axhline(0, color="k", lw=0.8)
        ax.set(xscale="log", xlabel="D2 (tokens)", ylabel="token saving D_scratch - D2")
        ax.set_title(f"vs {plan['scratch_law']}", fontsize=9)
        _log_ticks(ax.xaxis, d2)
        ax.legend(fontsize=7)
    try:
        return _save(fig, "plan", ("png",)), None
    finally:
        plt.close(fig)
