#!/usr/bin/env python3
"""Fails when the modules of a crate import each other in a circle.

A module is a file `src/NAME.rs` (with the files under `src/NAME/`); an import is a path
`crate::NAME` (in a `use` or inline) in a module other than NAME, outside its `#[cfg(test)]`
tests.

A crate root (`lib.rs`, `main.rs`) that holds only `mod` declarations, `use`s (re-exports) and
attributes is a facade and is left out: declaring and re-exporting modules is not depending on
them. A root that defines items of its own is a module like the others, named after its file:
`crate::Item` of one of its items is an import of it, and `NAME::` in its own code (outside its
`mod` and `use` lines) is its import of module NAME. So a root that holds a module's type while
the module uses one of the root's is a circle (the runtime's `lib.rs` was one, until issue 21).

`crate::Item` of an item the root re-exports is not followed to the module that defines it:
inside a crate, name the module (`crate::code::Prepared`). (Following them would show the
store's row readers and its domain modules importing each other: not yet untangled.)

Usage: scripts/check-circles.py [CRATES_DIR]   (default: crates)
"""
import re
import sys
from pathlib import Path

USE_BLOCK = re.compile(r"\buse\s+crate::\{(.*?)\};", re.S)
PATH = re.compile(r"\bcrate::([A-Za-z_][A-Za-z0-9_]*)")
ROOTS = ("lib.rs", "main.rs")
MOD_OR_USE = re.compile(r"^\s*(pub(\([a-z]+\))?\s+)?(mod\s+\w+\s*;|use\s[^;]*;)", re.M)
ATTRIBUTE = re.compile(r"#!?\[[^\]]*\]")
ITEM = re.compile(
    r"^\s*(?:pub(?:\([a-z]+\))?\s+)?(?:async\s+|unsafe\s+)*"
    r"(?:struct|enum|union|trait|type|fn|const|static)\s+([A-Za-z_][A-Za-z0-9_]*)",
    re.M,
)


def module_of(src: Path, file: Path) -> str | None:
    rel = file.relative_to(src)
    if len(rel.parts) == 1 and rel.name in ROOTS:
        return rel.name
    return rel.parts[0].removesuffix(".rs")


def without_tests(text: str) -> str:
    cut = re.search(r"#\[cfg\(test\)\]\s*mod\s+\w+\s*\{", text)
    text = text[: cut.start()] if cut else text
    return re.sub(r"//[^\n]*", "", text)


def own_code(root: str) -> str:
    """A crate root without its `mod` and `use` lines and attributes: empty for a facade."""
    return ATTRIBUTE.sub("", MOD_OR_USE.sub("", root)).strip()


def imports(text: str) -> set[str]:
    found = set(PATH.findall(text))
    for block in USE_BLOCK.findall(text):
        # `use crate::{a::X, b, c::{Y, Z}}`: the first segment of each top-level item.
        depth, item = 0, ""
        for ch in block + ",":
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            if ch == "," and depth == 0:
                name = item.strip().split("::")[0].strip()
                if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                    found.add(name)
                item = ""
            else:
                item += ch
    return found


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "crates")
    failed = False
    for src in sorted(root.glob("*/src")):
        modules = {module_of(src, f) for f in src.rglob("*.rs")} - set(ROOTS)
        # What `crate::NAME` names: a module, or an item of a root that is not a facade.
        owner = {m: m for m in modules}
        for name in ROOTS:
            code = own_code(without_tests((src / name).read_text())) if (src / name).exists() else ""
            if code:
                modules.add(name)
                owner.update({item: name for item in ITEM.findall(code)})
        graph: dict[str, set[str]] = {m: set() for m in modules}
        ties: dict[tuple[str, str], set[str]] = {}
        for file in src.rglob("*.rs"):
            m = module_of(src, file)
            if m not in modules:
                continue
            text = without_tests(file.read_text())
            found = {owner.get(name) for name in imports(text)}
            if m in ROOTS:
                found |= set(re.findall(r"\b([a-z_][a-z0-9_]*)::", own_code(text)))
            for target in found:
                if target in modules and target != m:
                    graph[m].add(target)
                    ties.setdefault((m, target), set()).add(str(file))
        for component in circles(graph):
            failed = True
            print(f"{src.parent.name}: modules in a circle: {', '.join(component)}")
            for a in component:
                for b in sorted(graph[a] & set(component)):
                    print(f"  {a} -> {b} ({', '.join(sorted(ties[(a, b)]))})")
    if not failed:
        print(f"no circles between the modules of {len(list(root.glob('*/src')))} crates")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
