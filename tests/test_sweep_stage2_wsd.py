"""Stage-2 WSD branches: a stage-2 series (cpt, growth) costs one constant-LR trunk per (series, D1)
from the base (or grown) checkpoint plus a cooldown branch per D2, and each branch is the same
computation as an independent WSD stage-2 run of its budget."""
import json
import textwrap

import pytest

from megareuse.config import load_config
from megareuse.engine.metrics import read_metrics
from megareuse.engine.trainer import Trainer
from megareuse.sweep import local
from megareuse.sweep.grid import load_experiment, plan_experiment

from test_sweep import TINY
from test_train import CONFIG, quiet

STEP = 128  # tokens per step of TINY (4 x 32)
D2_STEPS = [10, 20, 40, 80, 160, 320]  # a 32x D2 axis


def write_experiment(tmp_path, prepared, body: str, name: str = "exp.yaml"):
    path = tmp_path / name
    overrides = "\n".join(f"  - {o}" for o in TINY + [f"data.dir={prepared}"])
    path.write_text(f"name: s2\ntrain_config: {CONFIG}\noverrides:\n{overrides}\n" + textwrap.dedent(body))
    return path


def wide_d2(tmp_path, prepared, schedule: str = ""):
    d2 = [n * STEP for n in D2_STEPS]
    extra = f", schedule: {schedule}" if schedule else ""
    return load_experiment(write_experiment(tmp_path, prepared, f"""
        base: {{domains: {{prose: 1}}, D1: [2560]}}
        stage2:
          - {{name: cpt, method: cpt, domains: {{code: 1}}, D2: {d2}{extra}}}
          - {{name: stack, method: stack, domains: {{prose: 1}}, D2: {d2}, growth: {{depth: 2}}{extra}}}
        """, f"exp{schedule}.yaml"))


def series_tokens(runs, series):
    return sum(r.tokens for r in runs if r.series == series)


def test_stage2_wsd_costs_the_longest_run_plus_cooldowns(tmp_path, prepared):
    runs = plan_experiment(wide_d2(tmp_path, prepared))
    by_id = {r.run_id: r for r in runs}
    # WSD with decay_frac 0.2: a budget of n steps decays over its last 0.2 n steps (n = 10 .. 320
    # are multiples of 5, so 0.2 n is exact); the trunk runs at constant LR to the longest budget's
    # decay start, 0.8 x 320 steps, and each branch adds its 0.2 n steps of cooldown
    trunk, cooldowns = 0.8 * max(D2_STEPS), 0.2 * sum(D2_STEPS)
    for series in ("cpt", "stack"):
        assert series_tokens(runs, series) == (trunk + cooldowns) * STEP
        t = by_id[f"{series}/D1=2560/trunk"]
        assert "schedule.kind=constant" in t.overrides and t.tokens == trunk * STEP
        assert f"run.save_tokens=[{', '.join(str(int(0.8 * n) * STEP) for n in D2_STEPS)}]" in t.overrides
        for n in D2_STEPS:
            b = by_id[f"{series}/D1=2560/D={n * STEP}"]
            assert b.resume_from == f"{series}/D1=2560/trunk/checkpoints/step_{int(0.8 * n):08d}"
            assert b.depends_on == [t.run_id] and b.data_point and b.tokens == 0.2 * n * STEP
            assert "schedule.kind=wsd" in b.overrides and f"run.train_tokens={n * STEP}" in b.overrides
    # the trunks start from the base's final checkpoint (cpt) and from the grown one (stack)
    assert "run.init_from={root}/base/D=2560/checkpoints/step_00000020" in by_id["cpt/D1=2560/trunk"].overrides
    assert by_id["cpt/D1=2560/trunk"].depends_on == ["base/D=2560"]
    assert "run.init_from={root}/stack/D1=2560/grown" in by_id["stack/D1=2560/trunk"].overrides
    assert by_id["stack/D1=2560/trunk"].depends_on == ["stack/D1=2560/grown"]
    # against one cosine run per D2: 630 steps; WSD: 382, 1.19x the longest run (320)
    cosine = plan_experiment(wide_d2(tmp_path, prepared, "cosine"))
    assert series_tokens(cosine, "cpt") == sum(D2_STEPS) * STEP
    assert series_tokens(runs, "cpt") / (max(D2_STEPS) * STEP) == pytest.approx(382 / 320)
    assert [r.run_id for r in cosine if r.series == "cpt"] == [f"cpt/D1=2560/D={n * STEP}" for n in D2_STEPS]


def test_stage2_branches_equal_independent_wsd_stage2_runs(tmp_path, prepared):
    """A cpt branch and a growth branch against a stage-2 run of the same budget trained alone
    from the same starting checkpoint (WSD, re-warmup, the same data order)."""
    exp = load_experiment(write_experiment(tmp_path, prepared, """
        base: {domains: {prose: 1}, D1: [1280]}
        stage2:
          - {name: cpt, method: cpt, domains: {code: 1}, D2: [640, 1280]}
          - {name: stack, method: stack, domains: {prose: 1}, D2: [640, 1280], growth: {depth: 2}}
        """))
    runs = plan_experiment(exp)
    assert [r.run_id for r in runs if r.series != "base"] == [
        "cpt/D1=1280/trunk", "cpt/D1=1280/D=640", "cpt/D1=1280/D=1280", "stack/D1=1280/grown",
        "stack/D1=1280/trunk", "stack/D1=1280/D=640", "stack/D1=1280/D=1280"]
    root = tmp_path / "sweep"
    local.run_sweep(exp.train, runs, root, emit=quiet)

    def alone(name, start, tokens, *extra):
        out = tmp_path / name
        cfg = load_config(CONFIG, TINY + [f"data.dir={prepared}", f"run.out_dir={out}", f"run.init_from={start}",
                                          "schedule.kind=wsd", f"run.train_tokens={tokens}", *extra])
        Trainer(cfg, emit=quiet).run()
        return out

    def losses(out):
        return [r["loss"] for r in read_metrics(out) if r["kind"] == "train"]

    base_ckpt = root / "base" / "D=1280" / "checkpoints" / "step_00000010"
    for series, stage, start, extra in [("cpt", "cpt", base_ckpt, ["data.train={code: 1}"]),
                                        ("stack", "grow", root / "stack" / "D1=1280" / "grown", ["model.n_layers=4"])]:
        for tokens, point in [(1280, 8), (640, 4)]:  # 10 steps decay from step 8, 5 from step 4
            ref = alone(f"{series}_{tokens}", start, tokens, *extra)
            branch = root / series / "D1=1280" / f"D={tokens}"
            whole = losses(ref)
            assert len(whole) == tokens // STEP
            assert losses(branch) == pytest.approx(whole[point:], rel=1e-6, abs=0), (series, tokens)
            mine, theirs = (json.loads((d / "record.json").read_text()) for d in (branch, ref))
            assert mine["valid_loss"] == pytest.approx(theirs["valid_loss"], rel=1e-6, abs=0)
            assert (mine["D1"], mine["D2"], mine["stage"], mine["tokens"]) == (1280, tokens, stage, tokens)
            assert mine["tokens_per_domain"] == theirs["tokens_per_domain"]  # the same samples
