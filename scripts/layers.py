#!/usr/bin/env python3
"""Checks that citadel's modules depend only downwards, and prints the import graph.

    scripts/layers.py              # check; exit 1 on an upward or sideways import, or a circle
    scripts/layers.py --graph      # print the graph (module -> modules it uses), then check
    scripts/layers.py --self-test  # check the circle detection itself on made-up files

Each top-level module of src/ belongs to one layer; a module may use modules of LOWER layers
only (never its own layer's peers, never a layer above). "Uses" means a `crate::<module>`
path anywhere in its non-test code (`use` lines, and paths written out in expressions).
Code after the first `#[cfg(test)]` of a file is a test and is not counted.

Inside a module, files must not import each other in a circle either: a `crate::`, `super::`
or `self::` path (brace groups of `use` included) is resolved to the file that defines it,
and any set of files that reach each other (two that import each other, or a longer loop)
fails the check, as an upward import does, unless it is in ALLOWED_CIRCLES.
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
    ("key backends", ["hsm"]),
    ("X.509", ["pki"]),
    ("identity", ["identity"]),
    ("leaves", ["audit", "leadership", "clock", "duration", "fsutil", "shutdown", "future", "proto", "lib"]),
]
# Items defined in lib.rs itself, reachable as crate::<item>.
LIB_ITEMS = {"install_crypto_provider", "proto", "jwtsvid_proto", "workload_proto", "federation_proto", "broker_proto"}

# File-level circles allowed, each exactly (a circle that grows a third file, or any other
# circle, fails). Empty since issue 21 broke the last three; keep it so: move the shared items
# down into a file both sides import instead of adding an entry.
ALLOWED_CIRCLES: list = []

SRC = pathlib.Path(__file__).resolve().parent.parent / "src"
BENCH_SRC = SRC.parent / "bench" / "src"
PATH = re.compile(r"\bcrate::([a-z_][a-z0-9_]*)")


def layer_of(module):
    for i, (_, members) in enumerate(LAYERS):
        if module in members:
            return i
    return None


def module_of(path):
    rel = path.relative_to(SRC)
    return rel.parts[0][:-3] if len(rel.parts) == 1 else rel.parts[0]


def code(path):
    """The file's non-test code without comments (doc links are not dependencies)."""
    text = path.read_text()
    cut = text.find("#[cfg(test)]")
    if cut >= 0:
        text = text[:cut]
    return re.sub(r"//[^\n]*", "", text)


def uses(path):
    return {("lib" if m in LIB_ITEMS else m) for m in PATH.findall(code(path))}


# --- file-level circles ---------------------------------------------------------------

USE = re.compile(r"\buse\s+([^;]+);")
REL_PATH = re.compile(r"\b(?:crate|super|self)(?:::[A-Za-z_][A-Za-z0-9_]*)+")


def expand_use(tree):
    """`crate::a::{b, c::{d as e, self}}` -> ["crate::a::b", "crate::a::c::d", "crate::a::c"]."""
    tree = re.sub(r"\s+as\s+[A-Za-z_][A-Za-z0-9_]*", "", tree)
    tree = re.sub(r"\s+", "", tree)
    if "{" not in tree:
        return [re.sub(r"::(self|\*)$", "", tree)]
    i = tree.index("{")
    prefix, inner = tree[:i], tree[i + 1 : tree.rindex("}")]
    items, depth, start = [], 0, 0
    for j, c in enumerate(inner + ","):
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        elif c == "," and depth == 0:
            items.append(inner[start:j])
            start = j + 1
    return [p for item in items if item for p in expand_use(prefix + item)]


def module_path(src, path):
    """src/auth/node.rs -> ["auth", "node"]; src/auth/mod.rs -> ["auth"]; src/lib.rs -> []."""
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "mod" or (len(parts) == 1 and parts[0] in ("lib", "main")):
        parts = parts[:-1]
    return parts


def file_of(src, here, path):
    """The file that defines `path` (a crate::/super::/self:: path written in module `here`):
    the longest prefix of it that names a module file; None outside src/."""
    segs = path.split("::")
    if segs[0] == "crate":
        mod, segs = [], segs[1:]
    else:
        mod = list(here)
        while segs and segs[0] in ("super", "self"):
            if segs.pop(0) == "super":
                if not mod:
                    return None
                mod.pop()
    full = mod + segs
    # Longest prefix first, down to the module the path starts from (`super::helper` is an
    # item of the parent module's own file).
    for n in range(len(full), len(mod) - 1, -1):
        if n == 0:
            return src / "lib.rs"
        base = src.joinpath(*full[:n])
        for cand in (base.with_suffix(".rs"), base / "mod.rs"):
            if cand.is_file():
                return cand
    return None


def file_graph(src):
    """file -> the other files of the crate its non-test code uses."""
    graph = {}
    for path in sorted(src.rglob("*.rs")):
        text = code(path)
        here = module_path(src, path)
        paths = [p for t in USE.findall(text) for p in expand_use(t)]
        paths += REL_PATH.findall(USE.sub("", text))
        deps = set()
        for p in paths:
            if not p.startswith(("crate::", "super::", "self::")) and p not in ("super", "self"):
                continue
            f = file_of(src, here, p)
            if f is not None and f != path:
                deps.add(f)
        graph[path] = deps
    return graph


def circles(graph):
    """The strongly connected components of more than one file (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def circle_problems(src, allowed):
    """(problems, allowed circles found) for the files under src."""
    root = src.parent
    problems, seen = [], []
    for comp in circles(file_graph(src)):
        names = {str(f.relative_to(root)) for f in comp}
        if names in allowed:
            seen.append(names)
            continue
        problems.append("files import each other in a circle: " + " <-> ".join(sorted(names)))
    for a in allowed:
        if a not in seen:
            problems.append(
                "ALLOWED_CIRCLES names a circle that is gone (remove it from "
                f"{pathlib.Path(__file__).name}): " + " <-> ".join(sorted(a))
            )
    return problems, seen


def self_test():
    """Made-up crates with known circles: the detection must find exactly those."""
    import shutil
    import tempfile

    made = []

    def crate(files):
        root = pathlib.Path(tempfile.mkdtemp(prefix="layers-self-test-"))
        made.append(root)
        for name, text in files.items():
            f = root / "src" / name
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(text)
        return root / "src"

    base = {
        "lib.rs": "pub mod a;\npub mod b;\n",
        "a/mod.rs": "pub mod x;\npub mod y;\npub mod z;\npub fn helper() {}\n",
        "b/mod.rs": "pub mod p;\npub mod q;\n",
        "b/p.rs": "use crate::a::x::X;\n",
        "b/q.rs": "// crate::b::p::P in a comment is no import\npub struct Q;\n",
    }
    pair = {"src/a/x.rs", "src/a/y.rs"}
    cases = [
        # (what, files beyond `base`, ALLOWED_CIRCLES, circles expected, problems expected)
        ("no circle",
         {"a/x.rs": "use super::helper;\npub struct X;\n", "a/y.rs": "use super::x::X;\n"},
         [], [], 0),
        ("two files, through a brace group and an expression path",
         {"a/x.rs": "use crate::a::{helper, y::{self, Y as Why}};\npub struct X;\n",
          "a/y.rs": "pub struct Y;\nfn f() { let _ = super::x::X; }\n"},
         [], [pair], 1),
        ("the same pair, allowed",
         {"a/x.rs": "use super::y::Y;\npub struct X;\n", "a/y.rs": "use super::x::X;\npub struct Y;\n"},
         [pair], [pair], 0),
        ("an allowed pair that grew a third file (fails, and the pair is reported gone)",
         {"a/x.rs": "use super::y::Y;\npub struct X;\n", "a/y.rs": "use super::z::Z;\npub struct Y;\n",
          "a/z.rs": "use crate::a::x;\npub struct Z;\n"},
         [pair], [pair | {"src/a/z.rs"}], 2),
        ("across modules, but only from a test (not counted)",
         {"a/x.rs": "pub struct X;\n#[cfg(test)]\nmod tests { use crate::b::p; }\n"},
         [], [], 0),
        ("across modules",
         {"a/x.rs": "pub struct X;\nfn f() { crate::b::p::g(); }\n"},
         [], [{"src/a/x.rs", "src/b/p.rs"}], 1),
        ("an allowed circle that is gone is reported, so the list cannot go stale",
         {}, [pair], [], 1),
    ]
    failed = 0
    for what, extra, allowed, expected, n_problems in cases:
        src = crate({"a/x.rs": "", "a/y.rs": "", "a/z.rs": "", **base, **extra})
        found = [{str(f.relative_to(src.parent)) for f in c} for c in circles(file_graph(src))]
        problems, _ = circle_problems(src, allowed)
        ok = sorted(map(sorted, found)) == sorted(map(sorted, expected)) and len(problems) == n_problems
        print(f"  {'ok  ' if ok else 'FAIL'} {what}: circles {sorted(map(sorted, found))}, "
              f"{len(problems)} problem(s)", file=sys.stderr)
        failed += not ok
    for root in made:
        shutil.rmtree(root, ignore_errors=True)
    if failed:
        print(f"layers.py self-test: {failed} case(s) failed", file=sys.stderr)
        sys.exit(1)
    print("layers.py self-test ok", file=sys.stderr)


def main():
    if "--self-test" in sys.argv:
        return self_test()
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
    circle_probs, allowed = circle_problems(SRC, ALLOWED_CIRCLES)
    problems += circle_probs
    # The load tools' crate (bench/, citadel-bench) has no layers, but no circle either.
    bench_probs, _ = circle_problems(BENCH_SRC, [])
    problems += ["citadel-bench (bench/): " + p for p in bench_probs]
    for a in allowed:
        print("allowed circle (issue 21): " + " <-> ".join(sorted(a)), file=sys.stderr)
    if problems:
        print("layering violations (dependencies must point down, files must not import in a circle):", file=sys.stderr)
        for p in problems:
            print("  " + p, file=sys.stderr)
        sys.exit(1)
    print(
        f"layers ok: {sum(len(m) for _, m in LAYERS)} modules, no upward import, "
        f"no file-level circle beyond the {len(allowed)} allowed",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
