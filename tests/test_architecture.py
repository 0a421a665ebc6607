"""The house (docs/architecture.md, "Rooms"): each room imports only rooms below it, no
file-level import circle anywhere, cli.py knows no room above the ground floor, and the
package top holds only the entry points, the config and the error base."""

import ast
import pathlib

import pytest

import flaxformer_lite
from flaxformer_lite import errors

PACKAGE = pathlib.Path(flaxformer_lite.__file__).parent
# Lowest first; a module may import its own room and the rooms listed before it.
ROOMS = ("errors", "config", "ops", "layers", "models", "runtime", "data", "interop", "inference", "train",
         "plan", "serve", "bench")
TOP = {"__init__", "__main__", "cli", "viz"}  # entry points: may import any room
# Rooms that must not import a given lower room (DESIGN.md): data never sees the models.
FORBIDDEN = {"data": {"models", "layers"}}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(name: str, path: pathlib.Path, module_level_only: bool) -> set[str]:
    """Modules of the package that `name` imports (a package's __init__ counts as the package)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                stem = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(stem + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            # A module's parent packages are imported before it whatever it says: not an edge.
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


def _room(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def test_the_package_top_holds_only_entry_points_config_and_errors():
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert top == {"__init__", "__main__", "cli", "config", "errors"}
    rooms = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert rooms == set(ROOMS[2:]) | {"viz"}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_import_points_down(module):
    room = _room(module)
    for target in _imports(module, MODULES[module], module_level_only=False):
        to = _room(target)
        if room in TOP or to == room or to == "__init__":  # the package's lazy_exports helper
            continue
        assert to not in TOP, f"{module} imports {target}: an entry point, above every room"
        assert ROOMS.index(to) < ROOMS.index(room), f"{module} ({room}/) imports {target} ({to}/), a room above it"
        assert to not in FORBIDDEN.get(room, ()), f"{module} imports {target}: {room}/ never imports {to}/"


def test_no_import_circle_between_files():
    edges = {m: _imports(m, p, module_level_only=True) for m, p in MODULES.items()}
    state = {}  # module -> "open" while on the DFS path, "done" after

    def visit(module, path):
        state[module] = "open"
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                cycle = path[path.index(target):] + [target]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [module])


def test_cli_knows_no_room_above_the_ground_floor():
    imported = _imports("flaxformer_lite.cli", MODULES["flaxformer_lite.cli"], module_level_only=False)
    rooms = {_room(m) for m in imported}
    assert not rooms & {"data", "interop", "train", "serve", "inference", "bench"}, sorted(imported)


def test_every_bad_input_error_derives_from_the_one_base():
    from flaxformer_lite.config import ConfigError
    from flaxformer_lite.data import DataError
    from flaxformer_lite.inference.engine import Draining, EngineError, QueueFull
    from flaxformer_lite.interop.layout import HFError

    for error in (ConfigError, DataError, HFError, EngineError, QueueFull, Draining):
        assert issubclass(error, errors.UserError), error
        assert error("x").exit_status == errors.EXIT_BAD_INPUT
    assert (QueueFull.http_status, Draining.http_status, EngineError.http_status) == (429, 503, 400)
