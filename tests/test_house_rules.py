"""The house rule of docs/design.md ("Rooms and layers"), read from the code: a module of ``unguide_jax`` imports
only from its own room or from rooms below it, and no chain of imports inside the package comes back to
where it started. Every import counts, at module level or inside a function, type-checking ones too."""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "unguide_jax"

# From the ground up; a room may import the rooms before it. The package's own __init__ (the lazy public
# names) sits just below the jobs.
LAYERS = (
    "lazy_names", "resources", "json_files", "settings", "presets",  # the ground: no model code
    "parallel", "models",
    "edits",          # the Edit pytree and LoRA: what the sampler applies
    "diffusion",      # schedulers, the pipeline object, the sampler
    "loading",        # checkpoints and edit/LoRA file formats in and out
    "erasers",
    "training",       # runs, checkpoints, trainers, edits loaded from any source
    "shapes",         # the embedded model, its data, evaluator and recipe
    "sampling",       # the sample job
    "evaluation",
    "publishing",     # model cards, unguide.json, the export job
    "pytorch",        # UnGuidePipeline for diffusers users
    "__init__",
    "jobs",
    "cli",            # argv -> settings -> a job; nothing imports it
)


def room_of(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(path: Path, module: str) -> str:
    return module if path.name == "__init__.py" else module.rsplit(".", 1)[0]


def imports() -> dict[str, set[str]]:
    """module -> the ``unguide_jax`` modules it imports (``from a import b`` names module ``a.b`` when it is one)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package_of(path, module).split(".")
                    base = base[:len(base) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]  # unguide_jax.a.b.name -> the module unguide_jax.a.b
                if target in modules and target != module and target.startswith("unguide_jax"):
                    graph[module].add(target)
    return graph


def test_every_room_has_a_layer():
    rooms = {room_of(module_name(p)) for p in PACKAGE.rglob("*.py")}
    assert rooms <= set(LAYERS), f"rooms without a layer in docs/design.md and LAYERS: {sorted(rooms - set(LAYERS))}"


def test_no_import_reaches_up_a_layer():
    rank = {room: i for i, room in enumerate(LAYERS)}
    upward = sorted(f"{a} -> {b}" for a, targets in imports().items() for b in targets
                    if rank[room_of(b)] > rank[room_of(a)])
    assert not upward, "imports from a lower layer into a higher one:\n" + "\n".join(upward)


def test_no_import_circle():
    graph = imports()
    circles, state = [], {}

    def visit(module: str, stack: list[str]) -> None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                circles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_the_rule_sees_imports():
    """The reader is not vacuous: known downward imports are found."""
    graph = imports()
    assert "unguide_jax.settings" in graph["unguide_jax.edits.lora"]
    assert "unguide_jax.edits.edit" in graph["unguide_jax.diffusion.sampler"]
    assert "unguide_jax.jobs" in graph["unguide_jax.cli.train"]
