"""The reuse law: forms, fitting, bootstrap, checks against larger runs, per-D1 analysis, planner.

    from megareuse.law import load_table, fit_form, bootstrap, compare_forms, make_plan
    table = load_table("runs.csv", where={"method": "cpt"})
    law = fit_form(table, "reuse")            # Huber on log loss, L-BFGS + variable projection
    bootstrap(table, law, 1000, workers=2)    # percentile intervals -> law.bootstrap
    calibrate(table, law)                     # intervals for new runs: noise and misfit -> law.calibration
    compare_forms(table, ["reuse", "reuse_no_interaction", "additive"], rule="largest")
    make_plan(law, scratch_law, D1=[1e6], D2=[5e5, 1e6], budget_tokens=8e6)

`analyse` + `write_fit` run the whole `megareuse fit` pipeline in-process; `shared_study` fits a
stage-2 series and its scratch series with one E; `simulate_grids` is `megareuse design`. See
docs/fitting.md.
Names are imported on first use, so `megareuse.law.commands.register` (called for every
`megareuse` command line) does not pay for scipy.
"""

from megareuse._lazy import lazy_exports

_WHERE = {
    "resampling": ["bootstrap"],
    "calibrate": ["calibrate", "calibrated_interval"],
    "shared": ["bootstrap_shared", "fit_shared", "profile_shared_E"],
    "sharedstudy": ["holdout_compare", "load_pair", "shared_study"],
    "design": ["prior_from_file", "prior_from_params", "simulate_grids"],
    "commands": ["analyse", "register", "write_fit", "write_outputs"],
    "data": ["LawError", "RunTable", "load_table", "merge_duplicates", "table_from_arrays"],
    "fit": ["fit_form"],
    "identify": ["profile_E"],
    "forms": ["Form", "available_forms", "get_form", "register_form"],
    "law": ["Law"],
    "perd1": ["per_d1_analysis"],
    "plan": ["best_split", "budget_saving", "d1_threshold", "make_plan", "marginal_gain", "saving", "saving_vanishes",
             "scratch_tokens", "scratch_tokens_array", "verdict"],
    "report": ["fit_report", "plan_report"],
    "validate": ["compare_forms", "expanding_window", "holdout_check", "leave_one_out"],
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, globals(), _WHERE)
