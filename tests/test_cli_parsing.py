"""The command line parses as documented: options may follow dotted overrides, no option is taken
from an abbreviation, `--resume` never swallows an override, and the README's commands parse."""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from megareuse.cli import build_parser, main, parse_args
from megareuse.config import Config, apply_overrides, read_yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "configs/train/tiny_base.yaml"


def subcommands():
    """Every registered subcommand's parser, by name."""
    parser = build_parser()
    return next(a for a in parser._actions if a.choices and a.dest == "command").choices


@pytest.mark.parametrize("argv, overrides, init_from, keep", [
    (["--config", CONFIG, "a.b=1", "--init-from", "ck", "c.d=2"], ["a.b=1", "c.d=2"], "ck", False),
    (["a.b=1", "--config", CONFIG, "c.d=2", "--keep-optimizer", "e.f=3"], ["a.b=1", "c.d=2", "e.f=3"], None, True),
])
def test_train_options_after_overrides(argv, overrides, init_from, keep):
    args = parse_args(["train", *argv])
    assert (args.config, args.overrides, args.init_from, args.keep_optimizer) == (CONFIG, overrides, init_from, keep)


@pytest.mark.parametrize("argv, expected", [
    (["sweep", "--config", "e.yaml", "a.b=1", "--out", "r", "c.d=2", "--dry-run"], ["a.b=1", "c.d=2"]),
    (["demo", "a.b=1", "--workers", "2", "c.d=2"], ["a.b=1", "c.d=2"]),
    (["estimate", "a.b=1", "--config", "c.yaml", "c.d=2", "--json"], ["a.b=1", "c.d=2"]),
])
def test_every_command_with_overrides_takes_options_after_them(argv, expected):
    assert parse_args(argv).overrides == expected


@pytest.mark.parametrize("tail, resume, overrides", [
    (["--resume"], "auto", []),
    (["--resume", "auto"], "auto", []),
    (["--resume", "runs/x/checkpoints/step_00000004"], "runs/x/checkpoints/step_00000004", []),
    (["--resume", "train.lr=1e-3"], "auto", ["train.lr=1e-3"]),  # bare --resume, then an override
    (["--resume", "optim.lr=1e-3", "run.out_dir=r"], "auto", ["optim.lr=1e-3", "run.out_dir=r"]),
    (["a.b=1", "--resume", "ckpt", "c.d=2"], "ckpt", ["a.b=1", "c.d=2"]),
    (["--resume=auto", "a.b=1"], "auto", ["a.b=1"]),
    ([], None, []),
])
def test_resume_forms(tail, resume, overrides):
    args = parse_args(["train", "--config", CONFIG, *tail])
    assert (args.resume, args.overrides) == (resume, overrides)


def test_resume_help_says_what_an_override_after_it_means(capsys):
    with pytest.raises(SystemExit):
        parse_args(["train", "--help"])
    assert "KEY=VALUE" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("flag", [["--local_rank=3"], ["--local-rank=3"], ["--local_rank", "3"]])
def test_launcher_local_rank_is_accepted(flag):
    args = parse_args(["train", *flag, "--config", CONFIG, "a.b=1"])
    assert (args.local_rank, args.overrides) == (3, ["a.b=1"])


@pytest.mark.parametrize("argv, unknown", [
    (["train", "--config", CONFIG, "--resum", "auto"], "--resum"),
    (["train", "--config", CONFIG, "--init", "ck"], "--init"),
    (["sweep", "--config", "e.yaml", "--out", "r", "--dry"], "--dry"),
    (["fit", "--runs", "t.csv", "--out", "o", "--boot", "5"], "--boot"),
    (["export-hf", "--from", "ck", "--out", "o", "--dty", "bfloat16"], "--dty"),
    (["estimate", "--config", "c.yaml", "--world", "2"], "--world"),
])
def test_abbreviations_are_refused_with_one_line(argv, unknown, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"unrecognized arguments: {unknown}" in err[0], err
    assert f"megareuse {argv[0]}" in err[0] and "accepted options:" in err[0], err


@pytest.mark.parametrize("command", sorted(subcommands()))
def test_every_command_parses_intermixed(command, capsys):
    with pytest.raises(SystemExit) as exc:  # argparse's TypeError for a parser it cannot intermix
        parse_args([command, "--help"])
    assert exc.value.code == 0 and f"megareuse {command}" in capsys.readouterr().out


def test_positional_and_options_in_any_order():
    for argv in (["collect", "--out", "o", "runs"], ["collect", "runs", "--out", "o"]):
        assert (parse_args(argv).runs_dir, parse_args(argv).out) == ("runs", "o")


def test_no_parser_allows_abbreviations():
    assert build_parser().allow_abbrev is False
    assert {name: p.allow_abbrev for name, p in subcommands().items()} == dict.fromkeys(subcommands(), False)


def readme_commands(text: str) -> list[list[str]]:
    """The `megareuse ...` commands of the README's indented code blocks, split as a shell would."""
    lines, out, pending = text.splitlines(), [], ""
    for line in lines:
        if not line.startswith("    ") or not (pending or line.strip().startswith("megareuse ")):
            continue
        pending += line.strip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        out.append(shlex.split(pending, comments=True)[1:])
        pending = ""
    return out


def test_readme_commands_parse():
    commands = readme_commands((ROOT / "README.md").read_text())
    assert any(c[0] == "train" and "--init-from" in c for c in commands)  # the CPT command
    for argv in commands:
        args = parse_args(argv)
        if args.command == "train":  # its overrides apply to the config it names and validate
            raw = apply_overrides(read_yaml(ROOT / args.config), args.overrides)
            Config.from_dict(raw).validate()
    cpt = next(parse_args(c) for c in commands if "--init-from" in c)
    mixes = [o for o in cpt.overrides if o.startswith("data.train=")]
    assert apply_overrides({}, mixes)["data"]["train"] == {"code": 1}


def test_override_pattern_matches_the_config_syntax():
    from megareuse.cli import looks_like_override
    assert all(map(looks_like_override, ["train.lr=1e-3", "a.b_c.d=x", "data.train={code: 1}"]))
    assert not any(map(looks_like_override, ["auto", "runs/a=b/ckpt", "ckpt=1", "./x.y=z", "=1"]))
