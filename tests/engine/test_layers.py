"""The layering docs/ARCHITECTURE.md's file map describes: imports point down.

The engine (everything in deepzero_oracle/ except apps/ and common/) never imports the app layer
(deepzero_oracle.apps), the shared room (deepzero_oracle.common), the adapters or the
simulators; the adapters and common/ never import the app layer and use only the engine's
public names (``public_name_problem`` defines them); the app layer's modules do not import one
another in a cycle; and no module imports a private name from another module.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "deepzero_oracle"
FORBIDDEN_IN_ENGINE = ("deepzero_oracle.apps", "deepzero_oracle.common", "deepzero_oracle.adapters",
                       "deepzero_oracle.simulators", "adapters", "simulators")
# above the engine: not bound by its public API (they are the ones checked against it)
NOT_ENGINE = ("deepzero_oracle.apps", "deepzero_oracle.common", "deepzero_oracle.adapters",
              "deepzero_oracle.simulators")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[str, list[str]]]:
    """``(module imported, names imported from it)`` for every import statement in a file,
    relative imports resolved against the file's package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.append((base, [alias.name for alias in node.names]))
    return found


def engine_files() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py")
            if not {"apps", "common", "wire"} & set(p.relative_to(PACKAGE).parts)]


def client_files() -> list[Path]:
    """The modules held to the engine's public API: the adapters and deepzero_oracle/common/."""
    return sorted((ROOT / "adapters").rglob("*.py")) + sorted((PACKAGE / "common").rglob("*.py"))


def _within(module: str, packages) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def is_engine_module(module: str) -> bool:
    return _within(module, ("deepzero_oracle",)) and not _within(module, NOT_ENGINE)


def public_module_problem(module: str) -> str | None:
    """Why the engine module ``module`` is not public, or None: a public module has no dotted part
    starting with an underscore and is documented (a module docstring)."""
    if any(part.startswith("_") for part in module.split(".")):
        return "a private module"
    if not importlib.import_module(module).__doc__:
        return "an undocumented module (no docstring)"
    return None


def public_name_problem(module: str, name: str) -> str | None:
    """Why ``from module import name`` (``module`` in the engine) uses no public name, or None.

    Public: ``module`` is public (``public_module_problem``) and ``name`` is in its ``__all__``;
    for a module without ``__all__``, any name without a leading underscore; a public submodule
    of a package (``from deepzero_oracle.parallel import fanout``) is public too.
    """
    problem = public_module_problem(module)
    if problem:
        return problem
    exported = getattr(importlib.import_module(module), "__all__", None)
    if exported is not None and name in exported:
        return None
    if exported is None and not name.startswith("_"):
        return None
    try:
        importlib.import_module(f"{module}.{name}")
    except ImportError:
        return "not in its __all__" if exported is not None else "a private name"
    return public_module_problem(f"{module}.{name}")


def test_the_engine_never_imports_apps_adapters_or_simulators():
    offenders = []
    for path in engine_files():
        for module, _ in imports_of(path):
            if any(module == bad or module.startswith(bad + ".") for bad in FORBIDDEN_IN_ENGINE):
                offenders.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not offenders, "\n".join(offenders)
    assert len(engine_files()) > 15  # the walk found the engine


def test_importing_the_engine_loads_no_app_adapter_or_simulator_module():
    code = ("import sys, deepzero_oracle, deepzero_oracle.train, deepzero_oracle.parallel; "
            "print('\\n'.join(m for m in sys.modules if m.startswith(('deepzero_oracle.apps', "
            "'deepzero_oracle.common', 'deepzero_oracle.adapters', 'deepzero_oracle.simulators'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == ""


def test_adapters_and_common_never_import_the_app_layer():
    offenders = []
    for path in client_files():
        for module, _ in imports_of(path):
            banned = ("deepzero_oracle.apps",) + (("deepzero_oracle.adapters", "adapters")
                                                  if "common" in path.parts else ())
            if _within(module, banned):
                offenders.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not offenders, "\n".join(offenders)
    assert len(client_files()) > 20  # the walk found the adapters and common/


def test_adapters_and_common_use_only_the_engines_public_names():
    offenders, checked = [], 0
    for path in client_files():
        for module, names in imports_of(path):
            if not is_engine_module(module):
                continue
            checked += 1
            for name in names or [None]:  # `import deepzero_oracle.x`: the module itself
                problem = public_module_problem(module) if name is None else public_name_problem(module, name)
                if problem:
                    what = f"import {module}" if name is None else f"from {module} import {name}"
                    offenders.append(f"{path.relative_to(ROOT)}: {what}: {problem}")
    assert not offenders, "the engine's public API is its modules' __all__:\n" + "\n".join(offenders)
    assert checked > 30  # the walk found the adapters' engine imports


def test_public_name_rule_tells_public_from_private():
    assert public_name_problem("deepzero_oracle.parallel", "map_ordered") is None
    assert public_name_problem("deepzero_oracle.parallel", "fanout") is None  # a public submodule
    assert public_name_problem("deepzero_oracle.parallel.payloads", "_resolve") == "not in its __all__"
    assert public_name_problem("deepzero_oracle.blackbox.local", "BlackBoxError") == "not in its __all__"
    assert public_name_problem("deepzero_oracle.pruning", "_check_sparsity") == "a private name"  # no __all__ there
    assert public_module_problem("deepzero_oracle.parallel._private") == "a private module"


def test_no_private_name_is_imported_from_another_module():
    offenders = []
    for path in list(PACKAGE.rglob("*.py")) + list((ROOT / "adapters").rglob("*.py")) + list(
            (ROOT / "simulators").rglob("*.py")):
        if "wire" in path.parts:
            continue
        for module, names in imports_of(path):
            if not module.startswith(("deepzero_oracle", "adapters", "simulators")):
                continue  # other libraries' internals are their business (pinned where used)
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private or any(part.startswith("_") and not part.startswith("__") for part in module.split(".")):
                offenders.append(f"{path.relative_to(ROOT)}: from {module} import {', '.join(names)}")
    assert not offenders, "\n".join(offenders)


def test_app_layer_modules_import_each_other_without_cycles():
    apps = {module_name(p): p for p in (PACKAGE / "apps").rglob("*.py")}
    assert "deepzero_oracle.apps.bench.command" in apps  # the walk reaches the subpackages

    def targets(imp, names):  # `from .pkg import mod` imports the submodule pkg.mod
        return {imp} | {f"{imp}.{n}" for n in names}

    graph = {m: {t for imp, names in imports_of(p) for t in targets(imp, names) if t in apps and t != m}
             for m, p in apps.items()}

    def reaches(start, target, seen=()):
        return any(n == target or (n not in seen and reaches(n, target, seen + (n,))) for n in graph[start])

    cycles = [m for m in graph if reaches(m, m)]
    assert not cycles, f"import cycles through {cycles}"


def test_no_library_code_selects_a_matplotlib_backend():
    """Plots use matplotlib's object API (Figure + savefig), so importing or calling our code
    never changes the backend of the user's process."""
    sources = [p for folder in ("deepzero_oracle", "adapters", "simulators") for p in (ROOT / folder).rglob("*.py")]
    offenders = [str(p.relative_to(ROOT)) for p in sources if "matplotlib.use(" in p.read_text()
                 or "import matplotlib.pyplot" in p.read_text()]
    assert not offenders, offenders
