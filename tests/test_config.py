import textwrap

import pytest

from megareuse.config import Config, ConfigError, apply_overrides, load_config


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_defaults_validate():
    cfg = Config().validate()
    assert cfg.model.kv_heads == cfg.model.n_heads
    assert cfg.tokens_per_step == cfg.run.micro_batch_size * cfg.run.grad_accum * cfg.data.seq_len


def test_yaml_base_chain_and_overrides(tmp_path):
    write(tmp_path, "base.yaml", """
        model: {d_model: 64, n_heads: 4, n_layers: 2}
        optim: {lr: 0.001}
    """)
    child = write(tmp_path, "child.yaml", """
        base: base.yaml
        model: {n_layers: 3}
        data: {train: {code: 2}}
    """)
    cfg = load_config(child, ["model.n_kv_heads=2", "optim.lr=5e-4", "data.valid=[code]"])
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.n_kv_heads) == (64, 3, 2)
    assert cfg.optim.lr == 5e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.data.train == {"code": 2} and cfg.data.valid == ["code"]


def test_roundtrip_dict():
    cfg = load_config(None, ["model.n_layers=5", "schedule.kind=wsd"])
    assert Config.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("override, field, accepted", [
    (["model.n_layer=4"], "model.n_layer", "did you mean 'n_layers'"),
    (["modle.d_model=4"], "modle", "accepted: model, data, optim, schedule, run, parallel"),
    (["model.d_model=-8"], "model.d_model = -8", "a positive number"),
    (["model.n_heads=5"], "model.n_heads = 5", "a divisor of d_model=96"),
    (["model.n_kv_heads=3"], "model.n_kv_heads = 3", "divisor of n_heads=4"),
    (["model.attention=flash"], "model.attention = 'flash'", "one of sdpa, eager, triton, auto"),
    (["run.micro_batch_size=0"], "run.micro_batch_size = 0", "a positive number"),
    (["run.device=tpu"], "run.device = 'tpu'", "one of cpu, cuda, auto"),
    (["model.n_layers=2.5"], "model.n_layers = 2.5", "an integer"),
    (["model.tie_embeddings=1"], "model.tie_embeddings = 1", "true or false"),
    (["optim.beta2=1.0"], "optim.beta2 = 1.0", "[0, 1)"),
    (["data.train={prose: -1}"], "data.train.prose = -1", "a positive weight"),
    (["data.seq_len=256"], "data.seq_len = 256", "at most model.max_seq_len=128"),
    (["run.train_tokens=100"], "run.train_tokens = 100", "at least one optimizer step"),
    (["schedule.kind=linear"], "schedule.kind = 'linear'", "one of cosine, constant, wsd"),
    (["model"], "override 'model'", "section.field=value"),
])
def test_bad_values_give_one_line_naming_field(override, field, accepted):
    with pytest.raises(ConfigError) as info:
        load_config(None, override)
    message = str(info.value)
    assert "\n" not in message
    assert field in message and accepted in message


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = write(tmp_path, "bad.yaml", "model: {d_model: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    loop = write(tmp_path, "loop.yaml", "base: loop.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(loop)


def test_overrides_do_not_mutate_input():
    raw = {"model": {"d_model": 64}}
    out = apply_overrides(raw, ["model.d_model=32"])
    assert raw["model"]["d_model"] == 64 and out["model"]["d_model"] == 32


def test_shipped_configs_validate():
    from pathlib import Path

    from megareuse.sweep.grid import load_experiment, plan_experiment
    root = Path(__file__).parent.parent / "configs"
    configs = sorted((root / "train").glob("*.yaml")) + sorted((root / "model").glob("*.yaml"))
    assert len(configs) >= 2
    for path in configs:
        load_config(path)
    experiments = sorted((root / "experiments").glob("*.yaml"))
    assert experiments
    for path in experiments:
        assert plan_experiment(load_experiment(path))
