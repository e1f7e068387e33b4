"""The package layout keeps its promises (issue #16), checked on the source with `ast`:

- no import cycle among first-party modules (every `import`, module-level or inside a function,
  counts, but not those under `if TYPE_CHECKING:`; importing `a.b.c` also imports the packages
  `a` and `a.b`), nor among packages (`pmod_serve`'s subpackages counted one by one);
- the first-party packages form layers: the p-MoD rules (`pmod_serve.pmod`) import nothing
  first-party and nothing from vLLM; the model registry builds on the rules only; the reference
  (`pmod_reference`) and everything it imports stay free of vLLM;
- what the wheel ships never imports what it does not ship (the reference, benchmarks, tests),
  except the few repository tools listed in `REPO_ONLY_USES`.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from fnmatch import fnmatchcase
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIRST_PARTY = ("pmod_serve", "pmod_reference", "model_registry", "pmod_train", "loadtests", "benchmarks", "tests")
RULES = "pmod_serve.pmod"

# Modules shipped in the wheel that use a repository-only package, and why that is acceptable.
REPO_ONLY_USES = {
    # `make demo` (from a clone) draws the routing map with the reference, inside a function.
    ("pmod_serve.entrypoints.demo", "pmod_reference.model"),
    # pmod_train ships for its trained demo checkpoint (`pmod-serve --demo`); training it and
    # drawing routing maps are repository tools built on the reference.
    ("pmod_train.forward", "pmod_reference.model"),
    ("pmod_train.train", "pmod_reference.model"),
    ("pmod_train.routing_map", "pmod_reference.model"),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    modules = {}
    for top in FIRST_PARTY:
        for path in sorted((REPO / top).rglob("*.py")):
            if "__pycache__" not in path.parts:
                modules[_module_name(path)] = path
    return modules


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _runtime_nodes(tree: ast.AST):
    """Every node, except the bodies of `if TYPE_CHECKING:` (never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
        else:
            todo.extend(ast.iter_child_nodes(node))


def _imports(name: str) -> set[str]:
    """Every module `name` imports (first-party: the module itself, else its package; third-party:
    the dotted name as written)."""
    path = MODULES[name]
    package = name if _is_package(name) else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in MODULES)
    return found


def _first_party(target: str) -> str | None:
    """The first-party module `target` names, or the nearest package above it that exists."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in MODULES]


IMPORTS = {name: _imports(name) for name in MODULES}
# First-party modules each module imports, as written.
DIRECT: dict[str, set[str]] = {
    name: {m for t in targets if t.split(".")[0] in FIRST_PARTY and (m := _first_party(t)) and m != name}
    for name, targets in IMPORTS.items()
}
# What importing a module runs: also the packages above what it imports, except its own (those
# are being imported already when it runs).
GRAPH: dict[str, set[str]] = {
    name: {a for m in targets for a in [m, *_ancestors(m)] if a != name and a not in _ancestors(name)}
    for name, targets in DIRECT.items()
}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def _closure(roots: list[str]) -> set[str]:
    seen, todo = set(), list(roots)
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(GRAPH.get(node, ()))
    return seen


def _in(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_walk_sees_the_packages():
    assert {"pmod_serve.plugin", "pmod_serve.pmod.schedule", "pmod_reference.model", "model_registry.catalog"} <= set(MODULES)
    assert "pmod_serve.transformers_utils.vision_tower" in DIRECT["pmod_serve.model_executor.models.pmod_llava"]
    assert "pmod_serve.pmod.routing" in DIRECT["pmod_serve.v1.worker.model_runner"]


def test_no_import_cycle_between_first_party_modules():
    assert _find_cycle(GRAPH) is None, " -> ".join(_find_cycle(GRAPH))


def _component(name: str) -> str:
    """`pmod_serve`'s subpackages (`pmod_serve.pmod`, `pmod_serve.v1`, ...) one by one, every other
    first-party package as a whole."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "pmod_serve" and len(parts) > 1 else parts[0]


def test_no_cycle_between_packages():
    graph: dict[str, set[str]] = defaultdict(set)
    for name, targets in DIRECT.items():
        graph[_component(name)].update(_component(t) for t in targets if _component(t) != _component(name))
    assert _find_cycle(graph) is None, " -> ".join(_find_cycle(graph))
    assert RULES in graph["pmod_serve.model_executor"] and RULES in graph["model_registry"]


def test_the_runtime_does_not_import_the_model_registry():
    """The served package stands on its own: the checkpoint catalogue and tools (`model_registry`)
    build on it, never the other way round (tower configs and chat templates the engine needs are
    `pmod_serve.transformers_utils`)."""
    offenders = {f"{name}: {target}" for name in MODULES if _in(name, "pmod_serve")
                 for target in IMPORTS[name] if _in(target, "model_registry")}
    assert not offenders


def test_the_pmod_rules_import_neither_vllm_nor_other_first_party_code():
    offenders = {
        f"{name}: {target}"
        for name in MODULES
        if _in(name, RULES)
        for target in IMPORTS[name]
        if target.split(".")[0] == "vllm" or (target.split(".")[0] in FIRST_PARTY and not _in(target, RULES))
    }
    assert not offenders


def test_the_model_registry_builds_on_the_rules_only():
    offenders = {
        f"{name}: {target}"
        for name in MODULES
        if _in(name, "model_registry")
        for target in DIRECT[name]
        if not (_in(target, "model_registry") or _in(target, RULES) or _in(target, "pmod_serve.transformers_utils"))
    }
    assert not offenders


def test_the_reference_and_what_it_imports_are_free_of_vllm():
    used = _closure([name for name in MODULES if _in(name, "pmod_reference")])
    assert "pmod_serve.pmod.schedule" in used and "model_registry.catalog" in used
    offenders = {f"{name}: {target}" for name in used for target in IMPORTS[name] if target.split(".")[0] == "vllm"}
    assert not offenders


def _wheel_packages() -> list[str]:
    # pyproject's [tool.setuptools.packages.find] include list (no tomllib: Python 3.10 is supported).
    section = re.search(r"^\[tool\.setuptools\.packages\.find\]\n(.*?)(?=^\[)", (REPO / "pyproject.toml").read_text(), re.M | re.S)
    include = re.findall(r'"([^"]+)"', re.search(r"^include\s*=\s*\[(.*?)\]", section.group(1), re.M | re.S).group(1))
    return sorted({name.split(".")[0] for name in MODULES for pattern in include if fnmatchcase(name, pattern)})


def test_the_wheel_leaves_the_reference_out():
    shipped = _wheel_packages()
    assert "pmod_serve" in shipped and "model_registry" in shipped
    assert "pmod_reference" not in shipped and "benchmarks" not in shipped and "tests" not in shipped


@pytest.mark.parametrize("package", _wheel_packages())
def test_the_wheel_never_imports_what_it_does_not_ship(package):
    shipped = _wheel_packages()
    offenders = {
        (name, target)
        for name in MODULES
        if _in(name, package)
        for target in DIRECT[name]
        if target.split(".")[0] not in shipped
    }
    assert offenders - REPO_ONLY_USES == set()


def _tracked_text_files() -> list[Path]:
    import subprocess

    names = subprocess.run(["git", "ls-files"], cwd=REPO, check=True, capture_output=True, text=True).stdout.split()
    return [REPO / n for n in names if n.endswith((".py", ".md", ".jinja", ".sh", ".toml")) and (REPO / n).is_file()]


def test_spec_citations_name_existing_headings_of_docs_p_mod():
    """Code cites docs/p-mod.md by heading (`docs/p-mod.md, "Image layouts"`), never as "spec §N"."""
    headings = {m.group(1).strip() for m in re.finditer(r"^#{2,3} (.+)$", (REPO / "docs" / "p-mod.md").read_text(), re.M)}
    assert {"Image layouts", "Prompts", "Config keys", "KV cache of one request", "Weight names"} <= headings
    cite = re.compile(r'docs/p-mod\.md(?:,\s*|\s*\(\s*)"([^"]+)"(?:\s+and\s+"([^"]+)")?')
    cited, stale = set(), []
    for path in _tracked_text_files():
        text = path.read_text()
        if re.search(r"spec §|§\d", text) and path != Path(__file__).resolve():
            stale.append(str(path.relative_to(REPO)))
        for match in cite.finditer(text):
            for heading in filter(None, match.groups()):
                cited.add((" ".join(heading.split()), str(path.relative_to(REPO))))
    assert not stale
    assert len(cited) > 20
    assert {(heading, where) for heading, where in cited if heading not in headings} == set()
