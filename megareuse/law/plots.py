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
                    label=f"{int(100 * check['level'])}% prediction interval"
                    + (" (calibrated)" if check.get("interval") == "calibrated" else ""))
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


def threshold_points(plan: dict) -> dict[str, dict[str, np.ndarray]]:
    """Per view, the plan's D1 thresholds as plottable arrays over D2: ``D1`` (nan where there is
    no finite threshold), the interval ``lo``/``hi`` clipped to the search range (beyond it: the
    top; no D1 saves: the bottom) and ``status``."""
    out: dict[str, dict[str, list]] = {}
    for t in plan["thresholds"]:
        bottom, top = t["range"]
        thr = t["threshold"]
        lo, hi = t.get("interval") or (np.nan, np.nan)
        v = out.setdefault(t["view"], {"D2": [], "D1": [], "lo": [], "hi": [], "status": []})
        v["D2"].append(t["D2"])
        v["D1"].append(thr if thr is not None and np.isfinite(thr) else np.nan)
        v["lo"].append(float(np.clip(lo, bottom, top)))
        v["hi"].append(float(np.clip(hi, bottom, top)))
        v["status"].append(t["status"])
    return {view: {k: np.array(a) for k, a in v.items()} for view, v in out.items()}


def _threshold_panel(ax, plan: dict, d1_range=None) -> None:
    """The D1 beyond which reuse stops saving, per D2 and view, with its bootstrap interval;
    triangles mark a saving that lasts past the search range (up) or never starts (down)."""
    bottom, top = plan["thresholds"][0]["range"]
    for i, (view, p) in enumerate(threshold_points(plan).items()):
        color = f"C{i}"
        x = p["D2"] * (1.04 ** i)  # views side by side at each D2
        ok = np.isfinite(p["D1"])
        ax.plot(x[ok], p["D1"][ok], "o-", color=color, label=view)
        has = np.isfinite(p["lo"]) & np.isfinite(p["hi"])
        ax.vlines(x[has], p["lo"][has], p["hi"][has], color=color, alpha=0.6)
        for status, y, marker in (("saves_at_top", top, "^"), ("never_saves", bottom, "v")):
            at = p["status"] == status
            if at.any():
                ax.plot(x[at], np.full(at.sum(), y), marker, color=color, ls="none")
    if d1_range:
        ax.axhspan(*d1_range, color="0.9", zorder=0, label="fitted D1 range")
    ax.set(xscale="log", yscale="log", xlabel="D2 (tokens)", ylabel="D1 beyond which reuse stops saving",
           ylim=(bottom / 1.5, top * 1.5))
    _log_ticks(ax.xaxis, [t["D2"] for t in plan["thresholds"]])
    ax.set_title("threshold (bars: bootstrap interval; ^ saves past the range, v never saves)", fontsize=8)
    ax.legend(fontsize=7)


def figure_plan(plan: dict, law, scratch=None) -> tuple[dict[str, bytes], Optional[str]]:
    """Left: loss vs D2 per D1 (and the scratch law vs D); right: token saving vs D2."""
    plt = _pyplot()
    if plt is None:
        return {}, NO_MPL
    d1s = sorted({r["D1"] for r in plan["rows"]})
    d2 = np.array(sorted({r["D2"] for r in plan["rows"]}))
    grid = np.geomspace(d2.min(), d2.max(), 80)
    panels = 1 + (scratch is not None) + bool(plan.get("thresholds"))
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
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
    if plan.get("thresholds"):
        _threshold_panel(axes[0][-1], plan, (law.data.get("ranges") or {}).get("D1"))
    try:
        return _save(fig, "plan", ("png",)), None
    finally:
        plt.close(fig)
