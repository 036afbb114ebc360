"""The layering docs/ARCHITECTURE.md's file map describes: imports point down.

The engine (everything in deepzero_oracle/ except apps/) never imports the app layer
(deepzero_oracle.apps), the adapters or the simulators; the app layer's modules do not import
one another in a cycle; and no module imports a private name from another module.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "deepzero_oracle"
FORBIDDEN_IN_ENGINE = ("deepzero_oracle.apps", "deepzero_oracle.adapters", "deepzero_oracle.simulators",
                       "adapters", "simulators")


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
    return [p for p in PACKAGE.rglob("*.py") if "apps" not in p.relative_to(PACKAGE).parts
            and "wire" not in p.relative_to(PACKAGE).parts]


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
            "'deepzero_oracle.adapters', 'deepzero_oracle.simulators'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == ""


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
    apps = {module_name(p): p for p in (PACKAGE / "apps").glob("*.py")}
    graph = {m: {imp for imp, _ in imports_of(p) if imp in apps and imp != m} for m, p in apps.items()}

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
