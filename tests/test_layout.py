"""The shape of the package: layers that import only downward, no import circles (function-level imports
included), no import of configs/, no module over 500 lines."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "auxmtl_jax"

# Top to bottom; a module may import its own layer (without circles) and the layers below it.
LAYERS = (
    ("programs",),
    ("experiments",),
    ("nas",),
    ("training",),
    ("inference", "pretrained"),
    ("analysis",),
    ("models", "weighting", "input_pipeline", "input_sizing", "checkpoint", "workdir"),
    ("metrics", "comparison", "variants", "augment"),
    ("tasks", "geometry", "parallel", "reporting", "disk", "coordination", "errors"),
)
MAX_LINES = 500


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imported_modules(path: pathlib.Path) -> set[str]:
    """Every auxmtl_jax module `path` imports, at any depth of the file; `from pkg import sub` counts as `pkg.sub`
    when `sub` is a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in MODULES else node.module)
    return {name for name in found if name.split(".")[0] in ("auxmtl_jax", "auxmtl_configs")}


GRAPH = {name: imported_modules(path) - {name} for name, path in MODULES.items()}


def layer_of(module: str) -> int:
    part = module.split(".")[1] if "." in module else ""
    for index, names in enumerate(LAYERS):
        if part in names:
            return index
    raise AssertionError(f"{module} is in no layer of LAYERS; add it")


def test_every_module_sits_in_a_layer_and_imports_only_its_own_or_lower_layers():
    upward = [f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
              for module, targets in GRAPH.items() if module != "auxmtl_jax"
              for target in targets if target != "auxmtl_jax" and not target.startswith("auxmtl_configs")
              and layer_of(target) < layer_of(module)]
    assert not upward, "\n".join(upward)


def test_no_import_circles():
    """Tarjan's strongly connected components over module -> imported module; a package's __init__ importing
    its own submodules (re-exports) is not an edge back."""
    def edges(module):
        return [target for target in GRAPH[module] if target in GRAPH
                and not (MODULES[module].name == "__init__.py" and target.startswith(module + "."))]

    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(module):
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in edges(module):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in GRAPH:
        if module not in index:
            visit(module)
    assert not circles, circles


def test_the_library_never_imports_configs():
    offenders = [module for module, targets in GRAPH.items() if any(t.startswith("auxmtl_configs") for t in targets)]
    assert not offenders, offenders


def test_no_module_over_500_lines():
    long = {name: count for name, path in MODULES.items() if (count := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_test_module_names_are_unique():
    """Every test folder is on sys.path (conftest.py), so two test files with one basename collide at collection."""
    names = [path.name for path in (ROOT / "tests").rglob("test_*.py")]
    assert sorted({name for name in names if names.count(name) > 1}) == []
