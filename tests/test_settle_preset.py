"""The settling study's preset (configs/experiments/settle.yaml, issue #29 item 5) as planned,
without training: the grid the design chose, its seeds, its shared-E partner and its cost against
the measured sweep rate of the over-trained preset (the same model and batch)."""
from __future__ import annotations

import pytest

from megareuse import demo
from megareuse.sweep.grid import load_experiment, plan_experiment, totals
from test_overtrained_preset import MEASURED_TOKENS_PER_S  # the settle grid trains the same model at the same batch


@pytest.fixture(scope="module")
def exp():
    return load_experiment(demo.PRESETS["settle"])


@pytest.fixture(scope="module")
def runs(exp):
    return plan_experiment(exp)


def test_grid_spans_what_the_issue_asks(exp):
    (cpt,) = exp.stage2
    assert cpt.name == "cpt_mix" and cpt.method == "cpt" and cpt.schedule == "wsd"  # cooldown branches
    assert max(cpt.budgets) / min(cpt.budgets) >= 32  # D2 over at least 32x
    assert max(exp.base.budgets) / min(exp.base.budgets) >= 32 and len(exp.base.budgets) >= 6
    assert exp.base.domains == {"mix": 1.0} and cpt.domains == {"code": 1.0}
    # the same model trained on the same domain from scratch: the shared asymptote's partner
    assert demo.scratch_for(exp, cpt).name == "scratch_code"
    assert demo.series_model(exp, cpt) == demo.series_model(exp, demo.scratch_for(exp, cpt))
    assert demo.base_scale(exp)[0]["tokens_per_param"][-1] >= 100  # over-trained at the largest D1


def test_seeds_repeat_chosen_cells_with_their_own_data_order(exp, runs):
    (cpt,) = exp.stage2
    assert cpt.seeds.count == 3
    repeats = [r for r in runs if r.data_point and "/seed=" in r.run_id]
    cells = {(r.run_id.split("/")[1], r.run_id.split("/")[2]) for r in repeats}
    assert cells == {(f"D1={d1}", f"D={d2}") for d1 in cpt.seeds.D1 for d2 in cpt.seeds.budgets}
    assert len(repeats) == 2 * len(cells)  # seeds 2 and 3 of each chosen cell
    for r in repeats:
        k = int(r.run_id.rsplit("seed=", 1)[1])
        assert any(o == f"data.seed={exp.train['data']['seed'] + k - 1}" for o in r.overrides), r.run_id


def test_cost_fits_the_45_minute_budget(runs):
    tokens, _ = totals(runs)
    points = [r for r in runs if r.data_point]
    assert (len(runs), len(points), tokens) == (68, 56, 45_611_008)  # the numbers in docs/reproducing.md
    assert tokens / MEASURED_TOKENS_PER_S / 60 < 35  # room inside 45 minutes for prepare, fits, plans
