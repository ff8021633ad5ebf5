#!/usr/bin/env python3
"""Checks the shape of `src/`: no import cycle between modules, no module over 600 lines.

A node is a file-level module (`src/proxy.rs` is `crate::proxy`, `src/store/postgres/pool.rs`
is `crate::store::postgres::pool`); a parent and its submodules are distinct nodes, and inline
`mod x { … }` blocks (e.g. `#[cfg(test)] mod tests`) belong to the file they are in. An edge
A → B is any path in A's code (a `use` item, grouped or not, or a path in an expression or a
type) that names B or an item in B: `crate::…`, `super::…`, `self::…`, or a bare path starting
with a child module A declares. A path resolves to the longest known module prefix, so
`crate::store::FeedbackValue` is an edge to `crate::store` even when `store` re-exports it.
`mod` declarations, visibilities (`pub(in crate::x)`), comments, strings and doc links are not
edges. Test code is included, so it must be acyclic too.

The binary root `src/main.rs` is a crate of its own (`feedback_proxy::…` paths there are
external) and is checked the same way.

Prints every cycle (one per strongly connected component, with the file:line of each edge;
`-v` lists every edge inside the component) and every non-test file over the line limit, and
exits 1 if it found either. A file is test-only when its parent declares it
`#[cfg(test)] mod name;`.

Usage: python3 scripts/check-layers.py [-v] [--graph] [--limit N] [SRC_DIR]
"""

import os
import re
import sys
from collections import defaultdict, deque

LIMIT = 600

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def strip_code(text):
    """Blanks comments, string and char literals (keeping newlines, so line numbers hold)."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == "r" and re.match(r'r#*"', text[i:]) and not re.match(r"[A-Za-z0-9_]", text[i - 1 : i] or " "):
            m = re.match(r'r(#*)"', text[i:])
            close = '"' + m.group(1)
            j = text.find(close, i + len(m.group(0)))
            j = n if j < 0 else j + len(close)
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == "b" and text.startswith('b"', i) and not re.match(r"[A-Za-z0-9_]", text[i - 1 : i] or " "):
            out.append(" ")
            i += 1
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            j = min(j + 1, n)
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == "'":
            # A char literal ('a', '\n', '\u{1F600}') or a lifetime ('a, 'static).
            m = re.match(r"'(\\(u\{[0-9a-fA-F]+\}|x[0-9a-fA-F]{2}|.)|[^\\'])'", text[i:])
            if m:
                out.append(" " * len(m.group(0)))
                i += len(m.group(0))
            else:
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def module_of(src, path):
    """`src/store/postgres/pool.rs` → ("crate", "store", "postgres", "pool")."""
    rel = os.path.relpath(path, src)[: -len(".rs")].split(os.sep)
    if rel == ["lib"]:
        return ("crate",)
    if rel == ["main"]:
        return ("main",)
    if rel[-1] == "mod":
        rel = rel[:-1]
    return ("crate",) + tuple(rel)


TOKEN = re.compile(
    r"(?P<path>(?:\$?crate|super|self|" + IDENT + r")(?:\s*::\s*(?:" + IDENT + r"|\{|\*))+)"
    r"|(?P<use>\buse\b)|(?P<mod>\bmod\s+(?P<modname>" + IDENT + r")\s*(?P<modend>[{;]))"
    r"|(?P<open>\{)|(?P<close>\})|(?P<vis>\bpub\s*\(\s*in\b[^)]*\))"
)


def use_tree_paths(code, start):
    """Expands the use tree starting at `start` (just after `use`) into flat segment lists.

    Returns (paths, end) where each path is (segments, offset)."""
    paths = []

    def skip_ws(i):
        while i < len(code) and code[i].isspace():
            i += 1
        return i

    def tree(prefix, i):
        # tree := path ('::' ( '*' | '{' tree,* '}' ))? ('as' ident)?  |  '{' tree,* '}'  |  '*'
        i = skip_ws(i)
        segs = list(prefix)
        at = i
        while True:
            i = skip_ws(i)
            if code.startswith("::", i):
                i += 2
                continue
            if i < len(code) and code[i] == "{":
                i += 1
                while True:
                    i = skip_ws(i)
                    if i < len(code) and code[i] == "}":
                        return i + 1
                    i = tree(segs, i)
                    i = skip_ws(i)
                    if i < len(code) and code[i] == ",":
                        i += 1
            if i < len(code) and code[i] == "*":
                paths.append((segs, at))
                return i + 1
            m = re.compile(r"\$?" + IDENT).match(code, i)
            if not m:
                paths.append((segs, at))
                return i
            word = m.group(0)
            if word == "as" and segs != list(prefix):
                paths.append((segs, at))
                m2 = re.compile(r"\s*" + IDENT).match(code, m.end())
                return m2.end() if m2 else m.end()
            segs = segs + [word.lstrip("$")]
            i = m.end()
            j = skip_ws(i)
            if not code.startswith("::", j):
                paths.append((segs, at))
                m2 = re.compile(r"\s*as\s+" + IDENT).match(code, j)
                return m2.end() if m2 else i

    return paths, tree([], start)


class Graph:
    def __init__(self, src):
        self.src = src
        self.files = {}  # module tuple -> file path
        self.children = defaultdict(set)  # module tuple -> declared child names
        self.test_only = set()  # module tuples declared under #[cfg(test)]
        self.edges = defaultdict(dict)  # a -> {b: (file, line)}
        self.code = {}

    def load(self):
        for root, _dirs, names in os.walk(self.src):
            for name in sorted(names):
                if name.endswith(".rs"):
                    path = os.path.join(root, name)
                    mod = module_of(self.src, path)
                    self.files[mod] = path
                    with open(path, encoding="utf-8") as f:
                        self.code[mod] = strip_code(f.read())
        for mod, code in self.code.items():
            for m in re.finditer(r"(#\[cfg\(test\)\]\s*)?(?:pub(?:\([^)]*\))?\s+)?\bmod\s+(" + IDENT + r")\s*;", code):
                self.children[mod].add(m.group(2))
                if m.group(1):
                    self.test_only.add(mod + (m.group(2),))
        # A file under a test-only module is test-only too.
        for mod in list(self.files):
            if any(mod[:k] in self.test_only for k in range(1, len(mod) + 1)):
                self.test_only.add(mod)

    def resolve(self, here, segs):
        """Absolute module a path names, from inline module `here` (a tuple), or None."""
        segs = list(segs)
        if not segs:
            return None
        head = segs[0]
        if head == "crate":
            base = (here[0],)
            segs = segs[1:]
        elif head in ("super", "self"):
            base = here
            while segs and segs[0] in ("super", "self"):
                if segs[0] == "super":
                    base = base[:-1]
                segs = segs[1:]
            if not base:
                return None
        else:
            # A bare path: only a child module this module declares (inline or file) is ours.
            if head in self.local_children(here):
                base = here
            else:
                return None
        full = base + tuple(segs)
        for k in range(len(full), 0, -1):
            if full[:k] in self.files:
                return full[:k]
        return None

    def local_children(self, here):
        names = set()
        file_mod = self.file_of(here)
        if here == file_mod:
            names |= self.children.get(here, set())
        names |= self.inline_children.get(here, set())
        return names

    def file_of(self, here):
        for k in range(len(here), 0, -1):
            if here[:k] in self.files:
                return here[:k]
        return here

    def scan(self):
        self.inline_children = defaultdict(set)
        # First pass: inline module names, so bare paths to them are not mistaken.
        for mod, code in self.code.items():
            for _ in self.walk(mod, code, record=True):
                pass
        for mod, code in self.code.items():
            path = self.files[mod]
            line_starts = [0] + [m.end() for m in re.finditer("\n", code)]

            def line_of(off):
                lo, hi = 0, len(line_starts) - 1
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    if line_starts[mid] <= off:
                        lo = mid
                    else:
                        hi = mid - 1
                return lo + 1

            for here, paths in self.walk(mod, code):
                for segs, off in paths:
                    target = self.resolve(here, segs)
                    if target is None or target == mod:
                        continue
                    self.edges[mod].setdefault(target, (path, line_of(off)))

    def walk(self, mod, code, record=False):
        """Yields (inline module path, [(segments, offset)]) for every path in `code`."""
        stack = [(mod, -1)]  # (module, brace depth at which it closes)
        depth = 0
        i = 0
        while True:
            m = TOKEN.search(code, i)
            if not m:
                return
            here = stack[-1][0]
            if m.group("vis"):
                i = m.end()
            elif m.group("use"):
                paths, end = use_tree_paths(code, m.end())
                yield here, paths
                i = max(end, m.end())
            elif m.group("mod"):
                if m.group("modend") == "{":
                    depth += 1
                    child = here + (m.group("modname"),)
                    if record:
                        self.inline_children[here].add(m.group("modname"))
                    stack.append((child, depth))
                i = m.end()
            elif m.group("open"):
                depth += 1
                i = m.end()
            elif m.group("close"):
                if stack[-1][1] == depth:
                    stack.pop()
                depth -= 1
                i = m.end()
            else:
                text = m.group("path")
                # Do not let a path swallow a `{` that is a block: only keep identifiers.
                segs = []
                for part in re.split(r"\s*::\s*", text):
                    if re.fullmatch(r"\$?" + IDENT, part):
                        segs.append(part.lstrip("$"))
                    else:
                        break
                # A path preceded by `::` is a continuation already seen.
                before = code[: m.start()].rstrip()
                if not before.endswith("::"):
                    yield here, [(segs, m.start())]
                # Resume right after the identifiers, so a trailing `{` is still counted.
                consumed = re.match(r"(?:\$?" + IDENT + r"(?:\s*::\s*)?)+", text)
                end = m.start() + (consumed.end() if consumed else len(text))
                while code[end - 1] in ": \t\n" and end > m.start() + 1:
                    end -= 1
                i = end


def sccs(nodes, edges):
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, {})):
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
            out.append(comp)

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def shortest_cycle(start, comp, edges):
    comp = set(comp)
    prev = {start: None}
    q = deque([start])
    while q:
        v = q.popleft()
        for w in sorted(edges.get(v, {})):
            if w not in comp:
                continue
            if w == start:
                path = [v]
                while prev[path[-1]] is not None:
                    path.append(prev[path[-1]])
                path.reverse()
                return path + [start]
            if w not in prev:
                prev[w] = v
                q.append(w)
    return [start]


def name(mod):
    return "::".join(mod)


def main(argv):
    verbose = "-v" in argv
    graph_out = "--graph" in argv
    limit = LIMIT
    rest = []
    it = iter(argv)
    for a in it:
        if a == "--limit":
            limit = int(next(it))
        elif a not in ("-v", "--graph"):
            rest.append(a)
    src = rest[0] if rest else os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    src = os.path.normpath(src)
    root = os.path.dirname(src)

    def show(path):
        return os.path.relpath(path, root)

    g = Graph(src)
    g.load()
    g.scan()

    if graph_out:
        for a in sorted(g.edges):
            for b in sorted(g.edges[a]):
                f, line = g.edges[a][b]
                print(f"{name(a)} -> {name(b)}  ({show(f)}:{line})")

    bad = False
    comps = [c for c in sccs(g.files, g.edges) if len(c) > 1]
    for comp in sorted(comps, key=lambda c: (-len(c), sorted(c))):
        bad = True
        comp = sorted(comp)
        print(f"import cycle through {len(comp)} modules: {', '.join(name(m) for m in comp)}")
        cyc = shortest_cycle(comp[0], comp, g.edges)
        for a, b in zip(cyc, cyc[1:]):
            f, line = g.edges[a][b]
            print(f"  {name(a)} -> {name(b)}  ({show(f)}:{line})")
        if verbose:
            print("  every edge inside it:")
            for a in comp:
                for b in sorted(g.edges.get(a, {})):
                    if b in comp:
                        f, line = g.edges[a][b]
                        print(f"    {name(a)} -> {name(b)}  ({show(f)}:{line})")

    for mod in sorted(g.files):
        if mod in g.test_only:
            continue
        path = g.files[mod]
        with open(path, encoding="utf-8") as f:
            lines = sum(1 for _ in f)
        if lines > limit:
            bad = True
            print(f"{show(path)}: {lines} lines (limit {limit})")

    if bad:
        return 1
    print(f"layers ok: {len(g.files)} modules, no import cycle, none over {limit} lines")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
