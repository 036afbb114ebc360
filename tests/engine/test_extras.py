"""The core install and its extras: the engine, the gRPC black box and the command line import
without any extra; a feature whose extra is missing fails with one line naming the pip command.

Absence is simulated: ``sys.modules[name] = None`` makes ``import name`` (and its submodules)
fail as if the package were not installed, in this process (restored by monkeypatch) or in a
fresh interpreter. tests/core_only/check.py checks a real core-only environment.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from deepzero_oracle.apps.cli import main
from deepzero_oracle.extras import EXTRAS, MissingExtra, install_hint, require

ROOT = Path(__file__).resolve().parents[2]
#: The packages of each extra, by the top-level module they install.
EXTRA_MODULES = {
    "rest": ("starlette", "uvicorn", "orjson", "httpx"),
    "metrics": ("prometheus_client",),
    "dask": ("dask", "distributed"),
    "sim": ("phi", "phiml"),
    "apps": ("sklearn", "mlxtend", "matplotlib", "PIL"),
    "tensorboard": ("tensorboard",),
    "peers": ("nevergrad", "bayes_opt"),
}
NON_CORE = tuple(m for mods in EXTRA_MODULES.values() for m in mods) + ("pandas", "tritonclient")


def double(x):
    """A black box for ``serve``: ``x [N, ...] -> 2 x``."""
    return 2 * x


def block(monkeypatch, *names: str) -> None:
    """Make ``import name`` (and every submodule already loaded) fail in this test."""
    for name in names:
        for loaded in [m for m in sys.modules if m.startswith(name + ".")]:
            monkeypatch.setitem(sys.modules, loaded, None)
        monkeypatch.setitem(sys.modules, name, None)


def run_blocked(names, code: str, tmp_path) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where ``names`` cannot be imported."""
    prelude = f"import sys\nfor _m in {list(names)!r}:\n    sys.modules[_m] = None\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)


def assert_one_line_hint(err: str, extra: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert install_hint(extra) in lines[0] and "Traceback" not in err


# -- the helper -------------------------------------------------------------------------------------
def test_require_returns_the_module_or_names_the_extra():
    assert require("apps", "json") is sys.modules["json"]
    with pytest.raises(MissingExtra) as info:
        require("sim", "json", "no_such_module_here", feature="a test feature")
    err = info.value
    assert isinstance(err, ImportError) and err.extra == "sim" and err.name == "no_such_module_here"
    assert str(err) == ("missing the 'sim' extra for a test feature: pip install 'deepzero-oracle[sim]' "
                        "(no module no_such_module_here)")
    with pytest.raises(ValueError, match="unknown extra 'simulators'"):
        require("simulators", "json")


def test_every_extra_is_in_pyproject_and_in_all():
    tomllib = pytest.importorskip("tomllib")  # the standard library from Python 3.11
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras) == set(EXTRAS) | {"all", "docs", "test"} == set(EXTRA_MODULES) | {"all", "docs", "test"}
    assert extras["all"] == [f"deepzero-oracle[{','.join(EXTRAS)}]"]
    assert "deepzero-oracle[all,docs]" in extras["test"]


# -- the core: no extra -----------------------------------------------------------------------------
def test_the_engine_grpc_and_cli_import_without_any_extra(tmp_path):
    code = """
        import deepzero_oracle
        from deepzero_oracle import CGE, RGE, CallableOracle, ModuleOracle, Trainer
        from deepzero_oracle.blackbox import GrpcBlackBox, KServeBlackBox
        from deepzero_oracle.blackbox.spec import open_blackbox
        from deepzero_oracle.estimators import ChainRule
        from deepzero_oracle.parallel import ParallelOracle, open_executor
        from deepzero_oracle.server import serve_blackbox
        from deepzero_oracle.apps.cli import build_parser
        parser = build_parser()  # every subcommand registers
        assert parser.parse_args(["serve", "mod:f", "--port", "0"]).port == 0
        import torch
        est = CGE(mu=1e-4).estimate(CallableOracle(lambda t: float((t ** 2).sum()), 3, numpy=True),
                                    torch.ones(3, dtype=torch.float64))
        assert torch.allclose(est, 2 * torch.ones(3, dtype=torch.float64), atol=1e-3), est
        with serve_blackbox(lambda x: x + 1, model_name="inc") as server, \\
                open_blackbox(f"grpc://{server.address}/inc") as box:
            assert box(torch.zeros(2, 3)).tolist() == [[1.0] * 3] * 2
        print("core ok")
        import runpy
        sys.argv = ["deepzero-oracle", "--help"]
        runpy.run_module("deepzero_oracle", run_name="__main__")  # python -m deepzero_oracle --help
    """
    out = run_blocked(NON_CORE, code, tmp_path)
    assert out.returncode == 0, out.stderr
    assert "core ok" in out.stdout
    assert all(c in out.stdout for c in ("usage: deepzero-oracle", "train", "serve", "sol", "defense", "proto"))


# -- each extra's feature, with the extra missing ---------------------------------------------------
def test_sol_with_a_built_in_simulator_names_sim(monkeypatch, tmp_path, capsys):
    block(monkeypatch, *EXTRA_MODULES["sim"])
    for name in ("phiflow", "burgers", "wake2d"):  # the modules that import PhiFlow: imported afresh
        monkeypatch.delitem(sys.modules, f"deepzero_oracle.simulators.{name}", raising=False)
    assert main(["sol", "generate", "--out", str(tmp_path / "sol")]) == 2
    assert_one_line_hint(capsys.readouterr().err, "sim")


def test_defense_with_a_built_in_dataset_names_apps(monkeypatch, tmp_path, capsys):
    block(monkeypatch, "sklearn")
    assert main(["defense", "train", "--method", "zo-ds", "--dataset", "digits", "--out", str(tmp_path / "d"),
                 "--quiet"]) == 2
    assert_one_line_hint(capsys.readouterr().err, "apps")


def test_train_with_a_built_in_dataset_names_apps(monkeypatch, tmp_path, capsys):
    block(monkeypatch, "sklearn")
    assert main(["train", "--dataset", "digits", "--out", str(tmp_path / "t"), "--quiet"]) == 2
    assert_one_line_hint(capsys.readouterr().err, "apps")


def test_plots_name_apps(monkeypatch, tmp_path):
    from deepzero_oracle.apps.classify import plot_curves

    block(monkeypatch, "matplotlib")
    with pytest.raises(MissingExtra, match=r"pip install 'deepzero-oracle\[apps\]'"):
        plot_curves({"zo": [{"queries": 1, "epoch": 1, "test_accuracy": 0.5}]}, tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()


def test_image_folders_name_apps(monkeypatch, tmp_path):
    from deepzero_oracle.common.datasets import read_image_folder

    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "imgs" / cls / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    block(monkeypatch, "PIL")
    with pytest.raises(MissingExtra, match=r"deepzero-oracle\[apps\]"):
        read_image_folder(tmp_path / "imgs")


def test_rest_serve_names_rest(monkeypatch, capsys):
    block(monkeypatch, "starlette", "uvicorn")
    assert main(["serve", "test_extras:double", "--port", "0", "--http-port", "0"]) == 2
    assert_one_line_hint(capsys.readouterr().err, "rest")


def test_the_rest_client_names_rest(monkeypatch):
    from deepzero_oracle.blackbox import KServeBlackBox

    block(monkeypatch, "httpx")
    with pytest.raises(MissingExtra, match=r"deepzero-oracle\[rest\]"):
        KServeBlackBox("127.0.0.1:1", "m", protocol="rest")
    KServeBlackBox("127.0.0.1:1", "m", protocol="grpc").close()  # gRPC needs no extra


@pytest.mark.skipif(not (ROOT / "deepzero_oracle" / "server" / "metrics.py").exists(),
                    reason="the server has no metrics endpoint")
def test_metrics_port_names_metrics(monkeypatch, capsys):
    block(monkeypatch, "prometheus_client")
    assert main(["serve", "test_extras:double", "--port", "0", "--metrics-port", "0"]) == 2
    assert_one_line_hint(capsys.readouterr().err, "metrics")


def test_dask_executor_names_dask(monkeypatch, tmp_path, capsys):
    from deepzero_oracle.parallel import open_executor

    block(monkeypatch, "distributed", "dask")
    with pytest.raises(MissingExtra, match=r"deepzero-oracle\[dask\]"):
        with open_executor("dask-local:1"):
            pass
    assert main(["train", "--executor", "dask://127.0.0.1:8786", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert_one_line_hint(capsys.readouterr().err, "dask")


def test_tensorboard_logger_names_tensorboard(monkeypatch, tmp_path):
    from deepzero_oracle import TensorBoardLogger

    block(monkeypatch, "tensorboard")
    with pytest.raises(MissingExtra, match=r"pip install 'deepzero-oracle\[tensorboard\]'"):
        TensorBoardLogger(tmp_path / "tb")


# -- packaging ----------------------------------------------------------------------------------------
def test_proto_subcommand_prints_the_shipped_schema(capsys):
    assert main(["proto", "--path"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path.name == "oracle.proto" and path.read_text() == (ROOT / "protos" / "oracle.proto").read_text()
    assert main(["proto"]) == 0
    assert "service GRPCInferenceService" in capsys.readouterr().out


def test_every_package_folder_is_in_the_wheel():
    tomllib = pytest.importorskip("tomllib")
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {}
    for package, folder in sorted(setuptools["package-dir"].items()):
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            folders[".".join((package, *parts))] = init.parent
    assert set(setuptools["packages"]) == set(folders), "pyproject.toml's packages = [...] misses a folder"
    assert (ROOT / "deepzero_oracle" / "wire" / "oracle.proto").resolve() == (ROOT / "protos" / "oracle.proto")


def test_package_is_typed():
    import deepzero_oracle

    assert (Path(deepzero_oracle.__file__).parent / "py.typed").is_file()


PUBLIC_PACKAGES = ("deepzero_oracle", "deepzero_oracle.estimators", "deepzero_oracle.parallel",
                   "deepzero_oracle.blackbox", "deepzero_oracle.server", "deepzero_oracle.fastpath",
                   "deepzero_oracle.extras", "deepzero_oracle.adapters.sol", "deepzero_oracle.simulators")
_DUNDERS = ("__call__", "__enter__", "__exit__", "__iter__", "__len__")


def test_the_public_api_has_return_annotations():
    import importlib

    missing = []
    for package in PUBLIC_PACKAGES:
        module = importlib.import_module(package)
        for name in module.__all__:
            obj = getattr(module, name)
            members = [(name, obj)] if inspect.isfunction(obj) else []
            if inspect.isclass(obj) and obj.__module__.startswith("deepzero_oracle"):
                for attr, value in vars(obj).items():
                    fn = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
                    if inspect.isfunction(fn) and (not attr.startswith("_") or attr in _DUNDERS):
                        members.append((f"{name}.{attr}", fn))
            missing += [f"{package}.{n}" for n, fn in members if "return" not in fn.__annotations__]
    assert not missing, "no return annotation: " + ", ".join(sorted(set(missing)))
