"""The layout's rules, read from the code: which room may import which, no import cycle, no long
function. A rule broken fails here with the module and the line that broke it.

    imgcls         imports nothing of hpo, optuna, mlflow or ray
    hpo.config     plain data: no backend (hpo.search, ray), no MLflow, no torch; optuna only
                   inside a function (the space's conversion to Optuna's distributions)
    hpo.tracking   imports nothing of hpo but hpo.config
    hpo.after      never imports hpo.search
    mlflow         imported only by hpo.tracking and the served model (hpo.after.serving)
    ray            imported only by the Ray backend
    cycles         none among the modules of hpo and imgcls, imports inside functions counted
    functions      no body over 80 lines

Imports under `if TYPE_CHECKING:` count like any other: a type is a dependency too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
MAX_BODY_LINES = 80


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. hpo.search.trial
    target: str  # what it imports, e.g. hpo.tracking.runs or torch.nn
    line: int
    top_level: bool  # at module level (or in a class body, or under if TYPE_CHECKING)

    def __str__(self) -> str:
        return f"{self.module}:{self.line} imports {self.target}"


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of hpo and imgcls by dotted name (a package by its own name)."""
    found = {}
    for package in ("hpo", "imgcls"):
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports(name: str, path: Path) -> Iterator[Import]:
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    inside: set[int] = set()  # ids of the import nodes within a function
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            inside |= {id(n) for n in ast.walk(node) if isinstance(n, ast.Import | ast.ImportFrom)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(name, alias.name, node.lineno, id(node) not in inside)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            yield Import(name, source, node.lineno, id(node) not in inside)
            for alias in node.names:  # `from hpo.search import trial` imports a module too
                yield Import(name, f"{source}.{alias.name}", node.lineno, id(node) not in inside)


def every_import(root: Path = ROOT) -> list[Import]:
    return [imp for name, path in modules(root).items() for imp in imports(name, path)]


def within(target: str, *packages: str) -> bool:
    return any(target == p or target.startswith(p + ".") for p in packages)


def violations(found: list[Import]) -> list[str]:
    """Each import that breaks a rule of the module docstring, as one line."""
    problems = []
    for imp in found:
        source, target = imp.module, imp.target
        if within(source, "imgcls") and within(target, "hpo", "optuna", "mlflow", "ray"):
            problems.append(f"{imp}: imgcls knows nothing of the search layer")
        if within(source, "hpo.config"):
            if within(target, "hpo.search", "hpo.tracking", "hpo.after", "hpo.cli", "mlflow",
                      "ray", "torch", "torchvision"):
                problems.append(f"{imp}: hpo.config is plain data, with no backend or torch")
            elif within(target, "optuna") and imp.top_level:
                problems.append(f"{imp}: hpo.config imports optuna only inside a function")
        if within(source, "hpo.tracking") and within(target, "hpo") and not within(
                target, "hpo.config", "hpo.tracking"):
            problems.append(f"{imp}: hpo.tracking builds on hpo.config only")
        if within(source, "hpo.after") and within(target, "hpo.search"):
            problems.append(f"{imp}: what comes after a search never imports it")
        if within(target, "mlflow") and not within(source, "hpo.tracking", "hpo.after.serving"):
            problems.append(f"{imp}: only hpo.tracking (and the served model) import mlflow")
        if within(target, "ray") and not within(source, "hpo.search.backends.ray"):
            problems.append(f"{imp}: only the Ray backend imports ray")
    return problems


def cycles(found: list[Import], names: set[str]) -> list[list[str]]:
    """The import cycles among `names` (strongly connected components of more than one module),
    a module's imports of the packages that contain it left out (no dependency on itself)."""
    edges: dict[str, set[str]] = {n: set() for n in names}
    for imp in found:
        if imp.target in names and imp.target != imp.module \
                and not imp.module.startswith(imp.target + "."):
            edges[imp.module].add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found_cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found_cycles.append(sorted(component))

    for name in sorted(names):
        if name not in index:
            visit(name)
    return found_cycles


def long_functions(root: Path = ROOT) -> list[str]:
    long = []
    for path in modules(root).values():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.body[0].lineno + 1  # type: ignore[operator]
                if lines > MAX_BODY_LINES:
                    long.append(f"{path.relative_to(root)}:{node.lineno} {node.name}: "
                                f"{lines} lines")
    return long


def test_each_room_imports_only_what_the_layout_allows() -> None:
    problems = violations(every_import())
    assert not problems, "\n".join(problems)


def test_no_import_cycle_in_hpo_or_imgcls() -> None:
    found = cycles(every_import(), set(modules()))
    assert not found, "\n".join(" -> ".join(cycle) for cycle in found)


def test_no_function_body_is_over_80_lines() -> None:
    long = long_functions()
    assert not long, "\n".join(long)


def test_the_rules_catch_what_they_forbid(tmp_path: Path) -> None:
    # a tree that breaks each rule once: the checks above would fail on it
    files = {
        "imgcls/__init__.py": "",
        "imgcls/train.py": "import mlflow\n",
        "hpo/__init__.py": "",
        "hpo/config/__init__.py": "",
        "hpo/config/space.py": "import optuna\nimport torch\n\ndef f():\n    import optuna\n",
        "hpo/after/__init__.py": "",
        "hpo/after/results.py": "def f():\n    from hpo.search import run\n",
        "hpo/search/__init__.py": "",
        "hpo/search/run.py": "from hpo.search import trial\n",
        "hpo/search/trial.py": "def g():\n    from hpo.search import run\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "hpo/cli.py").write_text("def main():\n" + "    x = 1\n" * 81)
    found = every_import(tmp_path)
    problems = violations(found)
    assert any("imgcls.train:1 imports mlflow" in p for p in problems)
    assert any("hpo.config.space:1 imports optuna: hpo.config imports optuna only" in p
               for p in problems)
    assert any("hpo.config.space:2 imports torch" in p for p in problems)
    assert not any("hpo.config.space:5" in p for p in problems)  # inside a function: allowed
    assert any("hpo.after.results:2 imports hpo.search" in p for p in problems)
    assert cycles(found, set(modules(tmp_path))) == [["hpo.search.run", "hpo.search.trial"]]
    assert long_functions(tmp_path) == ["hpo/cli.py:1 main: 81 lines"]


def _loaded_after(code: str) -> set[str]:
    """The heavy libraries a fresh interpreter has loaded after running `code`."""
    probe = (f"{code}\nimport sys\n"
             "print(' '.join(m for m in ('torch', 'torchvision', 'optuna', 'mlflow', 'ray', "
             "'sklearn', 'matplotlib', 'plotly') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    return set(out.stdout.split())


@pytest.mark.parametrize(("code", "allowed"), [
    ("import hpo, hpo.config, hpo.search, hpo.tracking, hpo.after", set()),
    ("import hpo.cli", set()),  # what `imgcls-hpo --help` pays for
    ("from hpo.config import load_study; load_study('digits')", set()),  # a study validated
    ("import imgcls.models.catalog, imgcls.profile", set()),  # what `imgcls-hpo models` needs
])
def test_light_modules_stay_light(code: str, allowed: set[str]) -> None:
    loaded = _loaded_after(code) - allowed
    assert not loaded, f"{code!r} loads {', '.join(sorted(loaded))}"
