"""Guards on the project's layout, packaging and the Flower app's runtime dependencies."""

import importlib
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("coordinator", "edge_client", "shared", "simulations", "deploy")


@pytest.mark.parametrize("name", PACKAGES)
def test_each_package_is_imported_from_this_repo(name: str) -> None:
    # Arrange / Act
    module = importlib.import_module(name)
    # Assert: a PyPI distribution called `shared` or `coordinator` must never shadow ours
    assert module.__file__ is not None
    assert Path(module.__file__).resolve().is_relative_to(REPO_ROOT / name)
    assert module.__doc__, f"{name}/__init__.py needs a one-line docstring"


def test_flower_runtime_installer_has_nothing_to_install() -> None:
    # Flower's SuperLink uv-syncs [project].dependencies minus flwr at run time; anything
    # listed there (torch above all) could arrive as a multi-GB CUDA build.
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    deps = [Requirement(dep) for dep in pyproject["project"]["dependencies"]]
    assert [dep.name for dep in deps] == ["flwr"], deps
    # one minor version of Flower, because its API changes every release
    assert deps[0].specifier.contains("1.42.0") and not deps[0].specifier.contains("1.43.0")


def test_installed_torch_is_the_cpu_build() -> None:
    torch = importlib.import_module("torch")
    assert torch.version.cuda is None
