"""The layers point one way (issue 24): data → models → diffusion → runs → sampling → training
→ report/CLI, with the shared low-level modules (config, I/O, backends, kernels, stitching,
metrics) below them, and no import cycle anywhere, lazy (function-level) imports included."""
import ast
from pathlib import Path

import fastds

ROOT = Path(fastds.__file__).parent
# lower number: lower layer; a module may import its own layer or any lower one
LAYERS = [
    (0, ("fastds._io", "fastds._warn", "fastds.config", "fastds._backend", "fastds.kernels")),
    (1, ("fastds.stitch", "fastds.data")),
    (2, ("fastds.models", "fastds.metrics")),
    (3, ("fastds.diffusion",)),
    (4, ("fastds.runs",)),
    (5, ("fastds.sampling",)),
    (6, ("fastds.training",)),
    (7, ("fastds.report", "fastds.protocol", "fastds.demo", "fastds.cli", "fastds.__main__", "fastds")),
]


def _layer(module):
    best = None
    for level, prefixes in LAYERS:
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (level, len(p))
    assert best is not None, f"{module} has no layer: add it to LAYERS"
    return best[0]


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
        name = ".".join(parts if parts[-1] != "__init__" else parts[:-1])
        yield name, package, path


def _imports(tree, package, known):
    """Every fastds module a module imports, anywhere in its body."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # "from . import x" or "from .pkg import mod": the submodule when there is one
            names = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        out |= {n for n in names if n == "fastds" or n.startswith("fastds.")}
    return out


def _graph():
    mods = list(_modules())
    known = {m for m, _, _ in mods}
    graph = {}
    for name, package, path in mods:
        deps = _imports(ast.parse(path.read_text()), package, known)
        graph[name] = {d for d in deps if d != name and d != "fastds"}
    return graph


def test_imports_never_point_up_the_layers():
    bad = [f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
           for m, deps in _graph().items() for d in deps if _layer(d) > _layer(m)]
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = _graph()
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if d not in graph:
                continue
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "\n".join(cycles)


def test_the_checker_sees_a_lazy_upward_import(tmp_path):
    """The walk finds imports inside functions, relative ones included."""
    tree = ast.parse("def f():\n    from ..training.stages import train\n")
    assert _imports(tree, ["fastds", "sampling"], {"fastds.training.stages"}) == {"fastds.training.stages"}


def test_no_function_over_80_lines():
    """Small functions (issue 24): a function that grows past 80 lines is split, not extended."""
    long = []
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    long.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "\n".join(long)
