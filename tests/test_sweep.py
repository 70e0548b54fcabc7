"""Sweeps: the plan matches a hand-computed grid; WSD branches equal independent runs; an
interrupted sweep resumes without re-running finished runs; the table feeds the fitter."""
import json
import re
import textwrap

import pytest

from megareuse.config import ConfigError, load_config
from megareuse.engine.metrics import read_metrics
from megareuse.engine.trainer import Trainer
from megareuse.records import collect
from megareuse.sweep import local
from megareuse.sweep.grid import load_experiment, plan_experiment, totals

from test_train import CONFIG, quiet

TINY = ["model.vocab_size=512", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1",
        "model.n_layers=2", "model.ffn_hidden=64", "model.max_seq_len=32", "data.seq_len=32",
        "run.micro_batch_size=4", "run.eval_tokens=512", "run.eval_interval=1000",
        "run.save_interval=1000", "run.log_interval=1000", "run.threads=1",
        "schedule.warmup_steps=3", "optim.lr=1e-2"]  # 128 tokens per step


def experiment(tmp_path, prepared):
    path = tmp_path / "exp.yaml"
    overrides = "\n".join(f"  - {o}" for o in TINY + [f"data.dir={prepared}"])
    path.write_text(textwrap.dedent(f"""\
        name: tiny
        train_config: {CONFIG}
        overrides:
        """) + overrides + textwrap.dedent("""
        base: {domains: {prose: 1}, D1: [2560, 5120]}
        stage2:
          - {name: cpt, method: cpt, domains: {code: 1}, D2: [1280, 2560]}
          - {name: stack, method: stack, domains: {prose: 1}, D1: [2560], D2: [1280], growth: {depth: 2}}
        scratch:
          - {name: scratch_code, domains: {code: 1}, D: [1280, 2560], schedule: cosine}
        """))
    return load_experiment(path)


def test_plan_matches_hand_computed_grid(tmp_path, prepared):
    runs = plan_experiment(experiment(tmp_path, prepared))
    ids = [r.run_id for r in runs]
    assert ids == [
        "base/trunk", "base/D=2560", "base/D=5120",
        "cpt/D1=2560/trunk", "cpt/D1=2560/D=1280", "cpt/D1=2560/D=2560",
        "cpt/D1=5120/trunk", "cpt/D1=5120/D=1280", "cpt/D1=5120/D=2560",
        "stack/D1=2560/grown", "stack/D1=2560/trunk", "stack/D1=2560/D=1280",
        "scratch_code/D=1280", "scratch_code/D=2560"]
    # WSD, decay 20%: a budget of n steps branches at n - round(0.2 n): 20 -> 16, 40 -> 32, 10 -> 8
    step = 128
    base = 32 * step + (20 - 16) * step + (40 - 32) * step
    cpt = 2 * (16 * step + (10 - 8) * step + (20 - 16) * step)
    stack = 8 * step + 2 * step
    scratch = 1280 + 2560
    assert totals(runs)[0] == base + cpt + stack + scratch
    by_id = {r.run_id: r for r in runs}
    assert by_id["base/D=2560"].resume_from == "base/trunk/checkpoints/step_00000016"
    assert "run.save_tokens=[2048, 4096]" in by_id["base/trunk"].overrides
    assert by_id["stack/D1=2560/trunk"].depends_on == ["stack/D1=2560/grown"]
    assert "model.n_layers=4" in by_id["stack/D1=2560/trunk"].overrides
    assert sum(r.data_point for r in runs) == 2 + 4 + 1 + 2


def test_bad_experiment(tmp_path, prepared):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"train_config: {CONFIG}\nbase: {{domains: {{prose: 1}}, D1: [2000, 1000]}}\n")
    with pytest.raises(ConfigError, match="base.D1 = \\[2000, 1000\\]: accepted strictly increasing"):
        load_experiment(bad)
    bad.write_text(f"train_config: {CONFIG}\nbase: {{domains: {{prose: 1}}, D1: [1000]}}\nstage3: []\n")
    with pytest.raises(ConfigError, match="stage3"):
        load_experiment(bad)


def test_parallel_sweep_reuses_workers_and_matches_sequential(tmp_path, prepared):
    """workers=2 with more runs than workers: a worker process runs several (its process group from
    the first stays up; the second once failed with DeepSpeed's missing LOCAL_RANK), and every
    run's losses equal those of the same run in a sequential sweep."""
    exp = experiment(tmp_path, prepared)
    runs = [r for r in plan_experiment(exp) if r.run_id.startswith(("base/", "scratch_code/"))]
    assert len(runs) == 5
    local.run_sweep(exp.train, runs, tmp_path / "seq", emit=quiet)
    train = {**exp.train, "run": {**exp.train["run"], "threads": 8}}  # 2 x 8 threads would oversubscribe
    ran = local.run_sweep(train, runs, tmp_path / "par", workers=2, emit=quiet)
    assert sorted(ran) == sorted(r.run_id for r in runs)
    for run in [r for r in runs if r.data_point]:  # trunks write checkpoints, not records
        seq, par = (json.loads((tmp_path / d / run.run_id / "record.json").read_text()) for d in ("seq", "par"))
        if local.worker_threads(2) == 1:  # the sequential sweep's thread count: bit for bit
            assert par["valid_loss"] == seq["valid_loss"], run.run_id
        else:  # a bigger machine: other reduction orders
            assert par["valid_loss"] == pytest.approx(seq["valid_loss"], rel=1e-5), run.run_id
    for run in runs:  # each worker ran with its share of the cores, not the config's 8 threads
        config = json.loads((tmp_path / "par" / run.run_id / "config.json").read_text())
        assert config["run"]["threads"] == local.worker_threads(2), run.run_id


def test_critical_path_is_the_heaviest_chain_below_each_run(tmp_path, prepared):
    runs = plan_experiment(experiment(tmp_path, prepared))
    index = {r.run_id: i for i, r in enumerate(runs)}
    assert all(index[d] < index[r.run_id] for r in runs for d in r.depends_on)  # what critical_path relies on
    by_id = {r.run_id: r for r in runs}

    def heaviest(run_id):  # every path down the dependants, enumerated
        below = [r.run_id for r in runs if run_id in r.depends_on]
        return by_id[run_id].flops + max((heaviest(c) for c in below), default=0.0)

    chain = local.critical_path(runs)
    assert chain == pytest.approx({r.run_id: heaviest(r.run_id) for r in runs})
    assert max(chain, key=chain.get) == "base/trunk"
    assert chain["scratch_code/D=2560"] == by_id["scratch_code/D=2560"].flops


def test_worker_threads_share_the_cores():
    assert [local.worker_threads(w, cpus=2) for w in (1, 2, 3)] == [2, 1, 1]
    assert [local.worker_threads(w, cpus=16) for w in (1, 2, 3, 4)] == [16, 8, 5, 4]


def test_sweep_runs_resumes_and_branches_equal_independent_runs(tmp_path, prepared, monkeypatch):
    exp = experiment(tmp_path, prepared)
    runs = plan_experiment(exp)
    root = tmp_path / "sweep"
    real = local.execute

    def crash_on_stack(train, r, run, emit=print):
        if run.run_id == "stack/D1=2560/trunk":
            raise RuntimeError("simulated crash")
        return real(train, r, run, emit)

    monkeypatch.setattr(local, "execute", crash_on_stack)
    with pytest.raises(RuntimeError, match="simulated crash"):
        local.run_sweep(exp.train, runs, root, emit=quiet)
    finished = {r.run_id: (root / r.run_id / "record.json").stat().st_mtime_ns
                for r in runs if (root / r.run_id / "record.json").exists()}
    assert "cpt/D1=5120/D=2560" in finished and "stack/D1=2560/D=1280" not in finished
    monkeypatch.setattr(local, "execute", real)
    ran = local.run_sweep(exp.train, runs, root, emit=quiet)
    assert ran == ["stack/D1=2560/trunk", "stack/D1=2560/D=1280", "scratch_code/D=1280",
                   "scratch_code/D=2560"]
    for run_id, mtime in finished.items():  # finished runs were not run again
        assert (root / run_id / "record.json").stat().st_mtime_ns == mtime

    # a cooldown branch of the trunk is the same computation as an independent WSD run
    cfg = load_config(CONFIG, TINY + [f"data.dir={prepared}", f"run.out_dir={tmp_path / 'alone'}",
                                      "schedule.kind=wsd", "run.train_tokens=2560"])
    Trainer(cfg, emit=quiet).run()
    alone = [r["loss"] for r in read_metrics(tmp_path / "alone") if r["kind"] == "train"]
    branch = [r["loss"] for r in read_metrics(root / "base" / "D=2560") if r["kind"] == "train"]
    assert branch == alone[16:]
    rec = json.loads((root / "base" / "D=2560" / "record.json").read_text())
    assert rec["valid_loss"]["prose"] == json.loads((tmp_path / "alone" / "record.json").read_text())["valid_loss"]["prose"]

    csv_path, _, n = collect(root)
    assert n == 9  # data points only: trunks write no record
    from megareuse.law import load_table
    table = load_table(csv_path, loss_col="valid_loss_code", where={"series": "cpt"})
    assert len(table.loss) == 4
    rows = {(r["D1"], r["D2"]) for r in map(json.loads, (root / "runs.jsonl").read_text().splitlines())
            if r["series"] == "cpt"}
    assert rows == {(2560, 1280), (2560, 2560), (5120, 1280), (5120, 2560)}


def test_run_refuses_a_dp_the_job_does_not_have(tmp_path, prepared, capsys):
    from megareuse.cli import main
    exp = experiment(tmp_path, prepared)
    code = main(["sweep", "--config", str(exp.path), "--out", str(tmp_path / "root"), "--dp", "2",
                 "--run", "base/trunk"])
    assert code == 2
    assert "--dp = 2 but this job has 1 ranks at TP=1" in capsys.readouterr().err
    assert not (tmp_path / "root" / "base").exists()


def test_eta_weighs_runs_by_their_flops():
    # a trunk of 8e12 FLOPs done in 800 s, four 1e12-FLOP branches left: 800 x 4e12 / 8e12 = 400 s
    # (the run count said 800 / 1 x 4 = 3200 s)
    assert local.eta_seconds(800.0, 8e12, 4e12) == 400.0
    assert local.eta_seconds(5.0, 0.0, 4e12) is None  # only a grow (no FLOPs) is done: no rate yet
    assert local.eta_seconds(900.0, 12e12, 0.0) == 0.0


def test_sweep_progress_eta_counts_flops_left(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from megareuse.sweep.grid import RunSpec
    clock = [0.0]
    monkeypatch.setattr(local, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    runs = [RunSpec("old", "train", "s", "m", [], [], 0, 1e15),  # already done: not in the rate
            RunSpec("trunk", "train", "s", "m", [], [], 0, 8e12)]
    runs += [RunSpec(f"b{i}", "train", "s", "m", [], ["trunk"], 0, 1e12) for i in range(4)]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "summary.json").write_text(json.dumps({"finished": True}))

    def execute(train, root, run, emit):  # 1e10 FLOP/s
        clock[0] += run.flops / 1e10
        return run.run_id

    monkeypatch.setattr(local, "execute", execute)
    lines = []
    local.run_sweep({}, runs, tmp_path, emit=lines.append)
    done = [line for line in lines if " done (" in line]
    assert done == [f"sweep: [{i + 1}/5] {rid} done ({t}s elapsed, ~{left}s left)" for i, (rid, t, left) in
                    enumerate([("trunk", 800, 400), ("b0", 900, 300), ("b1", 1000, 200), ("b2", 1100, 100),
                               ("b3", 1200, 0)])], done


def test_series_overrides_reach_only_their_runs_and_are_checked(tmp_path, prepared):
    base_text = (tmp_path / "exp.yaml")
    experiment(tmp_path, prepared)  # writes exp.yaml
    text = base_text.read_text().replace(
        "{name: stack, method: stack,", "{name: stack, method: stack, overrides: [optim.lr=0.001],")
    base_text.write_text(text)
    runs = plan_experiment(load_experiment(base_text))
    lowered = [r.run_id for r in runs if "optim.lr=0.001" in r.overrides]
    assert lowered == ["stack/D1=2560/trunk", "stack/D1=2560/D=1280"]  # the grow step takes no config
    branch = by_id(runs)["stack/D1=2560/D=1280"].overrides
    assert "model.n_layers=4" in branch and branch.index("optim.lr=0.001") < branch.index("run.train_tokens=1280")
    for bad, message in [("[run.train_tokens=5]", "overrides of keys the planner does not set"),
                         ("[model.d_model=64]", "model.*: use the series' model / growth"),
                         ("[optim.nope=1]", "stage2[1].overrides: "),
                         ("[optim.lr=-1]", "optim.lr"),
                         ("optim.lr=1", "a list of section.field=value strings")]:
        base_text.write_text(text.replace("overrides: [optim.lr=0.001]", f"overrides: {bad}"))
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_experiment(base_text)


def by_id(runs):
    return {r.run_id: r for r in runs}
