"""Imports point one way: pure modules never import I/O (DESIGN.md §2)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "balancer"
PURE = (
    "config", "errors", "backends", "policies", "pool", "record", "http1", "deadlines",
    "writebatch", "exchange", "http1_response", "aggregate", "status_page", "loglines",
    "overrides", "prelude", "config_dns",
)  # fmt: skip
IO_MODULES = {"asyncio", "socket", "ssl", "os", "time", "uvloop", "selectors", "subprocess"}
BALANCER_IO = {
    "session", "upstream", "legs", "server", "cli", "tls", "certs", "tcpinfo", "observe", "admin",
    "farm", "accept", "demo", "forward", "http_flow", "tls_front", "listener", "supervisor",
    "worker", "notify", "health", "control",
}  # fmt: skip
# DESIGN.md: a class past ~400 lines or a module past ~700 is asking to be split.
MAX_CLASS_LINES, MAX_MODULE_LINES = 430, 700


def imported(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_pure_modules_import_no_io() -> None:
    for module in PURE:
        names = imported(module)
        top = {name.split(".")[0] for name in names}
        assert not top & IO_MODULES, (module, top & IO_MODULES)
        ours = {name.split(".")[1] for name in names if name.startswith("balancer.")}
        assert not ours & BALANCER_IO, (module, ours & BALANCER_IO)


def test_legs_know_nothing_of_sessions_or_backends() -> None:
    """A Leg is one TCP connection side: it must not reach up into what uses it."""
    ours = {name.split(".")[1] for name in imported("legs") if name.startswith("balancer.")}
    assert not ours & {"session", "upstream", "server"}, ours
    upstream = {name.split(".")[1] for name in imported("upstream") if name.startswith("balancer.")}
    assert "session" not in upstream


def test_no_class_or_module_outgrows_one_concern() -> None:
    """Docstrings included; the limits are a prompt to split along a concern, kept here so
    the next feature meets them rather than the next reviewer."""
    too_big = []
    for path in sorted(PACKAGE.glob("*.py")):
        text = path.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            too_big.append((path.name, text.count("\n")))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_CLASS_LINES:
                    too_big.append((f"{path.name}:{node.name}", lines))
    assert not too_big, too_big


def test_the_session_parts_reach_the_backend_only_through_the_forwarder() -> None:
    """The HTTP flow and the TLS front decide; only forward.py holds backend connections."""
    for module in ("http_flow", "tls_front"):
        ours = {name.split(".")[1] for name in imported(module) if name.startswith("balancer.")}
        assert not ours & {"upstream", "pool", "legs"}, (module, ours)


def ours(module: str) -> set[str]:
    """The package's modules `module` imports, at any level (TYPE_CHECKING blocks and
    function bodies included): `from balancer import x` and `from balancer.x import y`."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "balancer":
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("balancer."):
            found.add((node.module or "").split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("balancer."))
    return found & MODULES


MODULES = {path.stem for path in PACKAGE.glob("*.py")}


def test_only_the_builder_of_sessions_imports_the_session() -> None:
    """The session's parts see it through contract.py's Protocols (and the listener's
    connections through listener.OpenConnection): only server.py, which makes sessions,
    imports session.py."""
    importers = {module for module in MODULES if "session" in ours(module)}
    assert importers == {"server"}, importers


def test_no_import_cycle_at_any_level() -> None:
    """Not even between type annotations: a module can be read knowing only those below it."""
    graph = {module: ours(module) - {module} for module in MODULES}
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
    from balancer.causes import CLOSE_CAUSES
    from balancer.errors import BalancerError

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
    from balancer.causes import BACKEND_CONNECTION_CLOSE_CAUSES

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
    from balancer.causes import BACKEND_CONNECTION_CLOSE_CAUSES, CLOSE_CAUSES

    words = set(CLOSE_CAUSES) | set(BACKEND_CONNECTION_CLOSE_CAUSES)
    for path in PACKAGE.glob("*.py"):
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
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else []
            for target in targets:
                if isinstance(target, ast.Attribute) and target.attr == "close_cause":
                    assert path.name == "record.py", f"{path.name}:{node.lineno} sets close_cause"
