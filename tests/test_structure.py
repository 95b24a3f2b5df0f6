"""The project's structure, checked: one-way imports, one owner per outside library, small modules.

Imports are read from the source (every `import` statement, also those inside functions), so a
cycle hidden in a function body is found as surely as one at the top of a module.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = [p for p in ("tavr_jax", "perfusion", "cardiac_web") if (ROOT / p).is_dir()]
MAX_LINES = 600

# Each outside library is imported by one module of the library (tests, launchers and
# benchmarks may import what they like).
OWNERS = {
    "orbax": {"tavr_jax.checkpoint"},
    "pydicom": {"tavr_jax.dicom"},
    "grain": {"tavr_jax.data.pipeline"},
    "ml_collections": {"tavr_jax.config"},
    "tensorflow_datasets": {"tavr_jax.data.records"},
    "array_record": {"tavr_jax.data.records"},
    "sklearn": {"perfusion.classifiers"},
    "xgboost": {"perfusion.classifiers"},
    "PIL": {"tavr_jax.images"},
    "onnx": {"tavr_jax.infer.onnx_export"},
    "onnxruntime": {"tavr_jax.infer.onnx_runtime"},
    "fastapi": {"cardiac_web.app"},
    "tensorboardX": {"tavr_jax.train"},
    "torch": {"tavr_jax.models.convert"},  # reads .pth files when torch is installed
}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(path: pathlib.Path, name: str, modules) -> tuple[set[str], set[str]]:
    """(project modules, top-level outside libraries) imported anywhere in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    project, outside = set(), set()

    def add(target: str) -> None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            project.add(target)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                (add if alias.name.split(".")[0] in PACKAGES else outside.add)(
                    alias.name if alias.name.split(".")[0] in PACKAGES else alias.name.split(".")[0]
                )
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            if base.split(".")[0] not in PACKAGES:
                outside.add(base.split(".")[0])
                continue
            for alias in node.names:  # `from pkg import submodule` names the submodule
                add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return project, outside


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def test_no_import_cycles_counting_imports_inside_functions(graph):
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node][0]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_each_outside_library_has_one_owner(graph):
    for library, owners in OWNERS.items():
        users = {m for m, (_, outside) in graph.items() if library in outside}
        assert users <= owners, f"{library} is imported by {sorted(users - owners)}"


def test_library_modules_stay_small():
    long = {
        str(p.relative_to(ROOT)): n
        for p in _modules().values()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"
