"""The import graph, built from the source (every import, lazy ones inside functions included):
no cycle anywhere, libraries never reach back into stages, pipeline, CLI, report or gate, and no
module imports another's private names."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("compress", "teachers", "students")
LIBRARIES = ("teachers", "students")
UPPER = ("compress.stages", "compress.pipeline", "compress.cli", "compress.report", "compress.gate")


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports(module: str) -> list[tuple[str, str | None]]:
    """(module imported, name taken from it or None) for every import statement of `module`."""
    out = []
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:  # relative: resolve against the importing package
                pkg = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
                base = ".".join(pkg[: len(pkg) - node.level + 1] + [node.module])
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub, None) if sub in MODULES else (base, a.name))
    return [(m, n) for m, n in out if m in MODULES and m != module]


GRAPH = {m: sorted({dep for dep, _ in imports(m)}) for m in MODULES}


def _cycle() -> list[str] | None:
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for dep in GRAPH[m]:
            if dep.split(".")[0] in PACKAGES and "." not in dep:
                continue  # a package's empty __init__ is no edge back
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(GRAPH):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_graph_sees_lazy_imports():
    assert "compress.stages" in GRAPH["compress.pipeline"]
    assert "compress.gate" in GRAPH["compress.cli"]  # imported inside cmd_check


def test_no_import_cycle():
    assert _cycle() is None, " -> ".join(_cycle())


@pytest.mark.parametrize("library", sorted(m for m in MODULES if m.split(".")[0] in LIBRARIES))
def test_libraries_do_not_import_stages_pipeline_cli_report_or_gate(library):
    bad = [d for d in GRAPH[library] if d.startswith(UPPER)]
    assert not bad, f"{library} imports {bad}"


def _private_uses(module: str) -> list[str]:
    """`from x import _name`, and `alias._name` where alias is another module of ours."""
    bad = [f"{dep}.{name}" for dep, name in imports(module) if name and name.startswith("_")]
    aliases = {}
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            aliases.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names
                            if f"{node.module}.{a.name}" in MODULES})
        elif isinstance(node, ast.Import):
            aliases.update({a.asname: a.name for a in node.names if a.asname and a.name in MODULES})
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                and node.attr.startswith("_") and not node.attr.startswith("__") and aliases[node.value.id] != module:
            bad.append(f"{aliases[node.value.id]}.{node.attr}")
    return bad


def test_no_module_uses_private_names_of_another():
    bad = {m: _private_uses(m) for m in MODULES if _private_uses(m)}
    assert not bad, bad


def test_report_and_gate_need_only_the_run_folder():
    """`compress report` / `compress check` import nothing that runs a stage, transitively."""
    def reach(m, seen):
        for dep in GRAPH[m]:
            if dep not in seen:
                seen.add(dep)
                reach(dep, seen)
        return seen

    for top in ("compress.report", "compress.gate"):
        assert not [m for m in reach(top, set()) if m.startswith(("compress.stages", "compress.pipeline",
                                                                  "teachers", "students"))], top


def test_every_stage_module_declares_its_recipe():
    from compress.stages import STAGES

    files = {p.stem for p in (ROOT / "compress" / "stages").glob("*.py") if p.stem != "__init__"}
    assert files == set(STAGES)
    for s in STAGES.values():
        assert set(s.consumes) <= {"teacher", "student"} and set(s.produces) <= {"teacher", "student"}
        assert callable(s.run) and callable(s.reevaluate) and callable(s.check) and s.summary
