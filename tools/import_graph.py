"""Print the import graph of pact_cache and pact_train (the trainer/ folder; every import, at module level or inside a
function) and any cycle in it; exit 1 when there is one.

    python tools/import_graph.py
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"pact_cache": "pact_cache", "pact_train": "trainer"}  # import name -> folder


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    parts[0] = {folder: name for name, folder in PACKAGES.items()}[parts[0]]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, name: str) -> set[str]:
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return out


def main() -> int:
    files = {module_name(p): p for pkg in PACKAGES.values() for p in (ROOT / pkg).glob("*.py")}
    graph = {
        m: sorted(
            t for t in imports(p, m) if t in files and t != m and not t.endswith("__init__") and t not in PACKAGES
        )
        for m, p in files.items()
    }
    for m in sorted(graph):
        print(f"{m}: {', '.join(graph[m]) or '-'}")
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = 1
        for t in graph[m]:
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t) :] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    for c in cycles:
        print("cycle: " + " -> ".join(c))
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} imports, {len(cycles)} cycle(s)")
    return 1 if cycles else 0


if __name__ == "__main__":
    sys.exit(main())
