"""The project's structure, checked: layers, one-way imports, one owner per outside library,
small modules, experiments kept out of the libraries.

Imports are read from the source (every `import` statement, also those inside functions), so a
cycle hidden in a function body is found as surely as one at the top of a module.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIBRARIES = ("cardiac_core", "tavr_jax", "perfusion")
PACKAGES = [*LIBRARIES, "cardiac_web", "experiments"]
MAX_LINES = 600

# The layers, bottom first: a module may import its own layer and the layers below it. The
# first prefix that matches a module names its layer; tavr_jax's root modules (schema, config,
# the reporting rule, metrics, drawing) are its floor.
LAYERS = [
    ("cardiac_core", 0),
    ("tavr_jax.data", 2),
    ("tavr_jax.models", 2),
    ("tavr_jax.run", 3),
    ("tavr_jax.training", 4),
    ("tavr_jax.infer", 4),
    ("tavr_jax", 1),
    ("perfusion", 1),
    ("cardiac_web", 5),
    ("experiments", 6),
]

# Library modules that nothing else in the libraries imports, each a documented command's
# library call (a launcher in experiments/ or the web page calls it). A new module that only
# experiments use belongs in experiments/, not here.
ENTRY_MODULES = {
    "tavr_jax.training.train": "tavr_train",
    "tavr_jax.training.refiner": "tavr_refine",
    "tavr_jax.data.stats": "data_stats",
    "tavr_jax.data.simulate": "make_tavr_data",
    "tavr_jax.infer.outputs": "tavr_infer",
    "tavr_jax.infer.evaluate": "tavr_eval",
    "tavr_jax.infer.live": "tavr_live and the web page's Live tab",
    "perfusion.simulate": "make_perfusion_data",
    "perfusion.analyze": "perfusion_fit, perfusion_analyze and the web page",
    "perfusion.clinical_cv": "perfusion_cv --model=clinical",
}

# Each outside library is imported by one module of the libraries or the web page (tests,
# launchers, studies and benchmarks may import what they like).
OWNERS = {
    "orbax": {"tavr_jax.run.checkpoint"},
    "pydicom": {"cardiac_core.dicom"},
    "grain": {"tavr_jax.data.pipeline"},
    "ml_collections": {"tavr_jax.config"},
    "tensorflow_datasets": {"tavr_jax.data.records"},
    "array_record": {"tavr_jax.data.records"},
    "sklearn": {"perfusion.classifiers"},
    "xgboost": {"perfusion.classifiers"},
    "PIL": {"cardiac_core.images"},
    "onnx": {"tavr_jax.infer.onnx_export"},
    "onnxruntime": {"tavr_jax.infer.onnx_runtime"},
    "openvino": {"tavr_jax.infer.openvino_runtime"},
    "nncf": {"tavr_jax.infer.openvino_runtime"},  # OpenVINO's int8 quantiser
    "fastapi": {"cardiac_web.app", "cardiac_web.live"},
    "tensorboardX": {"tavr_jax.training.train"},
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
        users = {
            m
            for m, (_, outside) in graph.items()
            if library in outside and m.split(".")[0] != "experiments"
        }
        assert users <= owners, f"{library} is imported by {sorted(users - owners)}"


def test_library_modules_stay_small():
    long = {
        str(p.relative_to(ROOT)): n
        for name, p in _modules().items()
        if name.split(".")[0] != "experiments"
        and (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def _layer(module: str) -> int:
    return next(
        rank for prefix, rank in LAYERS if module == prefix or module.startswith(prefix + ".")
    )


def test_no_module_imports_a_layer_above_it(graph):
    upward = [
        f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
        for m, (targets, _) in graph.items()
        for t in targets
        if _layer(t) > _layer(m)
    ]
    assert not upward, "\n".join(upward)


def test_training_and_inference_do_not_import_each_other(graph):
    crossing = [
        f"{m} imports {t}"
        for m, (targets, _) in graph.items()
        for t in targets
        for a, b in (
            ("tavr_jax.training", "tavr_jax.infer"),
            ("tavr_jax.infer", "tavr_jax.training"),
        )
        if m.startswith(a) and t.startswith(b)
    ]
    assert not crossing, crossing


def test_the_two_systems_share_only_the_core(graph):
    for system, other in (("perfusion", "tavr_jax"), ("tavr_jax", "perfusion")):
        users = {m for m, (targets, _) in graph.items() if m.startswith(system)
                 and any(t.split(".")[0] == other for t in targets)}  # fmt: skip
        assert not users, f"{sorted(users)} import {other}"
    core = {t for m, (targets, _) in graph.items() if m.startswith("cardiac_core") for t in targets}
    assert all(t.startswith("cardiac_core") for t in core), core


def test_no_library_module_is_used_only_by_experiments(graph):
    users: dict[str, set[str]] = {m: set() for m in graph}
    for m, (targets, _) in graph.items():
        for t in targets:
            users[t].add(m)
    packages = {m for m, path in _modules().items() if path.name == "__init__.py"}
    orphans = []
    for m in graph:
        if m.split(".")[0] not in LIBRARIES or m in ENTRY_MODULES or m in packages:
            continue
        if not {u for u in users[m] if u.split(".")[0] != "experiments"}:
            orphans.append(m)
    assert not orphans, f"used only by experiments/ (move them there): {orphans}"
    assert set(ENTRY_MODULES) <= set(graph), set(ENTRY_MODULES) - set(graph)


def test_no_import_path_edits_in_launchers_or_tests():
    """The project is installed (editable), so `experiments` and the libraries import as
    packages; a path edit would hide a missing install step."""
    scripts = [*(ROOT / "experiments").glob("*.py"), *(ROOT / "tests").glob("*.py")]
    edits = [
        str(p.relative_to(ROOT))
        for p in scripts
        if p.name != "test_structure.py"
        and any(word in p.read_text() for word in ("sys.path", "PYTHONPATH"))
    ]
    assert not edits, edits
