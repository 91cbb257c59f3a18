"""The package's shape, held: folders are layers and imports point down (DESIGN.md §2), pure
modules import no I/O, the session's parts see it through a contract, no import cycle at any
level, and one word and one writer per fact."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "balancer"
# The subpackages, lowest first: a module imports only from its own layer or those below.
# `ls balancer/` is this list, plus the command line (cli.py, __main__.py) above them all.
LAYERS = ("config", "wire", "facts", "net", "backend", "client", "observe", "process", "demo")
TOP_LEVEL = {"__init__", "__main__", "cli"}
PURE = (
    "config.schema", "config.listeners", "config.values", "config.dns", "config.overrides",
    "wire.errors",
    "wire.backend_head", "wire.h2_fields", "wire.hpack_codec", "wire.response_reader",
    "wire.h2_connection", "wire.h2_frames",
    "wire.http1", "wire.http1_response", "wire.proxy_protocol", "wire.sni", "facts.record",
    "facts.causes", "net.deadlines", "net.writebatch", "backend.state", "backend.policies",
    "backend.pool", "client.exchange", "client.prelude", "observe.aggregate",
    "observe.status_page", "observe.loglines", "observe.families",
)  # fmt: skip
IO_MODULES = {"asyncio", "socket", "ssl", "os", "time", "uvloop", "selectors", "subprocess"}
# DESIGN.md: a class past ~400 lines or a module past ~700 is asking to be split.
MAX_CLASS_LINES, MAX_MODULE_LINES = 400, 700


def module_name(path: Path) -> str:
    """`client.session` for balancer/client/session.py, `client` for its __init__.py."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


# A native module (the compiled build's net/_fdsocket.c) is here by its stub: a leaf.
MODULES = {module_name(path): path for path in [*PACKAGE.rglob("*.py"), *PACKAGE.rglob("*.pyi")]}


def ours(module: str, annotations: bool = True) -> set[str]:
    """The package's modules `module` imports, at any level (function bodies included, and
    TYPE_CHECKING blocks unless `annotations` is False): `from balancer.x import y` is module
    x, or x.y when y is one; `from balancer import build` is the package's __init__."""
    tree = ast.parse(MODULES[module].read_text())
    if not annotations:
        tree.body = [node for node in tree.body if not _type_checking(node)]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "balancer":
            base = (node.module or "").removeprefix("balancer").lstrip(".")
            for alias in node.names:
                sub = f"{base}.{alias.name}".lstrip(".")
                found.add(sub if sub in MODULES else base or "__init__")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("balancer."):
                    found.add(alias.name.removeprefix("balancer."))
    return found - {module}


def _type_checking(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"


def layer(module: str) -> int:
    """The package's __init__ (its version and build) is below every layer; the command line
    above them all."""
    if module == "__init__":
        return -1
    top = module.split(".")[0]
    return LAYERS.index(top) if top in LAYERS else len(LAYERS)


def test_the_folders_are_the_layers() -> None:
    """`ls balancer/` is the architecture map: every module lives in a layer's folder (the
    command line aside), and the folders are exactly the layers."""
    folders = {path.name for path in PACKAGE.iterdir() if path.is_dir() and path.name[0] != "_"}
    assert folders == set(LAYERS)
    loose = {module for module in MODULES if "." not in module} - TOP_LEVEL - set(LAYERS)
    assert not loose, loose


def test_imports_point_down() -> None:
    """No module imports from a layer above its own, not even for a type annotation."""
    upward = [
        f"{module} -> {imported}"
        for module in sorted(MODULES)
        for imported in sorted(ours(module))
        if layer(imported) > layer(module)
    ]
    assert not upward, upward


def test_pure_modules_import_no_io() -> None:
    for module in PURE:
        tree = ast.parse(MODULES[module].read_text())
        top = {
            name.split(".")[0]
            for node in ast.walk(tree)
            for name in (
                [alias.name for alias in node.names] if isinstance(node, ast.Import)
                else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            )
        }  # fmt: skip
        assert not top & IO_MODULES, (module, top & IO_MODULES)
        impure = {name for name in ours(module, annotations=False) if layer(name) >= 0}
        impure -= set(PURE) | set(LAYERS)
        assert not impure, (module, impure)


def test_no_class_or_module_outgrows_one_concern() -> None:
    """Docstrings included; the limits are a prompt to split along a concern, kept here so
    the next feature meets them rather than the next reviewer."""
    too_big = []
    for module, path in sorted(MODULES.items()):
        text = path.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            too_big.append((module, text.count("\n")))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_CLASS_LINES:
                    too_big.append((f"{module}:{node.name}", lines))
    assert not too_big, too_big


def test_the_session_parts_reach_the_backend_only_through_the_forwarder() -> None:
    """The HTTP flow and the TLS front decide; only forward.py holds backend connections."""
    for module in ("client.http_flow", "client.tls_front"):
        held = ours(module) & {"backend.connection", "backend.pool", "net.legs"}
        assert not held, (module, held)


def test_only_the_builder_of_sessions_imports_the_session() -> None:
    """The session's parts see it through contract.py's Protocols (and the listener's
    connections through listener.OpenConnection): only server.py, which makes sessions,
    imports session.py."""
    importers = {module for module in MODULES if "client.session" in ours(module)}
    assert importers == {"process.server"}, importers


def test_no_import_cycle_at_any_level() -> None:
    """Not even between type annotations: a module can be read knowing only those below it."""
    graph = {module: ours(module) for module in MODULES}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError(" -> ".join([*path[path.index(module) :], module]))
        if module in done:
            return
        for imported_module in sorted(graph[module]):
            visit(imported_module, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_the_readme_names_every_close_cause() -> None:
    """causes.CLOSE_CAUSES is the one list of why a client connection ended; the README's
    record table must name each (a cause added in code and not documented fails here)."""
    from balancer.facts.causes import CLOSE_CAUSES
    from balancer.wire.errors import BalancerError

    readme = (PACKAGE.parent / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `close_cause`"))
    missing = [cause for cause in CLOSE_CAUSES if f"`{cause}`" not in row]
    assert not missing, missing
    reasons = {cls.reason for cls in _subclasses(BalancerError)}
    # An error whose reason is a close cause says the same fact in both places (a timeout;
    # the backend's FIN or RST with a response owed); no other may take a cause's name.
    same_fact = {"header_timeout", "backend_timeout", "backend_closed", "backend_reset"}
    assert not reasons & CLOSE_CAUSES.keys() - same_fact


def test_the_readme_names_every_backend_connection_close_cause() -> None:
    """Likewise for backend connections: their metric's row lists every cause."""
    from balancer.facts.causes import BACKEND_CONNECTION_CLOSE_CAUSES

    readme = (PACKAGE.parent / "README.md").read_text()
    row = next(
        x
        for x in readme.splitlines()
        if x.startswith("| `balancer_backend_connections_closed_total`")
    )
    missing = [cause for cause in BACKEND_CONNECTION_CLOSE_CAUSES if f"`{cause}`" not in row]
    assert not missing, missing


def test_close_causes_are_named_in_one_module() -> None:
    """Each vocabulary is causes.py's: no other module names a cause string as a constant (two
    tables once had colliding names for the two kinds of connection)."""
    from balancer.facts.causes import BACKEND_CONNECTION_CLOSE_CAUSES, CLOSE_CAUSES

    words = set(CLOSE_CAUSES) | set(BACKEND_CONNECTION_CLOSE_CAUSES)
    for path in PACKAGE.rglob("*.py"):
        if path.name == "causes.py":
            continue
        for node in ast.parse(path.read_text()).body:
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Constant)
                and node.value.value in words
            ):
                raise AssertionError(f"{path.name}:{node.lineno} names {node.value.value!r}")


def _subclasses(cls: type) -> list[type]:
    found = [cls]
    for sub in cls.__subclasses__():
        found += _subclasses(sub)
    return found


def test_close_cause_has_one_writer() -> None:
    """Why a connection ended is named in one place (record.ended_by: the first decision
    stands); an assignment anywhere else could overwrite it with a consequence."""
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else []
            for target in targets:
                if isinstance(target, ast.Attribute) and target.attr == "close_cause":
                    where = f"{path.relative_to(PACKAGE)}:{node.lineno}"
                    assert path == PACKAGE / "facts" / "record.py", f"{where} sets close_cause"


def test_one_word_for_the_backend() -> None:
    """ "Backend" in the code; "upstream" only for the `[upstream]` section (its dataclass
    `Upstream`, `Config.upstream`), which keeps the name operators know from nginx."""
    found = []
    for module, path in sorted(MODULES.items()):
        for node in ast.walk(ast.parse(path.read_text())):
            name = (
                node.id if isinstance(node, ast.Name)
                else node.attr if isinstance(node, ast.Attribute)
                else node.arg if isinstance(node, ast.arg)
                else node.name if isinstance(node, ast.FunctionDef | ast.ClassDef)
                else ""
            )  # fmt: skip
            if "upstream" in name.lower() and module != "config.schema" and name != "Upstream":
                if not (isinstance(node, ast.Attribute) and name == "upstream"):
                    found.append(f"{module}:{node.lineno} {name}")
                elif ast.unparse(node) not in {"config.upstream", "self.config.upstream"}:
                    found.append(f"{module}:{node.lineno} {ast.unparse(node)}")
    assert not found, found


def test_a_leg_writes_its_own_facts() -> None:
    """A side's teardown facts (`LegTeardown`: FIN, RST, close_notify, bytes, who began) are
    written by its Leg alone (net/legs.py), so one rule says when each becomes true."""
    written = []
    for module, path in sorted(MODULES.items()):
        if module in {"net.legs", "facts.record"}:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign | ast.AugAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    text = ast.unparse(target)
                    if ".facts." in text or "_leg." in text or text.startswith("facts."):
                        written.append(f"{module}:{node.lineno} {text}")
    assert not written, written
