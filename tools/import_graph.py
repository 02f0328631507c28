"""Print the import graph of pact_cache and pact_train (the trainer/ folder; every import, at module level or inside a
function), any cycle in it, and any import that breaks the layering rule; exit 1 when there is either.

    python tools/import_graph.py

The rule: a command module (one ``pact-cache`` command family's work, COMMANDS) imports no other command module,
and no pact_train module imports a command module: both stand on the library floor (errors, storage, typed JSON,
manifest, columns, format, rows, models, projection, data, answers, card, ...). The few places where one command
is *made of* another are listed in COMPOSES with the reason; anything else is a violation.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"pact_cache": "pact_cache", "pact_train": "trainer"}  # import name -> folder
COMMANDS = {
    f"pact_cache.{m}"
    for m in ("build", "combine", "copy", "direction", "replay", "report", "score", "stats", "tokens", "upgrade")
}
COMPOSES = {  # (importer, command module): why the importer is made of that command
    ("pact_cache.replay", "pact_cache.build"): "pact-cache replay caches the kept refusals with build()",
    ("pact_cache.build", "pact_cache.tokens"): "build selects the safety tokens itself when --tokens is not given",
    ("pact_train.loop", "pact_cache.replay"): "--replay auto makes the replay rows with make_replay()",
    ("pact_train.loop", "pact_cache.direction"): "--method asft reads the file `pact-cache direction` writes",
    ("pact_train.core", "pact_cache.direction"): "--method asft reads the file `pact-cache direction` writes",
    ("pact_train.hf", "pact_cache.direction"): "--method asft reads the file `pact-cache direction` writes",
}
ENTRY = {
    "pact_cache.cli",
    "pact_cache.__main__",
    "pact_train.cli",
    "pact_train.__main__",
}  # the command lines: above all


def violations(graph: dict) -> list[str]:
    """Imports that break the layering rule (see the module's docstring)."""
    out = []
    for m, targets in graph.items():
        if m in ENTRY:
            continue
        for t in targets:
            if t in COMMANDS and (m in COMMANDS or m.startswith("pact_train")) and (m, t) not in COMPOSES:
                out.append(f"{m} imports the command module {t}")
    return out


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
    bad = violations(graph)
    for v in bad:
        print("layering: " + v)
    print(
        f"{len(graph)} modules, {sum(map(len, graph.values()))} imports, {len(cycles)} cycle(s), "
        f"{len(bad)} layering violation(s) ({len(COMPOSES)} compositions allowed, each with its reason)"
    )
    return 1 if cycles or bad else 0


if __name__ == "__main__":
    sys.exit(main())
