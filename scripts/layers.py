#!/usr/bin/env python3
"""Checks that citadel's modules depend only downwards, and prints the import graph.

    scripts/layers.py            # check; exit 1 on an upward or sideways import
    scripts/layers.py --graph    # print the graph (module -> modules it uses), then check

Each top-level module of src/ belongs to one layer; a module may use modules of LOWER layers
only (never its own layer's peers, never a layer above). "Uses" means a `crate::<module>`
path anywhere in its non-test code (`use` lines, and paths written out in expressions).
Code after the first `#[cfg(test)]` of a file is a test and is not counted.
"""
import pathlib
import re
import sys

# Top to bottom. Keep docs/architecture.md's diagram in step with this list.
LAYERS = [
    ("commands", ["main", "cmd"]),
    ("application", ["app"]),
    ("dev keys", ["devkeys"]),
    ("edges", ["server", "agent", "cluster"]),
    ("ca client", ["client"]),
    ("authentication", ["auth"]),
    ("certificate authority", ["ca"]),
    ("storage", ["store"]),
    ("stored state", ["journal"]),
    ("X.509", ["pki"]),
    ("identity", ["identity"]),
    ("leaves", ["audit", "leadership", "clock", "duration", "fsutil", "shutdown", "future", "proto", "lib"]),
]
# Items defined in lib.rs itself, reachable as crate::<item>.
LIB_ITEMS = {"install_crypto_provider", "proto"}

SRC = pathlib.Path(__file__).resolve().parent.parent / "src"
PATH = re.compile(r"\bcrate::([a-z_][a-z0-9_]*)")


def layer_of(module):
    for i, (_, members) in enumerate(LAYERS):
        if module in members:
            return i
    return None


def module_of(path):
    rel = path.relative_to(SRC)
    return rel.parts[0][:-3] if len(rel.parts) == 1 else rel.parts[0]


def uses(path):
    text = path.read_text()
    cut = text.find("#[cfg(test)]")
    if cut >= 0:
        text = text[:cut]
    text = re.sub(r"//[^\n]*", "", text)  # comments (doc links are not dependencies)
    return {("lib" if m in LIB_ITEMS else m) for m in PATH.findall(text)}


def main():
    graph, problems = {}, []
    for path in sorted(SRC.rglob("*.rs")):
        me = module_of(path)
        mine = layer_of(me)
        if mine is None:
            problems.append(f"{path.relative_to(SRC.parent)}: module {me!r} is in no layer (add it to LAYERS in {__file__})")
            continue
        for dep in uses(path):
            if dep == me:
                continue
            graph.setdefault(me, set()).add(dep)
            theirs = layer_of(dep)
            if theirs is None:
                problems.append(f"{path.relative_to(SRC.parent)}: uses crate::{dep}, which is in no layer")
            elif theirs <= mine:
                kind = "its own layer" if theirs == mine else "a layer above"
                problems.append(
                    f"{path.relative_to(SRC.parent)}: {me} ({LAYERS[mine][0]}) uses crate::{dep} "
                    f"({LAYERS[theirs][0]}), {kind}"
                )
    if "--graph" in sys.argv:
        for i, (name, members) in enumerate(LAYERS):
            for m in members:
                deps = sorted(graph.get(m, ()), key=lambda d: (layer_of(d) or 0, d))
                print(f"{name:>22} | {m:<9} -> {' '.join(deps) if deps else '-'}")
    if problems:
        print("layering violations (dependencies must point down):", file=sys.stderr)
        for p in problems:
            print("  " + p, file=sys.stderr)
        sys.exit(1)
    print(f"layers ok: {sum(len(m) for _, m in LAYERS)} modules, no upward import", file=sys.stderr)


if __name__ == "__main__":
    main()
