"""requirements/*.lock: every dependency pinned by version and hash, current with pyproject.toml,
and what this very environment (made by `make install`) and the image install."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sysconfig
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
LINE = re.compile(r"(?P<name>[a-z0-9-]+)==(?P<version>\S+) --hash=sha256:(?P<sha>[0-9a-f]{64})")


def lock_tool():
    spec = importlib.util.spec_from_file_location("lock", REPO / "scripts" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_lock(name: str) -> tuple[str, dict[str, tuple[str, str]]]:
    """(dependency digest in the header, {package: (version, sha256)})."""
    digest, packages = None, {}
    for line in (REPO / "requirements" / name).read_text().splitlines():
        if line.startswith("# dependency-digest: "):
            digest = line.removeprefix("# dependency-digest: ")
        elif line and not line.startswith("#"):
            match = LINE.fullmatch(line)
            assert match, f"{name}: {line!r} is not name==version --hash=sha256:..."
            assert match["name"] not in packages, f"{name}: {match['name']} twice"
            packages[match["name"]] = (match["version"], match["sha"])
    return digest, packages


@pytest.mark.parametrize("name", ["tools.lock", "runtime.lock", "dev.lock"])
def test_each_lock_was_made_from_the_dependencies_pyproject_declares_now(name):
    digest, packages = read_lock(name)
    assert digest == lock_tool().dependency_digest(), \
        f"requirements/{name} is older than pyproject.toml's dependencies: run `make lock`"
    assert packages and not {"torch", "aigc-dist"} & set(packages)


def test_every_declared_dependency_is_locked_at_a_version_it_accepts():
    tool = lock_tool()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    locks = {"runtime.lock": project["dependencies"], "dev.lock": project["dependencies"]
             + project["optional-dependencies"]["dev"]}  # fmt: skip
    for lock, declared in locks.items():
        _, packages = read_lock(lock)
        for text in declared:
            requirement = Requirement(text)
            name = tool.canonical(requirement.name)
            if name == "torch":
                continue  # installed apart, pinned by version (see scripts/lock.py)
            assert name in packages, f"{lock}: {text} is not locked"
            assert requirement.specifier.contains(packages[name][0], prereleases=True), \
                f"{lock}: {name}=={packages[name][0]} does not satisfy {text}"
            for extra in requirement.extras:  # ray[train,serve,data]: the extras' packages are there too
                for needed in importlib.metadata.requires(requirement.name) or []:
                    dependency = Requirement(needed)
                    if dependency.marker and dependency.marker.evaluate({"extra": extra}) and \
                            not dependency.marker.evaluate({"extra": ""}):
                        assert tool.canonical(dependency.name) in packages, f"{lock}: {dependency} ({text})"


def test_the_image_runs_the_versions_ci_tests():
    _, runtime = read_lock("runtime.lock")
    _, dev = read_lock("dev.lock")
    _, tools = read_lock("tools.lock")
    assert {name: dev[name] for name in runtime} == runtime
    assert all(dev.get(name, pins) == pins for name, pins in tools.items())


def test_this_environment_holds_exactly_the_locked_versions():
    """`make install` installed from dev.lock: the tests run on the locked set and nothing else."""
    _, packages = read_lock("dev.lock")
    tool = lock_tool()
    # The venv's own site-packages only: a library may put the base interpreter's on sys.path during the
    # session (it happens here), and what lies there is not what `make install` put in the venv.
    venv = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    installed = {tool.canonical(d.metadata["Name"]): d.version for d in importlib.metadata.distributions(path=venv)}
    wrong = {name: (version, installed.get(name)) for name, (version, _) in packages.items()
             if installed.get(name) != version}  # fmt: skip
    assert not wrong, f"installed versions differ from requirements/dev.lock (locked, installed): {wrong}"
    unlocked = set(installed) - set(packages) - {"torch", "aigc-dist", *read_lock("tools.lock")[1]}
    assert not unlocked, f"installed but in no lock: {sorted(unlocked)}"


@pytest.mark.parametrize(("path", "lock"), [("Makefile", "dev.lock"), ("k8s/Dockerfile", "runtime.lock")])
def test_installs_go_through_the_lock_with_hashes_required(path, lock):
    text = (REPO / path).read_text()
    assert re.search(rf"install .*--require-hashes --no-deps .*-r requirements/{re.escape(lock)}", text)
    assert re.search(r"install .*--require-hashes --no-deps -r requirements/tools\.lock", text)
    # The package itself adds nothing unlocked: installed with --no-deps, then checked whole.
    assert re.search(r"install .*--no-deps --no-build-isolation (-e )?\.", text)
    assert re.search(r"(pip|\$\(PIP\)) check", text)
