"""The package's layers (docs/architecture.md): imports go one way, there are no cycles, and every module
or file that a string names (a boot string, a preload list, dagster.yaml, workspace.yaml, pyproject.toml,
the docs) exists. Read from the source with ``ast``: nothing here imports the project's heavy modules."""
from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "curator_assets"

# Which layer a module belongs to (first matching prefix) and the layers it may import.
LAYERS = [
    ("curator_assets.formats", "formats"),
    ("curator_assets.store", "store"),
    ("curator_assets.steps", "steps"),
    ("curator_assets.decode", "api"),  # the public Python API: re-exports of steps.decode
    ("curator_assets.defs", "defs"),
    ("curator_assets.definitions", "defs"),
    ("curator_assets.cli", "cli"),
    ("curator_assets.launcher", "instance"),
    ("curator_assets.instance_storage", "instance"),
    ("curator_assets.warm_preload", "instance"),
    ("curator_assets.instance", "instance"),
    ("curator_assets", "root"),
]
MAY_IMPORT = {
    "formats": {"formats"},
    "store": {"store"},
    "steps": {"formats", "store", "steps"},
    "api": {"steps"},
    "defs": {"formats", "store", "steps", "api", "defs"},
    "cli": {"formats", "store", "steps", "api", "defs", "cli"},
    # the single-machine instance parts: reached through dagster.yaml and strings; nothing imports them
    "instance": {"formats", "store", "steps", "api", "defs", "cli", "instance", "root"},
    "root": {"root"},
}


def layer_of(module: str) -> str:
    for prefix, layer in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return layer
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS and docs/architecture.md")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(name: str) -> str | None:
    """The project module ``name`` is, or the one that defines it (``pkg.mod.Name`` -> ``pkg.mod``)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str) -> set[str]:
    """Project modules that ``module`` imports, at any depth of its code (lazy imports included)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for name in names:
            if name == "curator_assets" or name.startswith("curator_assets."):
                target = resolve(name)
                if target and target != module and target != "curator_assets":
                    found.add(target)
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_module_has_a_layer():
    assert {m: layer_of(m) for m in MODULES}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down(module):
    mine = layer_of(module)
    wrong = sorted(t for t in GRAPH[module] if layer_of(t) not in MAY_IMPORT[mine])
    assert not wrong, f"{module} ({mine}) may import only {sorted(MAY_IMPORT[mine])}, but imports {wrong}"


def step_kind(module: str) -> str:
    """steps.decode.shard -> decode, steps.validate_fast -> validate, steps.index -> index."""
    return module.split(".")[2].split("_")[0]


# Export is the one step that composes others: for a shard with no stored report or manifest it
# validates or decodes it itself (and reads error codes as the summary does).
COMPOSES = {"export": {"validate", "decode", "summary"}}
# What every step reads of a shard (its info, index, stored report), loaded once per step: no step of its own.
SHARED = {"state"}


def test_steps_talk_only_through_reports_and_manifests():
    """A step of one kind (index, validate, decode, summary) imports no step of another kind: it reads
    what another step stored through formats/ (the report, the manifest). Export is the exception above."""
    crossing = sorted(f"{m} -> {t}" for m, ts in GRAPH.items() if layer_of(m) == "steps" for t in ts
                      if layer_of(t) == "steps" and step_kind(t) != step_kind(m)
                      and step_kind(t) not in COMPOSES.get(step_kind(m), ()) and step_kind(t) not in SHARED)
    assert crossing == []


def test_nothing_imports_the_instance_parts():
    users = sorted(f"{m} -> {t}" for m, ts in GRAPH.items() for t in ts
                   if layer_of(t) == "instance" and layer_of(m) != "instance")
    assert not users


def test_no_import_cycles():
    """Depth-first search over the whole graph (lazy imports count: a cycle through a function-level
    import is still two modules that cannot be understood one without the other)."""
    # A package's __init__ that lazily hands out its own submodules is not a cycle with them.
    graph = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_layer_test_sees_a_wrong_import():
    """The checker itself: a formats module that imported the store would be reported."""
    assert "store" not in MAY_IMPORT[layer_of("curator_assets.formats.idx")]
    assert layer_of(resolve("curator_assets.store.dataset.Dataset")) == "store"
    assert missing("curator_assets.no_such_module") is not None
    assert missing("curator_assets.steps.decode.worker.no_such_name") is not None
    assert missing("curator_assets.steps.decode.worker.zygote") is None


# ---------------------------------------------------------------------------------------------
# Module names and file paths held in strings


def top_level_names(module: str) -> set[str]:
    tree = ast.parse(MODULES[module].read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
    names.update(m.rpartition(".")[2] for m in MODULES if m.rpartition(".")[0] == module)  # submodules
    return names


def missing(dotted: str) -> str | None:
    """Why ``dotted`` (a module, or a module's top-level name) names nothing, or None."""
    module = resolve(dotted)
    if module is None:
        return f"{dotted}: no such module"
    rest = dotted[len(module) + 1:].split(".")[0] if dotted != module else ""
    if rest and not rest.startswith("__") and rest not in top_level_names(module):
        return f"{dotted}: {module} defines no {rest!r}"
    return None


def string_value(module: str, name: str):
    for node in ast.parse(MODULES[module].read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{module} has no {name}")


def test_worker_boot_string_names_real_modules():
    boot = string_value("curator_assets.steps.decode.worker", "_BOOT")
    named = re.findall(r"from (curator_assets[\w.]*) import (\w+)", boot)
    assert named, boot
    for module, name in named:
        assert missing(f"{module}.{name}") is None, boot


def test_tests_find_the_zygote_by_its_boot_string():
    """The test helper that finds decoder processes by command line matches the worker's boot string."""
    from curator_assets_tests.decoder_processes import ZYGOTE_MARK

    assert ZYGOTE_MARK.decode() in string_value("curator_assets.steps.decode.worker", "_BOOT")


def instance_value(name: str):
    """The value of ``name`` as the instance parts assign it (in whichever of their modules)."""
    for module in sorted(m for m in MODULES if layer_of(m) == "instance"):
        for node in ast.parse(MODULES[module].read_text()).body:
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
                return ast.literal_eval(node.value)
    raise AssertionError(f"no instance module assigns {name}")


def test_preload_lists_name_real_modules():
    preload = [m for m in instance_value("MODULES") if m.startswith("curator_assets")]
    preload.append(instance_value("DEFINITIONS_MODULE"))
    launcher = [*instance_value("DEFAULT_MODULES"), *instance_value("DEFAULT_PRELOAD")]
    assert preload and launcher
    assert [m for m in preload + launcher if m not in MODULES] == []


def yaml_classes(doc) -> list[tuple[str, str]]:
    found = []
    if isinstance(doc, dict):
        if isinstance(doc.get("module"), str) and isinstance(doc.get("class"), str):
            found.append((doc["module"], doc["class"]))
        for v in doc.values():
            found += yaml_classes(v)
    elif isinstance(doc, list):
        for v in doc:
            found += yaml_classes(v)
    return found


DAGSTER_YAMLS = sorted(str(p.relative_to(REPO)) for pattern in ("dagster.yaml", "deploy/*/dagster.yaml")
                       for p in REPO.glob(pattern))


@pytest.mark.parametrize("config", DAGSTER_YAMLS)
def test_dagster_yaml_class_paths_exist(config):
    pairs = [(m, c) for m, c in yaml_classes(yaml.safe_load((REPO / config).read_text()))
             if m.startswith("curator_assets")]
    if config == "dagster.yaml":
        assert pairs, "the local instance names the project's launcher and storage"
    assert [f"{m}.{c}" for m, c in pairs if missing(f"{m}.{c}")] == []


def test_code_locations_and_entry_points_exist():
    workspace = yaml.safe_load((REPO / "workspace.yaml").read_text())
    locations = [e["python_module"]["module_name"] for e in workspace["load_from"]]
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    scripts = pyproject["project"]["scripts"]
    named = [*locations, pyproject["tool"]["dagster"]["module_name"],
             *(v.replace(":", ".") for v in scripts.values())]
    assert locations and scripts
    assert [n for n in named if missing(n)] == []


TEXT_FILES = sorted(
    p for pattern in ("curator_assets/**/*.py", "curator_assets_tests/*.py", "benchmarks/*.py", "benchmarks/*.md",
                      "docs/*.md", "deploy/**/*.yaml", "deploy/**/*.sh", "scripts/*.sh", "*.md", "*.toml", "*.yaml")
    for p in REPO.glob(pattern)
    if p.name != Path(__file__).name  # this file holds example names on purpose
)
DOTTED = re.compile(r"(?<![\w.])curator_assets(?:\.[A-Za-z_]\w*)+")
PATH = re.compile(r"(?<![\w/])curator_assets/[\w/]*\w\.py\b")
FROM = re.compile(r"from (curator_assets(?:\.\w+)*) import (?:\(([^)]*)\)|([\w ,]+))")


def test_every_module_name_and_path_in_a_string_exists():
    """Every ``curator_assets.x.y``, ``from curator_assets.x import y`` and ``curator_assets/x/y.py``
    written anywhere in the repo (code, strings, docs, YAML) names a module, or a name that module
    defines, that exists."""
    assert TEXT_FILES
    wrong = []
    for path in TEXT_FILES:
        text = path.read_text(errors="replace")
        for m in DOTTED.finditer(text):
            why = missing(m.group(0))
            if why:
                wrong.append(f"{path.relative_to(REPO)}: {why}")
        for m in FROM.finditer(text):  # imports in code, in strings of code and in the docs' examples
            names = re.sub(r"#[^\n]*", "", m.group(2) or m.group(3)).split(",")
            for name in (" ".join(n.split()).split(" as ")[0] for n in names):
                why = name and missing(f"{m.group(1)}.{name}")
                if why:
                    wrong.append(f"{path.relative_to(REPO)}: {why}")
        for m in PATH.finditer(text):
            if not (REPO / m.group(0)).is_file():
                wrong.append(f"{path.relative_to(REPO)}: {m.group(0)}: no such file")
    assert wrong == []
