"""The parts of src/orthodiff (each subpackage or top-level module) import one way:
oft -> models -> data/eval -> tasks -> entry points. Every import counts, the ones inside
functions included: a cycle hidden behind a lazy import is still a cycle. Outside models/,
nothing asks which kind of embedding it holds (its hooks decide)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "orthodiff"
# Parts that must not import each other in this direction (lower part -> higher part).
ENTRY_LEVEL = {"adapter", "pipelines", "reproduce", "editing", "app"}
LOWER_THAN = {"oft": {"models", "data", "eval", "tasks"} | ENTRY_LEVEL,
              "models": {"data", "eval", "tasks"} | ENTRY_LEVEL,
              "data": {"tasks"} | ENTRY_LEVEL,
              "eval": {"tasks"} | ENTRY_LEVEL,
              "tasks": ENTRY_LEVEL,
              # the applications (app/: train, generate, export, demo, ...) sit on top of everything
              **{part: {"app"} for part in ENTRY_LEVEL - {"app"}}}


def part_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def imported_parts(path: Path, root: Path = PACKAGE) -> set[str]:
    """The orthodiff parts a file imports (absolute and relative imports, at any depth)."""
    parts = set()
    package = path.relative_to(root.parent).with_suffix("").parts[:-1]  # e.g. ("orthodiff", "models")
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names = [module] if node.module else [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            pieces = name.split(".")
            if pieces[0] == "orthodiff" and len(pieces) > 1:
                parts.add(pieces[1])
    return parts


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        part = part_of(path)
        graph.setdefault(part, set()).update(imported_parts(path) - {part, "__init__"})
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_parts_form_no_import_cycle():
    graph = import_graph()
    assert {"oft", "models", "data", "eval", "tasks", "pipelines", "app"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_imports_run_from_the_core_outwards():
    graph = import_graph()
    wrong = sorted((part, other) for part, higher in LOWER_THAN.items() for other in graph.get(part, ()) & higher)
    assert not wrong, f"imports against the direction oft -> models -> data/eval -> tasks -> entry points: {wrong}"


def test_the_checker_sees_a_cycle_and_lazy_or_relative_imports(tmp_path):
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    module = tmp_path / "orthodiff" / "models" / "x.py"
    module.parent.mkdir(parents=True)
    module.write_text("from ..oft import cayley\n\ndef f():\n    from orthodiff.tasks import ControlTask\n")
    assert imported_parts(module, tmp_path / "orthodiff") == {"oft", "tasks"}


def test_inference_imports_neither_training_tasks_nor_lightning():
    """pipelines/, generate.py and export read and attach adapters without the training side:
    importing them leaves orthodiff.tasks and Lightning unloaded (a fresh interpreter)."""
    probe = ("import sys, orthodiff.pipelines, orthodiff.app.generate, orthodiff.app.export; "
             "print(sorted(m for m in ('orthodiff.tasks', 'pytorch_lightning', 'lightning_fabric') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout


def private_imports(path: Path, root: Path = PACKAGE) -> list[str]:
    """Underscored names a file takes from other orthodiff modules: `from orthodiff.x import _y`
    (relative imports too) and `m._y` on a name bound by an orthodiff import."""
    package = path.relative_to(root.parent).with_suffix("").parts[:-1]
    tree = ast.parse(path.read_text())
    found, bound = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            if module.split(".")[0] == "orthodiff":
                found += [f"from {module} import {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
                bound |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            bound |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.split(".")[0] == "orthodiff"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            chain = node.value
            while isinstance(chain, ast.Attribute):
                chain = chain.value
            if isinstance(chain, ast.Name) and chain.id in bound:
                found.append(f"{ast.unparse(node)} (line {node.lineno})")
    return found


def test_no_private_name_is_imported_across_files(tmp_path):
    """A name shared between files is public (no leading underscore); a private one stays in
    its file. The checker sees both ways of reaching one, then finds none in src/."""
    module = tmp_path / "orthodiff" / "eval" / "x.py"
    module.parent.mkdir(parents=True)
    module.write_text("from ..data import _a, b\nimport orthodiff.models.y as y\n\n"
                      "def f(self):\n    return y._c, b._d, self._e, _a\n")
    assert private_imports(module, tmp_path / "orthodiff") == [
        "from orthodiff.data import _a", "y._c (line 5)", "b._d (line 5)"]
    found = {str(path.relative_to(PACKAGE)): names for path in sorted(PACKAGE.rglob("*.py"))
             if (names := private_imports(path))}
    assert not found, f"private names used across files: {found}"


def kind_tests(path: Path) -> list[str]:
    """Lines of `path` that ask which embedding they hold: isinstance on an embedding class or
    config, a comparison with an embedding kind's name, or the kind read from an adapter's
    metadata or a task's hyperparameters. Outside models/ the embedding's hooks decide."""
    from orthodiff.models import EMBEDDING_TYPES, Embedding, EmbeddingConfig

    def subclasses(cls):
        return {cls} | {s for sub in cls.__subclasses__() for s in subclasses(sub)}

    classes = "|".join(sorted(c.__name__ for c in subclasses(Embedding) | subclasses(EmbeddingConfig)))
    kinds = "|".join(sorted({"none", *EMBEDDING_TYPES}))
    patterns = [rf"isinstance\([^)]*\b({classes})\b", rf"""(==|!=)\s*["']({kinds})["']""",
                rf"""["']({kinds})["']\s*(==|!=)""", r"""meta\w*(\[|\.get\()\s*["']embedding["']""",
                r"hparams\.embedding\b", r"\.kind\s*(==|!=)"]
    return [f"{path.name}:{number}: {line.strip()}" for number, line in enumerate(path.read_text().splitlines(), 1)
            if any(re.search(pattern, line) for pattern in patterns)]


def test_nothing_outside_models_asks_which_embedding_it_holds(tmp_path):
    """Subject methods' embeddings are one interface (models/embeddings.py): a caller uses their
    hooks, never their kind. The checker finds what the code did before issue 32, then nothing in src/."""
    before = tmp_path / "before.py"
    before.write_text('if isinstance(self.embedding, Perfusion):\n    pass\nif meta.get("embedding") == "perfusion":\n'
                      '    pass\nperfusion = module.hparams.embedding == "perfusion"\nif method == "perfusion":\n'
                      '    pass\nif kind == "pplus":\n    pass\nx = "textual_inversion" if e else "none"\n')
    assert [line.split(":")[1] for line in kind_tests(before)] == ["1", "3", "5", "6", "8"]
    found = [hit for path in sorted(PACKAGE.rglob("*.py")) if part_of(path) != "models" for hit in kind_tests(path)]
    assert not found, f"callers asking which embedding they hold: {found}"
