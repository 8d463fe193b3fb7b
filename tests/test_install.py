"""The pinned stack is stated once for pip (requirements*.txt) and once for conda (environment.yml)."""

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _reqs(*names):
    out = {}
    for name in names:
        for line in (ROOT / name).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                pkg, version = line.split("==")
                out[re.sub(r"\[.*\]", "", pkg).lower()] = version
    return out


def _conda_pip():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    out = {}
    for line in pip:
        if line.startswith("-"):
            continue
        pkg, version = line.split("==")
        out[re.sub(r"\[.*\]", "", pkg).lower()] = version
    return env, out


def test_environment_yml_lists_the_same_pinned_packages():
    pip = _reqs("requirements.txt", "requirements-nodeps.txt")
    env, conda = _conda_pip()
    assert conda == pip
    assert "python=3.11" in env["dependencies"]


def test_constraints_agree_with_requirements():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            pkg, version = line.split("==")
            pins[pkg.strip().lower().replace("_", "-")] = version.strip()
    for pkg, version in _reqs("requirements.txt").items():
        assert pins.get(pkg.replace("_", "-")) == version, pkg
    assert pins["torch"] == "2.13.0"


def test_setup_reads_the_llama_version_from_requirements():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "sed -n 's/^llama-cpp-python\\[server\\]==//p'" in setup
    assert _reqs("requirements.txt")["llama-cpp-python"]


def test_harness_extra_admits_the_pinned_lm_eval():
    import tomllib

    from packaging.requirements import Requirement

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (req,) = [Requirement(r) for r in extras["harness"]]
    assert req.name == "lm-eval" and req.specifier.contains(_reqs("requirements-nodeps.txt")["lm-eval"])
