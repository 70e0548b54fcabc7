"""Studies that start from checkpoints that exist (megareuse/sweep/bases.py).

The done-when test runs a tiny study, exports its bases' final checkpoints as Hugging Face
directories, runs a second study whose base lists those directories (and one megareuse
checkpoint in place), and checks the second study's stage-2 losses equal the first's exactly
(same data order, fp32, CPU) and that its D2 = 0 records carry the bases' losses. The reference
is the first study's own records; nothing here is a hard-coded number.
"""
from __future__ import annotations

import hashlib
import json
import re
import textwrap
from pathlib import Path

import pytest

from megareuse.config import ConfigError, load_config
from megareuse.records import collect
from megareuse.sweep import local
from megareuse.sweep.grid import format_plan, load_experiment, plan_experiment

from test_sweep import TINY
from test_train import CONFIG, REPO, quiet

STUDY = """\
base: {domains: {prose: 1}, D1: [2560, 5120]}
stage2:
  - {name: cpt, method: cpt, domains: {code: 1}, D2: [1280, 2560]}
  - {name: cpt_replay, method: cpt, replay: 0.25, domains: {code: 1}, D1: [2560], D2: [1280], schedule: cosine}
  - {name: cpt_cosine, method: cpt, domains: {code: 1}, D1: [2560], D2: [1280], schedule: cosine}
"""


def write_experiment(path: Path, prepared, body: str, extra=()) -> Path:
    overrides = "\n".join(f"  - {o}" for o in TINY + [f"data.dir={prepared}", *extra])
    path.write_text(f"name: {path.stem}\ntrain_config: {CONFIG}\noverrides:\n{overrides}\n" + textwrap.dedent(body))
    return path


def record(root: Path, run_id: str) -> dict:
    return json.loads((root / run_id / "record.json").read_text())


def tree_digest(path: Path) -> dict[str, tuple[str, int]]:
    """Every file below ``path``: (sha256, mtime_ns): an input must come out unchanged."""
    return {str(p.relative_to(path)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_study_from_exported_checkpoints_equals_the_trained_study(tmp_path, prepared):
    from megareuse.interop.hf import export_hf

    first = load_experiment(write_experiment(tmp_path / "first.yaml", prepared, STUDY))
    root1 = tmp_path / "first"
    local.run_sweep(first.train, plan_experiment(first), root1, emit=quiet)

    finals = {2560: "base/D=2560/checkpoints/step_00000020", 5120: "base/D=5120/checkpoints/step_00000040"}
    hf = tmp_path / "published"
    for d1, final in finals.items():
        export_hf(root1 / final, hf / f"D{d1}")
    native = root1 / finals[2560]  # a megareuse checkpoint, used in place (linked)
    before = {p: tree_digest(p) for p in (hf / "D2560", hf / "D5120", native)}

    second_path = write_experiment(tmp_path / "second.yaml", prepared, f"""\
        base:
          checkpoints:
            - {{path: published/D5120, D1: 5120}}   # relative to the experiment file
            - {{path: published/D2560, D1: 2560}}
          domains: {{prose: 1}}
        bases:
          - {{name: native, checkpoints: [{{path: {native}, D1: 2560}}], domains: {{prose: 1}}}}
        stage2:
          - {{name: cpt, method: cpt, domains: {{code: 1}}, D2: [1280, 2560]}}
          - {{name: cpt_replay, method: cpt, replay: 0.25, domains: {{code: 1}}, D1: [2560], D2: [1280],
             schedule: cosine}}
          - {{name: cpt_native, method: cpt, bases: [native], domains: {{code: 1}}, D2: [1280], schedule: cosine}}
        """)
    second = load_experiment(second_path)
    runs2 = plan_experiment(second)
    root2 = tmp_path / "second"
    local.run_sweep(second.train, runs2, root2, emit=quiet)

    # stage 2 from the imported checkpoints is the first study's stage 2, bit for bit
    for run_id in ("cpt/D1=2560/D=1280", "cpt/D1=2560/D=2560", "cpt/D1=5120/D=1280", "cpt/D1=5120/D=2560",
                   "cpt_replay/D1=2560/D=1280"):
        a, b = record(root1, run_id), record(root2, run_id)
        assert (b["D1"], b["D2"], b["stage"], b["method"]) == (a["D1"], a["D2"], "cpt", "cpt"), run_id
        assert b["valid_loss"] == a["valid_loss"], run_id
        assert b["tokens_per_domain"] == a["tokens_per_domain"], run_id
        assert b["init_from"]["path"] == str(root2 / finals[a["D1"]]), run_id
    assert set(record(root1, "cpt/D1=2560/D=1280")["valid_loss"]) == {"prose", "code"}
    # the comparison tells bases apart: another D1, or no replay, gives other losses
    assert record(root2, "cpt/D1=5120/D=1280")["valid_loss"] != record(root1, "cpt/D1=2560/D=1280")["valid_loss"]
    assert record(root2, "cpt_replay/D1=2560/D=1280")["valid_loss"] != \
        record(root1, "cpt/D1=2560/D=1280")["valid_loss"]
    # a megareuse checkpoint in place, cosine from it: the first study's run of the same schedule
    native_run = record(root2, "cpt_native/native/D1=2560/D=1280")  # named after its base
    assert native_run["valid_loss"] == record(root1, "cpt_cosine/D1=2560/D=1280")["valid_loss"]

    # the D2 = 0 records carry the bases' losses
    for name in ("base", "native"):
        for d1 in ((2560, 5120) if name == "base" else (2560,)):
            got, want = record(root2, f"{name}/D={d1}"), record(root1, f"base/D={d1}")
            assert (got["stage"], got["method"], got["series"], got["D1"], got["D2"], got["tokens"]) == \
                ("base", "base", name, d1, 0, d1)
            assert got["valid_loss"] == want["valid_loss"], (name, d1)
            assert got["N"] == want["N"] and got["base_source"]["format"] == \
                ("megareuse" if name == "native" else "huggingface")
    assert (root2 / "native/D=2560/checkpoints/step_00000020").resolve() == native.resolve()

    # inputs are read, never written; a resumed sweep imports nothing again
    assert {p: tree_digest(p) for p in before} == before
    imported = root2 / finals[5120] / "model.safetensors"
    stamp = imported.stat().st_mtime_ns
    assert local.run_sweep(second.train, runs2, root2, emit=quiet) == []
    assert imported.stat().st_mtime_ns == stamp

    # collect sees the bases at D2 = 0 next to the stage-2 runs
    collect(root2)
    rows = [json.loads(line) for line in (root2 / "runs.jsonl").read_text().splitlines()]
    assert {(r["series"], r["D1"], r["D2"]) for r in rows if r["stage"] == "base"} == \
        {("base", 2560, 0), ("base", 5120, 0), ("native", 2560, 0)}
    assert len([r for r in rows if r["series"] == "cpt"]) == 4


# ------------------------------------------------------------------ the plan (dry run)
def checkpoint_experiment(tmp_path: Path, prepared, base: str, stage2: str = "") -> Path:
    stage2 = stage2 or "stage2:\n  - {name: cpt, method: cpt, domains: {code: 1}, D2: [1280, 2560]}\n"
    return write_experiment(tmp_path / "exp.yaml", prepared, base + stage2)


BASE = """\
base:
  checkpoints:
    - {path: ck/a, D1: 5120}
    - {path: ck/b, D1: 2560}
  domains: {prose: 1}
"""


def test_dry_run_plan_lists_import_and_evaluate_steps(tmp_path, prepared, capsys):
    path = checkpoint_experiment(tmp_path, prepared, BASE, """\
stage2:
  - {name: cpt, method: cpt, domains: {code: 1}, D2: [1280, 2560]}
  - {name: replay, method: cpt, replay: 0.25, domains: {code: 1}, D1: [5120], D2: [1280], schedule: cosine}
  - {name: stack, method: stack, domains: {prose: 1}, D1: [2560], D2: [1280], growth: {depth: 2}}
""")
    exp = load_experiment(path)
    assert exp.base.budgets == [2560, 5120]  # sorted: the listed D1 values are the series' budgets
    runs = plan_experiment(exp)
    by_id = {r.run_id: r for r in runs}
    ids = [r.run_id for r in runs]
    assert ids[:4] == ["base/D=2560/checkpoints/step_00000020", "base/D=2560",
                       "base/D=5120/checkpoints/step_00000040", "base/D=5120"]
    assert [by_id[i].kind for i in ids[:4]] == ["import", "evaluate", "import", "evaluate"]
    imp = by_id["base/D=5120/checkpoints/step_00000040"]
    assert imp.source["path"] == str(tmp_path / "ck" / "a") and imp.source["D1"] == 5120
    assert imp.depends_on == [] and imp.tokens == 0 and not imp.data_point
    ev = by_id["base/D=5120"]
    assert ev.depends_on == [imp.run_id] and ev.data_point and "data.train={prose: 1}" in ev.overrides
    # stage 2 starts from the imported checkpoint and waits for the import only
    trunk = by_id["cpt/D1=5120/trunk"]
    assert trunk.depends_on == [imp.run_id]
    assert "run.init_from={root}/base/D=5120/checkpoints/step_00000040" in trunk.overrides
    assert by_id["stack/D1=2560/grown"].depends_on == ["base/D=2560/checkpoints/step_00000020"]
    assert by_id["stack/D1=2560/grown"].grow["from"] == "base/D=2560/checkpoints/step_00000020"
    # replay from a checkpoint base: the blend written out, in the trainer's order
    rep = by_id["replay/D1=5120/D=1280"].overrides
    assert "data.replay=0.0" in rep and "data.train={code: 0.75, prose: 0.25}" in rep
    assert sum(r.data_point for r in runs) == 2 + 4 + 1 + 1
    # the same at DP 2: the import sits where a trained base's final checkpoint would
    assert plan_experiment(exp, dp=2)[0].run_id == "base/D=2560/checkpoints/step_00000010"

    from megareuse.cli import main
    assert main(["sweep", "--config", str(path), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out == format_plan(runs) + "\n"
    line = next(x for x in out.splitlines() if x.startswith("base/D=5120/checkpoints/"))
    assert line.split()[1] == "import" and line.endswith(f"<- {tmp_path / 'ck' / 'a'}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("base, message", [
    ("base: {domains: {prose: 1}, D1: [2560], checkpoints: [{path: a, D1: 2560}]}",
     "base.D1 = [2560]: accepted one of base D1 budgets (trained here) and checkpoints (that exist), not both"),
    ("base: {checkpoints: []}", "base.checkpoints = []: accepted a non-empty list of {path: DIR, D1: TOKENS}"),
    ("base: {checkpoints: [{D1: 2560}]}", "base.checkpoints[0].path = None: accepted a directory path"),
    ("base: {checkpoints: [{path: a, D1: 0}]}", "base.checkpoints[0].D1 = 0: accepted a positive integer"),
    ("base: {checkpoints: [{path: a, D1: 2560.5}]}", "base.checkpoints[0].D1 = 2560.5: accepted a positive integer"),
    ("base: {checkpoints: [{path: a, D1: 2560, step: 3}]}",
     "base.checkpoints[0].step = 3: accepted the keys path and D1"),
    ("base: {checkpoints: [a]}", "base.checkpoints[0] = 'a': accepted a mapping {path: DIR, D1: TOKENS}"),
    ("base: {checkpoints: [{path: a, D1: 2560}, {path: b, D1: 2560}]}",
     "base.checkpoints = [2560, 2560]: accepted distinct D1 values"),
    ("base: {checkpoints: [{path: a, D1: 2560}, {path: a, D1: 5120}]}", "accepted distinct paths"),
    ("base: {checkpoints: [{path: a, D1: 2560}], schedule: wsd}",
     "base.schedule = 'wsd': accepted no schedule on a checkpoint base"),
    ("base: {checkpoints: [{path: a, D1: 2560}], model: {d_model: 64}}",
     "base.model = {'d_model': 64}: accepted no model on a checkpoint base"),
    ("base: {checkpoints: [{path: a, D1: 2560}], domains: {prose: -1}}",
     "base.domains.prose = -1: accepted a finite number > 0"),
    ("base: {checkpoints: [{path: a, D1: 2560}], color: red}", "base.color = 'red': accepted one of the keys name, "
     "checkpoints, domains, overrides"),
    ("base: {checkpoints: [{path: a, D1: 2560}], overrides: [run.init_from=x]}",
     "base.overrides = 'run.init_from=x': accepted overrides of keys the planner does not set"),
])
def test_bad_checkpoint_base_is_one_line(tmp_path, prepared, base, message):
    path = checkpoint_experiment(tmp_path, prepared, base + "\n")
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    text = str(info.value)
    assert "\n" not in text and text.startswith("experiment error: ") and message in text, text


def test_stage2_filters_and_replay_from_a_checkpoint_base(tmp_path, prepared):
    bare = BASE.replace("  domains: {prose: 1}\n", "")
    for stage2, message in [
        ("  - {name: cpt, method: cpt, domains: {code: 1}, D1: [1000], D2: [1280]}\n",
         "stage2[0].D1 = [1000]: accepted a subset of base.D1 [2560, 5120]"),
        ("  - {name: cpt, method: cpt, replay: 0.1, domains: {code: 1}, D2: [1280]}\n",
         "stage2[0].replay = 0.1: accepted 0 from checkpoint base 'base', which names no training domains"),
    ]:
        path = checkpoint_experiment(tmp_path, prepared, bare, "stage2:\n" + stage2)
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_experiment(path)
    path = checkpoint_experiment(tmp_path, prepared, bare,
                                 "stage2:\n  - {name: cpt, method: cpt, domains: {code: 1}, D1: [5120], D2: [1280]}\n")
    runs = plan_experiment(load_experiment(path))
    assert {r.run_id for r in runs if r.series == "cpt" and r.data_point} == {"cpt/D1=5120/D=1280"}
    ev = next(r for r in runs if r.kind == "evaluate")
    assert not any(o.startswith("data.train=") for o in ev.overrides)  # no domains: none claimed


def hf_dir(path: Path, **fields) -> Path:
    """An HF directory's config.json (no weights: the checks before a sweep read only this)."""
    from megareuse.interop.hf import hf_config_from_model
    tiny = load_config(CONFIG, TINY).model
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({**hf_config_from_model(tiny), **fields}))
    return path


def test_checkpoints_are_checked_before_anything_runs(tmp_path, prepared):
    path = checkpoint_experiment(tmp_path, prepared, BASE)
    exp = load_experiment(path)
    runs = plan_experiment(exp)
    root = tmp_path / "root"
    cases = [
        (lambda: None, "experiment error: base.checkpoints[1].path = '{ck}/b' does not exist; accepted a Hugging "
                       "Face model directory"),
        (lambda: (tmp_path / "ck" / "b").mkdir(parents=True), "holds neither config.json nor manifest.json"),
        (lambda: (tmp_path / "ck" / "b").rmdir() or hf_dir(tmp_path / "ck" / "b", hidden_size=64,
                                                            intermediate_size=128, head_dim=32),
         "experiment error: base.checkpoints[1].path = '{ck}/b' holds another model than the training config's: "
         "model.d_model: checkpoint 64 vs config 32; model.ffn_hidden: checkpoint 128 vs config 64"),
    ]
    for prepare, message in cases:
        prepare()
        with pytest.raises(ConfigError) as info:
            local.run_sweep(exp.train, runs, root, emit=quiet)
        text = str(info.value)
        assert "\n" not in text and message.format(ck=tmp_path / "ck") in text, text
        assert not root.exists()  # refused before anything was written
    # fewer positions than the training config's sequence
    import shutil
    shutil.rmtree(tmp_path / "ck" / "b")
    hf_dir(tmp_path / "ck" / "b", max_position_embeddings=16)
    with pytest.raises(ConfigError, match=re.escape("max_position_embeddings = 16 but model.max_seq_len = 32; "
                                                    "accepted model.max_seq_len <= 16")):
        local.run_sweep(exp.train, runs, root, emit=quiet)


def test_megareuse_checkpoint_d1_and_blend_must_match(tmp_path, prepared):
    """A megareuse checkpoint records its own D1 and blend: the listed ones must be those."""
    from megareuse.engine.trainer import Trainer
    cfg = load_config(CONFIG, TINY + [f"data.dir={prepared}", f"run.out_dir={tmp_path / 'run'}",
                                      "run.train_tokens=1280", "schedule.kind=cosine"])
    Trainer(cfg, emit=quiet).run()
    ck = tmp_path / "run" / "checkpoints" / "step_00000010"
    for base, message in [
        (f"base: {{checkpoints: [{{path: {ck}, D1: 2560}}]}}\n",
         f"base.checkpoints[0].D1 = 2560: accepted 1280, the tokens {ck} records"),
        (f"base: {{checkpoints: [{{path: {ck}, D1: 1280}}], domains: {{code: 1}}}}\n",
         "base.domains = {'code': 1}: accepted {'prose': 1.0}, the training blend"),
    ]:
        exp = load_experiment(checkpoint_experiment(tmp_path, prepared, base))
        with pytest.raises(ConfigError, match=re.escape(message)):
            local.run_sweep(exp.train, plan_experiment(exp), tmp_path / "root", emit=quiet)


def test_evaluate_step_in_bf16_gives_the_trainers_losses(tmp_path, prepared):
    """The D2 = 0 record is computed as the trainer evaluates (its model's own loss, its dtype):
    a bf16 base's record and the evaluate step on its checkpoint agree exactly."""
    from megareuse.engine.trainer import Trainer
    overrides = TINY + [f"data.dir={prepared}", "run.dtype=bf16", "parallel.zero_stage=1",
                        "run.train_tokens=1280", "schedule.kind=cosine"]
    cfg = load_config(CONFIG, overrides + [f"run.out_dir={tmp_path / 'run'}"])
    Trainer(cfg, emit=quiet).run()
    exp = load_experiment(write_experiment(
        tmp_path / "bf16.yaml", prepared, "base: {checkpoints: [{path: run/checkpoints/step_00000010, D1: 1280}]}\n",
        ["run.dtype=bf16", "parallel.zero_stage=1"]))
    runs = plan_experiment(exp)
    assert [r.kind for r in runs] == ["import", "evaluate"]
    local.run_sweep(exp.train, runs, tmp_path / "root", emit=quiet)
    got = record(tmp_path / "root", "base/D=1280")
    assert got["valid_loss"] == json.loads((tmp_path / "run" / "record.json").read_text())["valid_loss"]
    assert got["config"]["run"]["dtype"] == "bf16"


def test_slurm_jobs_import_before_the_stage2_jobs(tmp_path, prepared):
    from megareuse.sweep.slurm import array_jobs, write_slurm
    path = checkpoint_experiment(tmp_path, prepared, BASE)
    for name in ("a", "b"):
        hf_dir(tmp_path / "ck" / name)
    runs = plan_experiment(load_experiment(path), dp=2)
    jobs = array_jobs(runs)
    assert [(j.wave, j.kind) for j in jobs][:3] == [(0, "import"), (1, "train"), (1, "evaluate")]
    submit = write_slurm(runs, path, tmp_path / "root", tmp_path / "slurm", dp=2, gpus_per_node=2)
    text = submit.read_text()
    importing = next(line for line in text.splitlines() if "-w0-import" in line)
    assert "LAUNCHER=python" in importing and "--gpus-per-node=1" in importing
    trunks = next(line for line in text.splitlines() if "-w1-train" in line)
    assert '"--dependency=afterok:${W0_IMPORT}_0:${W0_IMPORT}_1"' in trunks
    evaluating = next(line for line in text.splitlines() if "-w1-evaluate" in line)
    assert "LAUNCHER=python" in evaluating
    assert (tmp_path / "slurm" / "wave0_import.runs").read_text().splitlines() == [
        "base/D=2560/checkpoints/step_00000010\timport", "base/D=5120/checkpoints/step_00000020\timport"]
    (tmp_path / "ck" / "a" / "config.json").unlink()  # a checkpoint gone: refused before writing
    with pytest.raises(ConfigError, match=re.escape("base.checkpoints[0].path")):
        write_slurm(runs, path, tmp_path / "root", tmp_path / "slurm2", dp=2, gpus_per_node=2)
    assert not (tmp_path / "slurm2").exists()


def test_tinyllama_recipe_plans_and_fits_the_published_config():
    """configs/experiments/tinyllama_cpt.yaml plans at DP 8 and 16, and a config.json with
    TinyLlama-1.1B's published fields maps onto its training config with no difference."""
    import dataclasses

    from megareuse.config import Config
    from megareuse.interop.hf import model_config_from_hf
    from megareuse.engine.init_source import model_diff

    exp = load_experiment(REPO / "configs" / "experiments" / "tinyllama_cpt.yaml")
    d1s = exp.base.budgets
    assert d1s[0] == 50_000 * 2_097_152 and d1s[-1] == 1_431_000 * 2_097_152  # steps x 2,097,152 tokens
    for dp in (8, 16):
        runs = plan_experiment(exp, dp=dp)
        assert [r.source["D1"] for r in runs if r.kind == "import"] == d1s
    published = {"architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
                 "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
                 "intermediate_size": 5632, "max_position_embeddings": 2048, "model_type": "llama",
                 "num_attention_heads": 32, "num_hidden_layers": 22, "num_key_value_heads": 4,
                 "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
                 "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 32000}
    model = Config.from_dict(exp.train).model
    assert model_diff(dataclasses.asdict(model_config_from_hf(published, model.max_seq_len)),
                      dataclasses.asdict(model)) == []


@pytest.mark.slow
def test_checkpoint_study_on_simulated_slurm(tmp_path, prepared):
    """submit.sh -> sweep_array.sh: the import and evaluate tasks run as one process each (no
    torchrun), the stage-2 trunk after the import; then every step of the plan is done."""
    import os
    import subprocess

    from megareuse.engine.trainer import Trainer
    from megareuse.interop.hf import export_hf
    from megareuse.sweep.slurm import write_slurm
    from test_slurm import SBATCH_NOW, fake_bin, script_env

    cfg = load_config(CONFIG, TINY + [f"data.dir={prepared}", f"run.out_dir={tmp_path / 'run'}",
                                      "run.train_tokens=1280", "schedule.kind=cosine"])
    Trainer(cfg, emit=quiet).run()
    export_hf(tmp_path / "run" / "checkpoints" / "step_00000010", tmp_path / "hf")
    path = checkpoint_experiment(tmp_path, prepared, "base: {checkpoints: [{path: hf, D1: 1280}]}\n",
                                 "stage2:\n  - {name: cpt, method: cpt, domains: {code: 1}, D2: [1280]}\n")
    runs = plan_experiment(load_experiment(path), dp=1)
    submit = write_slurm(runs, path, tmp_path / "root", tmp_path / "slurm", gpus_per_node=1)
    env = script_env(fake_bin(tmp_path, sbatch=SBATCH_NOW), STATE=str(tmp_path / "n"),
                     TASK_LOG=str(tmp_path / "tasks.log"),
                     TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", ""))
    proc = subprocess.run(["bash", str(submit)], env={k: v for k, v in env.items() if v},
                          capture_output=True, text=True, timeout=500)
    log = (tmp_path / "tasks.log").read_text() if (tmp_path / "tasks.log").exists() else ""
    assert proc.returncode == 0, proc.stderr + log[-3000:]
    assert all(local.is_done(tmp_path / "root", r) for r in runs), log[-3000:]
    assert record(tmp_path / "root", "base/D=1280")["valid_loss"] == \
        json.loads((tmp_path / "run" / "record.json").read_text())["valid_loss"]
