"""The over-trained preset (configs/experiments/overtrained.yaml) as planned, without training;
the pycode / mix corpus builders; the demo report's epochs arithmetic."""
from __future__ import annotations

import pytest

from megareuse import demo
from megareuse.config import ConfigError
from megareuse.data import corpora
from megareuse.sweep.grid import load_experiment, plan_experiment, totals

# Measured 2026-12-07 (2 idle cores, --workers 2, one thread each): the 155-run grid, 50,030,592
# tokens / 6.401e13 FLOPs by the dry run, swept in 18 min 52 s (docs/reproducing.md). A grid
# change is checked against these rates.
MEASURED_TOKENS_PER_S = 50_030_592 / 1132
MEASURED_FLOPS_PER_S = 6.401e13 / 1132


@pytest.fixture(scope="module")
def exp():
    return load_experiment(demo.PRESETS["overtrained"])


@pytest.fixture(scope="module")
def runs(exp):
    return plan_experiment(exp)


def test_largest_base_is_over_trained(exp):
    scale = {b["name"]: b for b in demo.base_scale(exp)}
    assert set(scale) == {"base", "base_mix", "base_wide"}
    for name in ("base", "base_mix"):
        assert scale[name]["params"] == 50_928
        assert scale[name]["tokens_per_param"][-1] >= 100
    assert scale["base_wide"]["params"] == 92_480  # the second size, for the joint law with N
    assert scale["base_wide"]["tokens_per_param"][-1] >= 50
    assert [tuple(b.domains) for b in exp.bases] == [("prose",), ("mix",), ("prose",)]


def test_series_shapes(exp):
    assert all(len(b.budgets) >= 5 for b in exp.bases)
    methods = {s.name: s.method for s in exp.stage2}
    assert methods == {"cpt": "cpt", "cpt_mix": "cpt", "stack": "stack", "stack_lr1e-3": "stack"}
    starts = {s.name: s.bases or [exp.base.name] for s in exp.stage2}
    assert starts["cpt"] == ["base"] and starts["cpt_mix"] == ["base_mix"] and starts["stack"] == ["base"]
    assert starts["stack_lr1e-3"] == ["base", "base_wide"]  # two model sizes: reuse_N
    for s in exp.stage2:  # every stage-2 series starts from all >= 5 D1 of its base
        assert s.D1 is None
        assert len(s.budgets) >= 3
    assert [s.name for s in exp.scratch] == ["scratch_code", "scratch_prose_4l"]
    assert all(len(s.budgets) >= 5 for s in exp.scratch)
    # every stage-2 series has its planner reference: the same model on the same blend from scratch
    assert {s.name: demo.scratch_for(exp, s).name for s in exp.stage2} == {
        "cpt": "scratch_code", "cpt_mix": "scratch_code", "stack": "scratch_prose_4l", "stack_lr1e-3": "scratch_prose_4l"}
    assert demo.series_model(exp, exp.stage2[2])["n_layers"] == 4
    assert demo.experiment_domains(exp) == ["prose", "code", "mix"]


def test_run_count_and_time_budget(runs):
    tokens, flops = totals(runs)
    points = sum(r.data_point for r in runs)
    assert (len(runs), points, tokens) == (155, 110, 50_030_592)  # the numbers in the YAML header
    minutes_by_tokens = tokens / MEASURED_TOKENS_PER_S / 60
    minutes_by_flops = flops / MEASURED_FLOPS_PER_S / 60
    assert max(minutes_by_tokens, minutes_by_flops) < 30  # room inside the hour for fits and a busy machine
    for r in runs:  # every point of the CPT series' law: 5 D1 x 4 D2 per base
        assert r.tokens % 2048 == 0
    cpt_points = [r for r in runs if r.data_point and r.series in ("cpt", "cpt_mix")]
    assert len(cpt_points) == 40


def test_laptop_preset_unchanged():
    exp = load_experiment(demo.PRESETS["laptop"])
    runs = plan_experiment(exp)
    assert (len(runs), totals(runs)[0]) == (45, 8_664_064)
    assert demo.experiment_domains(exp) == ["prose", "code"]
    assert "laptop" not in demo.PREPARE_OPTIONS


def test_epochs_by_hand(exp):
    counts = {"prose": 4_000_000, "code": 2_000_000, "mix": 5_000_000}
    rows = {(r["series"], r["domain"]): r for r in demo.domain_epochs(exp, counts)}
    assert rows[("base", "prose")]["epochs"] == pytest.approx(5_242_880 / 4_000_000)
    assert rows[("base_mix", "mix")]["epochs"] == pytest.approx(5_242_880 / 5_000_000)
    assert rows[("cpt", "code")]["epochs"] == pytest.approx(1_048_576 / 2_000_000)
    assert rows[("cpt", "code")]["total_epochs"] == pytest.approx(1_048_576 / 2_000_000)  # the base saw no code
    assert rows[("stack", "prose")]["total_epochs"] == pytest.approx((524_288 + 5_242_880) / 4_000_000)
    assert rows[("scratch_code", "code")]["epochs"] == pytest.approx(4_194_304 / 2_000_000)
    with pytest.raises(ConfigError, match="domain 'mix' is not prepared"):
        demo.domain_epochs(exp, {"prose": 1, "code": 1})


def test_epochs_split_a_blend_by_its_weights(tmp_path):
    path = tmp_path / "blend.yaml"
    path.write_text(f"train_config: {demo.REPO / 'configs' / 'train' / 'tiny_base.yaml'}\n"
                    "base: {domains: {prose: 3, code: 1}, D1: [4096, 8192]}\n"
                    "stage2: [{name: cpt, domains: {code: 1}, D2: [2048], D1: [4096]}]\n")
    rows = {(r["series"], r["domain"]): r for r in demo.domain_epochs(load_experiment(path),
                                                                      {"prose": 1000, "code": 500})}
    assert rows[("base", "prose")]["tokens"] == pytest.approx(8192 * 0.75)
    assert rows[("base", "code")]["epochs"] == pytest.approx(8192 * 0.25 / 500)
    assert rows[("cpt", "code")]["total_epochs"] == pytest.approx((2048 + 4096 * 0.25) / 500)  # D1 = 4096 only


def test_prepared_data_must_hold_the_presets_domains(tmp_path):
    info = {"domains": {"prose": {}, "code": {}}}
    demo._check_prepared(info, tmp_path, ["prose", "code"], "laptop")
    with pytest.raises(ConfigError, match="not mix that --preset overtrained needs"):
        demo._check_prepared(info, tmp_path, ["prose", "code", "mix"], "overtrained")


def _fake_site(root, packages):
    for pkg, files in packages.items():
        for name, size in files:
            path = root / pkg / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("x = 1\n" * (size // 6))
    return root


@pytest.fixture
def fake_sites(tmp_path):
    a = _fake_site(tmp_path / "venv", {"alpha": [("a.py", 600), ("b.py", 600), ("tests/t.py", 600)],
                                       "beta": [("_vendor/v.py", 600), ("c.py", 600), ("test_x.py", 60)],
                                       "beta-1.0.dist-info": [("x.py", 600)]})
    b = _fake_site(tmp_path / "base", {"alpha": [("a.py", 60)], "gamma": [("d.py", 600), ("big.py", 6000)]})
    (b / "gamma" / "latin1.py").write_bytes(b"s = '\xe9'\n")
    return [a, b]


def test_site_packages_files_skip_and_dedupe(fake_sites):
    names = [n for n, _ in corpora.site_packages_files(fake_sites, max_file_bytes=1000)]
    # tests, vendored copies, dist-info, test_*, oversized files left out; alpha/a.py taken once
    # (from the first root); latin1.py is a candidate (the UTF-8 check comes at writing)
    assert names == ["alpha__a.py", "alpha__b.py", "beta__c.py", "gamma__d.py", "gamma__latin1.py"]
    with pytest.raises(corpora.CorpusError, match="pycode corpus: no Python sources"):
        corpora.site_packages_files([fake_sites[0] / "beta-1.0.dist-info" / "none"])


def test_build_pycode_is_capped_spread_and_deterministic(tmp_path, fake_sites):
    a = corpora.build_pycode(tmp_path / "a", max_bytes=10_000, roots=fake_sites, max_file_bytes=1000)
    b = corpora.build_pycode(tmp_path / "b", max_bytes=10_000, roots=fake_sites, max_file_bytes=1000)
    assert [p.name for p in a] == [p.name for p in b] == [
        "pycode_00000_alpha__a.py.txt", "pycode_00001_alpha__b.py.txt", "pycode_00002_beta__c.py.txt",
        "pycode_00003_gamma__d.py.txt"]  # latin1.py is not UTF-8
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    capped = corpora.build_pycode(tmp_path / "c", max_bytes=1200, roots=fake_sites, max_file_bytes=1000)
    assert sum(p.stat().st_size for p in capped) <= 1200
    # a cap of half the 2,410 candidate bytes takes every 2nd file (spread), not the first ones
    assert [p.name.split("_", 2)[2] for p in capped] == ["alpha__a.py.txt", "beta__c.py.txt"]
    with pytest.raises(corpora.CorpusError, match="max_bytes = 0: accepted a positive number"):
        corpora.build_pycode(tmp_path / "d", max_bytes=0, roots=fake_sites)


def test_build_mix_is_prose_plus_a_capped_code_share(tmp_path, fake_sites, monkeypatch):
    def fake_prose(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        return [corpora._write(out_dir, f"prose_{k}.txt", "word " * 480) for k in range(3)]  # 3 x 2400 B

    monkeypatch.setattr(corpora, "build_prose", fake_prose)
    a = corpora.build_mix(tmp_path / "a", code_share=0.25, roots=fake_sites, max_file_bytes=1000)
    b = corpora.build_mix(tmp_path / "b", code_share=0.25, roots=fake_sites, max_file_bytes=1000)
    assert [p.relative_to(tmp_path / "a") for p in a] == [p.relative_to(tmp_path / "b") for p in b]
    prose = [p for p in a if p.parent.name == "prose"]
    code = [p for p in a if p.parent.name == "code"]
    assert len(prose) == 3 and a[:3] == prose
    code_bytes = sum(p.stat().st_size for p in code)
    assert 0 < code_bytes <= 7200 * 0.25 / 0.75  # at most 25% of the domain's bytes
    assert code_bytes / (code_bytes + 7200) > 0.15  # and not far below it
    assert "mix" in corpora.DOMAINS and "pycode" in corpora.DOMAINS
    with pytest.raises(corpora.CorpusError, match=r"code_share = 1: accepted a number in \(0, 1\)"):
        corpora.build_mix(tmp_path / "c", code_share=1, roots=fake_sites)
