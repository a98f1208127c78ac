"""The layout rules of docs/development.md, checked over the tree: prints one line per breach and
exits 1 when there is any.

    .venv/bin/python scripts/check_house.py [--root DIR] [--commits REV_RANGE]

Rules (package code: neoxq/, convert/, runtime/):
- functions of at most MAX_FUNCTION_LINES lines;
- imports at the top of a module, except the heavy optional libraries (HEAVY) and, in neoxq/cli/,
  a command's own library (each command loads only what it uses);
- no import cycle between neoxq's modules (top-level imports);
- comments and docstrings carry no issue numbers and no measured figures (ratios, timings):
  those live in docs/ and the benchmarks' output;
- every top-level function and class is used somewhere in the tree (no dead code);
- README.md is a guide of at most README_MAX_LINES lines;
- in docs/benchmarks.md, a section whose heading names a benchmark script shows that script's
  tables only as rendered from its JSON (scripts/bench_docs.py), none written by hand;
- with --commits, every commit subject in the range is at most 72 characters.
"""

from __future__ import annotations

import argparse
import ast
import io
import re
import subprocess
import sys
import tokenize
from collections import Counter
from pathlib import Path

PACKAGE = ("neoxq", "convert", "runtime")
MAX_FUNCTION_LINES = 60
README_MAX_LINES = 250
SUBJECT_MAX = 72
# The optional extras' libraries (and the server's), imported where a function needs them so that
# the base install and every command's start-up do without them.
HEAVY = {
    "torch",
    "transformers",
    "lm_eval",
    "ray",
    "matplotlib",
    "huggingface_hub",
    "scipy",
    "tokenizers",
    "safetensors",
    "accelerate",
    "datasets",
    "fastapi",
    "starlette",
    "uvicorn",
    "sse_starlette",
    "pydantic",
    "readline",  # a terminal's line editing, absent on some Pythons
    "neoxq.lmeval",  # lm-eval's model class: it imports lm-eval
}
FIGURE = re.compile(
    r"\b[Ii]ssue \d+"  # an issue number
    r"|\d\.\d+ ?[×x]\b|\d\.\d+×"  # a measured ratio: 0.21×, 1.08x
    r"|\b\d+(\.\d+)? (ms|s)\b"  # a timing: 55 ms, 0.45 s
    r"|\b[Mm]easured (on|in|here|by)\b"  # a measurement's report
)


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in ("convert", "runtime"):
        parts = ["neoxq", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_files(root: Path) -> list[Path]:
    return sorted(p for d in PACKAGE for p in (root / d).rglob("*.py"))


def _imported(node: ast.AST, mod: str, is_pkg: bool) -> list[str]:
    """Absolute module names an import statement names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = mod if is_pkg else mod.rpartition(".")[0]
    for _ in range(max(node.level - 1, 0)):
        base = base.rpartition(".")[0]
    target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
    return [target, *(f"{target}.{a.name}" for a in node.names)]


def check_functions(path: Path, tree: ast.AST, rel: str) -> list[str]:
    out = []
    for n in ast.walk(tree):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = n.end_lineno - n.lineno + 1
            if length > MAX_FUNCTION_LINES:
                out.append(f"{rel}:{n.lineno}: {n.name} is {length} lines (at most {MAX_FUNCTION_LINES})")
    return out


def _guarded(tree: ast.AST) -> set[int]:
    """Imports inside `try: … except ImportError`: an optional dependency, checked where it is needed."""
    ids = set()
    for t in ast.walk(tree):
        if isinstance(t, ast.Try) and any(
            "ImportError" in ast.unparse(h.type or ast.Name("")) or "ModuleNotFoundError" in ast.unparse(h.type or ast.Name("")) for h in t.handlers
        ):
            ids |= {id(n) for stmt in t.body for n in ast.walk(stmt)}
    return ids


def check_local_imports(tree: ast.AST, rel: str) -> list[str]:
    out = []
    in_cli = rel.startswith("neoxq/cli/")
    guarded = _guarded(tree)
    for f in ast.walk(tree):
        if not isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for n in ast.walk(f):
            if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in guarded:
                top = "." if isinstance(n, ast.ImportFrom) and n.level else (n.module if isinstance(n, ast.ImportFrom) else n.names[0].name)
                if (top.split(".")[0] in HEAVY) or top in HEAVY:
                    continue
                top = top.split(".")[0]
                if top in HEAVY or (in_cli and (top in ("neoxq", ".") or top in ("importlib", "json"))):
                    continue
                out.append(f"{rel}:{n.lineno}: import inside {f.name}: {ast.unparse(n)} (imports go at the top)")
    return out


def comment_texts(src: str, tree: ast.AST) -> list[tuple[int, str]]:
    out = [(t.start[0], t.string) for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT]
    for n in ast.walk(tree):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)) and n.body:
            first = n.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                out += [(first.lineno + i, line) for i, line in enumerate(first.value.value.splitlines())]
    return out


def check_figures(src: str, tree: ast.AST, rel: str) -> list[str]:
    return [
        f"{rel}:{line}: a figure or issue number in a comment: {text.strip()[:90]!r} (put it in docs/)"
        for line, text in comment_texts(src, tree)
        if FIGURE.search(text)
    ]


def check_cycles(graph: dict[str, set[str]]) -> list[str]:
    """One line per import cycle among the modules (Tarjan's strongly connected components)."""
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
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append("import cycle: " + " ↔ ".join(sorted(comp)))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def top_level_imports(tree: ast.AST, mod: str, is_pkg: bool, modules: set[str]) -> set[str]:
    deps = set()
    for n in tree.body:
        if isinstance(n, (ast.Import, ast.ImportFrom)):
            deps |= {m for m in _imported(n, mod, is_pkg) if m in modules and m != mod and not mod.startswith(m + ".")}
    return deps


def check_dead(root: Path, trees: dict[Path, ast.AST]) -> list[str]:
    """Top-level functions and classes whose name appears nowhere but in their own definition."""
    corpus = "\n".join(p.read_text() for d in (*PACKAGE, "quant_tests", "scripts") for p in (root / d).rglob("*.py"))
    corpus += (root / "pyproject.toml").read_text()
    words = Counter(re.findall(r"\w+", corpus))
    out = []
    for path, tree in trees.items():
        for n in tree.body:
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not n.name.startswith("__") and not n.decorator_list:
                if words[n.name] < 2:
                    out.append(f"{path.relative_to(root)}:{n.lineno}: {n.name} is never used (remove it)")
    return out


def check_commits(root: Path, rev_range: str) -> list[str]:
    log = subprocess.run(["git", "-C", str(root), "log", "--format=%h %s", rev_range], capture_output=True, text=True, check=True).stdout
    return [
        f"commit {line[:9]}: subject of {len(line) - 8} characters (at most {SUBJECT_MAX})"
        for line in log.splitlines()
        if len(line) - 8 > SUBJECT_MAX
    ]


BENCH_HEADING = re.compile(r"scripts/bench_\w+\.py")


def check_bench_tables(root: Path) -> list[str]:
    """Tables under a heading that names a benchmark script, outside the generated blocks."""
    path = root / "docs" / "benchmarks.md"
    if not path.is_file():
        return []
    problems, heading, generated = [], "", False
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("<!-- generated by"):
            generated = True
        elif line.startswith("<!-- end generated"):
            generated = False
        elif line.startswith("#"):
            heading, named = line.lstrip("# "), bool(BENCH_HEADING.search(line))
        elif line.startswith("|---") and not generated and heading and named:
            problems.append(f"docs/benchmarks.md:{i}: a table written by hand under '{heading}'; render it from the script's JSON")
    return problems


def check(root: Path, commits: str | None = None) -> list[str]:
    problems: list[str] = []
    files = package_files(root)
    trees = {p: ast.parse(p.read_text()) for p in files}
    names = {module_name(p, root): p for p in files}
    graph = {}
    for mod, p in names.items():
        rel = str(p.relative_to(root))
        src, tree = p.read_text(), trees[p]
        problems += check_functions(p, tree, rel) + check_local_imports(tree, rel) + check_figures(src, tree, rel)
        graph[mod] = top_level_imports(tree, mod, p.name == "__init__.py", set(names))
    problems += check_cycles(graph) + check_dead(root, trees)
    readme = root / "README.md"
    n = len(readme.read_text().splitlines()) if readme.exists() else 0
    if n > README_MAX_LINES:
        problems.append(f"README.md: {n} lines (a guide of at most {README_MAX_LINES}; the rest goes in docs/)")
    problems += check_bench_tables(root)
    if commits:
        problems += check_commits(root, commits)
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    ap.add_argument("--commits", help="a git revision range whose commit subjects are checked, e.g. 79830b1..HEAD")
    args = ap.parse_args()
    problems = check(args.root, args.commits)
    for line in problems:
        print(line)
    print(f"{len(problems)} problems" if problems else "the house rules hold")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
