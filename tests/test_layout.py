"""The package's shape, checked: imports run one way (no circle, the library never imports the launcher), reading
a config patches nothing, one module reads the process's place in the job, one function ends a process."""
import ast
import re
import subprocess
import sys

from conftest import REPO

PACKAGE = REPO / "autowu"


def module_name(path):
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph():
    """module -> the package's modules it imports (anywhere in it, functions included)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                # ``from x import y``: the module x.y where y is one, else x itself
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def cycles(graph):
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_runs_in_a_circle_and_the_library_never_imports_the_launcher():
    graph = import_graph()
    # A package's __init__ that imports its own submodules is not a circle of theirs.
    acyclic = {m: {t for t in edges if not m.startswith(t + ".")} for m, edges in graph.items()}
    assert cycles(acyclic) == []
    library = [m for m in graph if not m.startswith("autowu.launcher")]
    assert {m: sorted(t for t in graph[m] if t.startswith("autowu.launcher")) for m in library} == \
        {m: [] for m in library}
    # The config side registers nothing: it imports nothing of the DeepSpeed package.
    assert not any(t.startswith("autowu.deepspeed") for t in graph["autowu.ds_config"])
    assert not any(t.startswith("autowu.deepspeed") for t in graph["autowu.launcher.run_config"])
    # Inside the DeepSpeed package the imports run down: config < hook < seam < initialize.
    assert "autowu.deepspeed.seam" not in graph["autowu.deepspeed.hook"]
    assert not {"autowu.deepspeed"} & (graph["autowu.deepspeed.hook"] | graph["autowu.deepspeed.seam"])


def test_reading_a_config_patches_nothing_and_the_import_registers():
    code = """
from autowu.ds_config import resolve
from autowu.launcher.run_config import split_config
from deepspeed.runtime.engine import DeepSpeedEngine
config, run = split_config("ds_configs/cpu_digits.json")
resolve(config, total_epochs=run.epochs, seed=run.seed, world_size=2)
print("after reading:", getattr(DeepSpeedEngine.__init__, "_autowu_seam", False))
import autowu.deepspeed
print("after the import:", getattr(DeepSpeedEngine.__init__, "_autowu_seam", False))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "after reading: False" in proc.stdout and "after the import: True" in proc.stdout


def test_one_module_reads_the_jobs_environment_and_one_function_ends_a_process():
    sources = {p: p.read_text() for p in list(PACKAGE.rglob("*.py")) + list((REPO / "launch").glob("*.py"))
               + list((REPO / "benchmarks").glob("*.py"))}
    place = re.compile(r"environ(?:\.get)?[\[(]\s*[\"'](RANK|LOCAL_RANK|LOCAL_SIZE|LOCAL_WORLD_SIZE|WORLD_SIZE|"
                       r"CROSS_RANK|GROUP_RANK|MASTER_ADDR|MASTER_PORT)[\"']")
    readers = sorted(str(p.relative_to(REPO)) for p, s in sources.items()
                     if place.search(s) and "benchmarks" not in p.parts)
    assert readers == ["autowu/environment.py"]
    exits = sorted(str(p.relative_to(REPO)) for p, s in sources.items() if "os._exit(" in s)
    assert exits == ["autowu/launcher/processes.py"]
    edits = sorted(str(p.relative_to(REPO)) for p, s in sources.items() if "sys.path.insert" in s)
    assert edits == []
