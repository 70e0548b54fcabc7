"""Seed repeats: a series' ``seeds`` runs chosen cells again with other data-order seeds (run ids
``.../seed=r``, ``data.seed`` + r - 1); each repeat follows the series' own protocol (a WSD cell:
its own trunk and cooldown; a cosine cell: one run); ``collect`` writes ``group`` and ``seed``."""
import csv
import json
import re

import pytest

from megareuse.config import ConfigError, load_config
from megareuse.engine.metrics import read_metrics
from megareuse.engine.trainer import Trainer
from megareuse.records import collect, group_of, repeat_run_id
from megareuse.sweep import local
from megareuse.sweep.grid import format_plan, load_experiment, plan_experiment
from megareuse.sweep.slurm import array_jobs, dependency, write_slurm

from test_sweep import TINY
from test_sweep_stage2_wsd import write_experiment
from test_train import CONFIG, quiet

STEP = 128
GRID = """
    base: {domains: {prose: 1}, D1: [1280, 2560]%s}
    stage2:
      - {name: cpt, method: cpt, domains: {code: 1}, D2: [640, 1280, 2560]%s}
      - {name: stack, method: stack, domains: {prose: 1}, D1: [1280], D2: [640, 1280], growth: {depth: 2},
         schedule: cosine%s}
    scratch:
      - {name: scratch_code, domains: {code: 1}, D: [640, 1280]%s}
    """
SEEDS = (", seeds: {count: 2, D1: [2560]}", ", seeds: {count: 3, D1: [2560], D2: [1280, 2560]}", ", seeds: 2",
         ", seeds: {count: 2, D: [1280]}")


def plans(tmp_path, prepared):
    plain = plan_experiment(load_experiment(write_experiment(tmp_path, prepared, GRID % (("",) * 4), "plain.yaml")))
    path = write_experiment(tmp_path, prepared, GRID % SEEDS, "seeds.yaml")
    return plain, plan_experiment(load_experiment(path)), path


def test_repeats_are_planned_on_the_chosen_cells_only(tmp_path, prepared):
    plain, runs, _ = plans(tmp_path, prepared)
    by_id = {r.run_id: r for r in runs}
    originals = [r for r in runs if "/seed=" not in r.run_id]
    assert originals == plain  # the series' own runs are planned as before
    repeats = {r.run_id: r for r in runs if "/seed=" in r.run_id}
    assert sorted(repeats) == sorted([
        "base/trunk/seed=2", "base/D=2560/seed=2",
        *(f"cpt/D1=2560/{x}/seed={r}" for r in (2, 3) for x in ("trunk", "D=1280", "D=2560")),
        *(f"stack/D1=1280/D={d}/seed=2" for d in (640, 1280)),
        "scratch_code/trunk/seed=2", "scratch_code/D=1280/seed=2"])
    for run_id, rep in repeats.items():
        r = int(run_id.rsplit("=", 1)[1])
        assert f"data.seed={1234 + r - 1}" in rep.overrides  # tiny_base.yaml's data.seed is 1234
        if "trunk" in run_id:
            continue
        original = by_id[group_of(run_id)]
        assert rep.data_point and original.data_point and rep.series == original.series
        # the same run but for its seed and its own trunk: same budget, schedule, starting point
        same = [o for o in original.overrides if not o.startswith("data.seed=")]
        assert [o for o in rep.overrides if not o.startswith("data.seed=")] == same
        if rep.resume_from:  # a WSD cooldown: from its own trunk, at the original's branch step
            assert rep.resume_from == original.resume_from.replace("/trunk/", f"/trunk/seed={r}/")
            assert rep.depends_on == [repeat_run_id(original.depends_on[0], r)]
        else:  # a cosine run: independent, after the same grown checkpoint
            assert rep.depends_on == original.depends_on == ["stack/D1=1280/grown"]
    # a repeated WSD cell's trunk runs to the last chosen branch point only, from the same start
    trunk, rep_trunk = by_id["cpt/D1=2560/trunk"], by_id["cpt/D1=2560/trunk/seed=2"]
    assert rep_trunk.depends_on == trunk.depends_on == ["base/D=2560"]
    assert "run.save_tokens=[1024, 2048]" in rep_trunk.overrides and rep_trunk.tokens == 2048
    assert by_id["scratch_code/trunk/seed=2"].tokens == 1024  # 10 steps decay from step 8
    # cost of the repeats: each chosen cell once more per repeat (trunk to its branch point +
    # cooldown = its budget), with WSD cells of one D1 sharing their repeat's trunk
    extra = sum(r.tokens for r in repeats.values())
    assert extra == 2560 + 2 * (2048 + 256 + 512) + (640 + 1280) + 1280
    assert sum(r.tokens for r in runs) - sum(r.tokens for r in plain) == extra


@pytest.mark.parametrize("spec, message", [
    ("seeds: 1", "stage2[0].seeds.count = 1: accepted an integer >= 2"),
    ("seeds: {count: 3, D2: [999]}", "stage2[0].seeds.D2 = [999]: accepted values of the series' D2 [640, 1280]"),
    ("seeds: {count: 3, D1: [640]}", "stage2[0].seeds.D1 = [640]: accepted values of the D1 this series starts "
                                     "from [1280, 2560]"),
    ("seeds: {count: 2, D: [640]}", "stage2[0].seeds.D = [640]: accepted one of the keys count, D2, D1"),
    ("seeds: {D2: [640]}", "stage2[0].seeds.count = None: accepted an integer >= 2"),
    ("seeds: {count: 2, D2: []}", "stage2[0].seeds.D2 = []: accepted a non-empty list of distinct token counts"),
    ("seeds: [2]", "stage2[0].seeds = [2]: accepted a count K >= 2"),
    ("seeds: true", "stage2[0].seeds = True: accepted a count K >= 2"),
])
def test_bad_seeds_are_one_line_errors(tmp_path, prepared, spec, message):
    path = write_experiment(tmp_path, prepared, f"""
        base: {{domains: {{prose: 1}}, D1: [1280, 2560]}}
        stage2:
          - {{name: cpt, method: cpt, domains: {{code: 1}}, D2: [640, 1280], {spec}}}
        """)
    with pytest.raises(ConfigError) as err:
        load_experiment(path)
    text = str(err.value)
    assert "\n" not in text and message in text, text


def test_bad_seeds_on_base_scratch_and_checkpoint_bases(tmp_path, prepared):
    for body, message in [
        ("base: {domains: {prose: 1}, D1: [1280], seeds: {count: 2, D1: [640]}}",
         "base.seeds.D1 = [640]: accepted values of the series' D1 [1280]"),
        ("base: {domains: {prose: 1}, D1: [1280]}\n"
         "scratch: [{domains: {code: 1}, D: [640], seeds: {count: 2, D2: [640]}}]",
         "scratch[0].seeds.D2 = [640]: accepted one of the keys count, D"),
        (f"base: {{checkpoints: [{{path: {tmp_path}, D1: 640}}], seeds: 2}}",
         "base.seeds = 2: accepted no seeds on a checkpoint base")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_experiment(write_experiment(tmp_path, prepared, body))


def test_dry_run_and_slurm_list_the_repeats(tmp_path, prepared, capsys):
    from megareuse.cli import main
    _, runs, path = plans(tmp_path, prepared)
    assert main(["sweep", "--config", str(path), "--out", str(tmp_path / "root"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out == format_plan(runs) + "\n"
    assert re.search(r"^cpt/D1=2560/D=2560/seed=3 +train +512 .* cpt/D1=2560/trunk/seed=3$", out, re.M)
    assert out.rstrip().endswith(f"({sum(r.data_point for r in runs)} data points, 8 of them seed repeats)")
    script_dir = tmp_path / "slurm"
    write_slurm(runs, path, tmp_path / "root", script_dir, nodes=1, gpus_per_node=1)
    listed = [line.split("\t")[0] for p in script_dir.glob("wave*.runs") for line in p.read_text().splitlines()]
    assert sorted(listed) == sorted(r.run_id for r in runs)
    jobs = array_jobs(runs)
    where = {r.run_id: (j, i) for j in jobs for i, r in enumerate(j.runs)}
    for run_id, needs in [("cpt/D1=2560/D=1280/seed=2", "cpt/D1=2560/trunk/seed=2"),
                          ("cpt/D1=2560/trunk/seed=3", "base/D=2560"),
                          ("stack/D1=1280/D=640/seed=2", "stack/D1=1280/grown")]:
        job, parent = where[run_id][0], where[needs]
        assert job.wave > parent[0].wave
        assert f"${{{parent[0].var}}}_{parent[1]}" in dependency(job, where).removeprefix("afterok:").split(":")
    submit = (script_dir / "submit.sh").read_text()
    assert f"{len(runs)} runs in {len(jobs)} job arrays" in submit


def test_repeats_train_with_their_seed_and_collect_groups(tmp_path, prepared):
    """A WSD scratch cell of 5 steps and its repeat, each a trunk + cooldown: the repeat equals an
    independent WSD run with data.seed 1235, differs from the original, and shares its group."""
    exp = load_experiment(write_experiment(tmp_path, prepared, """
        base: {domains: {prose: 1}, D1: [640]}
        scratch:
          - {name: scratch_code, domains: {code: 1}, D: [640], seeds: 2}
        """))
    runs = [r for r in plan_experiment(exp) if r.series == "scratch_code"]
    assert [r.run_id for r in runs] == ["scratch_code/trunk", "scratch_code/D=640",
                                        "scratch_code/trunk/seed=2", "scratch_code/D=640/seed=2"]
    root = tmp_path / "sweep"
    local.run_sweep(exp.train, runs, root, emit=quiet)
    out = tmp_path / "alone"
    Trainer(load_config(CONFIG, TINY + [f"data.dir={prepared}", f"run.out_dir={out}", "data.train={code: 1}",
                                        "schedule.kind=wsd", "run.train_tokens=640", "data.seed=1235"]),
            emit=quiet).run()

    def losses(d):
        return [r["loss"] for r in read_metrics(d) if r["kind"] == "train"]
    original, repeat = root / "scratch_code" / "D=640", root / "scratch_code" / "D=640" / "seed=2"
    assert losses(repeat) == pytest.approx(losses(out)[4:], rel=1e-6, abs=0)  # the cooldown step
    assert losses(repeat) != losses(original)  # another data order
    rec = {d: json.loads((d / "record.json").read_text()) for d in (original, repeat, out)}
    assert rec[repeat]["valid_loss"] == pytest.approx(rec[out]["valid_loss"], rel=1e-6, abs=0)
    assert (rec[original]["seed"], rec[repeat]["seed"]) == (1234, 1235)

    csv_path, _, n = collect(root)
    rows = {r["run_id"]: r for r in csv.DictReader(csv_path.open())}
    assert n == 2 and set(rows) == {"scratch_code/D=640", "scratch_code/D=640/seed=2"}
    assert {r["group"] for r in rows.values()} == {"scratch_code/D=640"}
    assert (rows["scratch_code/D=640"]["seed"], rows["scratch_code/D=640/seed=2"]["seed"]) == ("1234", "1235")
    assert list(rows["scratch_code/D=640"])[:3] == ["run_id", "group", "seed"]
    from megareuse.law.data import load_table
    table = load_table(csv_path, loss_col="valid_loss_code")
    assert list(table.group) == ["scratch_code/D=640"] * 2


def test_group_of_strips_only_a_trailing_repeat():
    assert group_of("cpt/D1=5/D=7/seed=3") == "cpt/D1=5/D=7"
    assert group_of("cpt/D1=5/D=7") == "cpt/D1=5/D=7"
    assert group_of("x/seed=2/D=7") == "x/seed=2/D=7" and group_of("cpt/D=7/seed=0") == "cpt/D=7/seed=0"
    assert repeat_run_id("cpt/D=7", 2) == "cpt/D=7/seed=2"
    with pytest.raises(ValueError, match="repeat = 1: accepted an integer >= 2"):
        repeat_run_id("cpt/D=7", 1)
