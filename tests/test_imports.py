"""No import cycle in splitmpi: the core is a stack of layers and the tools stand on it.

The graph is read from the source with ``ast``, not by importing it, so an import inside a
function counts as much as one at the top (a cycle that only a late import lets start is
still a cycle). An edge goes to the module named: ``from .a import b`` reaches ``a.b`` where
that is a module, else ``a``; relative imports are resolved against the importing file.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import mpirun


def module_names(root: Path) -> dict[str, Path]:
    """Dotted name -> file, for every ``*.py`` below the package folder ``root``."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that the file of module ``name`` imports, anywhere in it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # "pkg.mod.attr" -> "pkg.mod"
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    names = module_names(root)
    return {name: imported(name, path, set(names)) for name, path in names.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module
    (Tarjan's algorithm), as the path that closes it."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(_closing_path(graph, set(component), v))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _closing_path(graph: dict[str, set[str]], component: set[str], start: str) -> list[str]:
    """start -> ... -> start inside the component (breadth first: the shortest)."""
    came_from, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while came_from[path[-1]] is not None:
                        path.append(came_from[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in came_from:
                    came_from[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")


def test_splitmpi_has_no_import_cycle():
    graph = import_graph(mpirun.ROOT / "splitmpi")
    # the walk sees the package: top-level, relative and function-level imports alike
    assert {"splitmpi.config", "splitmpi.errors"} <= graph["splitmpi.runtime"]
    assert "splitmpi.reader" in graph["splitmpi.report.cli"]
    assert "splitmpi.report.wire" in graph["splitmpi.report.cli"]  # imported in main()
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_a_cycle_through_a_late_relative_import_is_found(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")
    (pkg / "c.py").write_text("import pkg.a as a\n\ndef g():\n    pass\n")
    (pkg / "d.py").write_text("from . import c\n")
    assert cycles(import_graph(pkg)) == [["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]]


def test_torchvision_is_imported_only_when_a_run_needs_it():
    """A rank of a cnn5 run on the built-in data never imports torchvision (1.5 s of
    start-up and 170 MB a rank); ResNet-50 or a torchvision data set imports it."""
    probe = """
import sys
from splitmpi import cli, client, config, data, models, server
cfg = config.load(None, ["data.train_size=40", "data.test_size=20"])
data.client_loaders(cfg, 1, 3)
models.for_run(cfg)
print("cnn5", "torchvision" in sys.modules)
models.for_run(config.load(None, ["model.arch=resnet50", "model.cut=layer1"]))
print("resnet50", "torchvision" in sys.modules)
"""
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env=mpirun.env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["cnn5", "False", "resnet50", "True"], proc.stdout


def test_a_client_rank_does_not_import_h5py():
    """Only the server writes the results file: a client rank's modules (and the entry point,
    which imports ``server`` and ``results`` on rank 0 only) leave h5py out (12 MB a rank)."""
    probe = """
import sys
from splitmpi import cli, client, runtime, checkpoint, data, models, sharing, transport
print("h5py" in sys.modules, "splitmpi.server" in sys.modules, "splitmpi.results" in sys.modules)
"""
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env=mpirun.env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False", "False"], proc.stdout


def test_torch_dynamo_stays_out_of_an_eager_run_until_something_needs_it():
    """``runtime.defer_dynamo``: an optimizer's whole life (add_param_group, zero_grad, step,
    state_dict, load_state_dict) leaves torch._dynamo, sympy and triton unimported (110 MB a
    rank); ``import torch._dynamo.x`` then gets the real package and the one copy of x, and
    torch.compile works."""
    probe = """
import sys, torch
from splitmpi import runtime
assert runtime.defer_dynamo() and runtime.defer_dynamo()  # twice: still one stand-in
net = torch.nn.Linear(4, 2)
opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
for _ in range(2):
    opt.zero_grad()
    net(torch.randn(3, 4)).sum().backward()
    opt.step()
opt.load_state_dict(opt.state_dict())
print(type(sys.modules["torch._dynamo"]).__name__, "sympy" in sys.modules,
      "triton" in sys.modules)
import torch._dynamo.debug_utils as d  # not imported by torch._dynamo's __init__
import torch._dynamo.config as c  # imported by it
print(type(torch._dynamo).__name__, d is torch._dynamo.debug_utils,
      c is torch._dynamo.config is sys.modules["torch._dynamo.config"])
print(torch.compile(lambda x: x + 1, backend="eager")(torch.zeros(1)).item())
"""
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env=mpirun.env({"SPLITMPI_DEFER_DYNAMO": None}), timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["_DeferredDynamo", "False", "False",
                                   "module", "True", "True", "1.0"], proc.stdout


def test_the_deferral_can_be_turned_off():
    probe = """
import sys, torch
from splitmpi import runtime
print(runtime.defer_dynamo(), "torch._dynamo" in sys.modules)
"""
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env=mpirun.env({"SPLITMPI_DEFER_DYNAMO": "0"}), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"], proc.stdout
