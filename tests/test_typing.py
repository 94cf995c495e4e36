"""Type hints: scripts/type-coverage.py counts what it says, and the modules that
pyproject.toml holds to `disallow_untyped_defs` exist and are fully annotated
(`make typecheck` runs mypy itself)."""

import ast
import importlib.util
import os
import textwrap
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "probe")


def _coverage_script():
    spec = importlib.util.spec_from_file_location(
        "type_coverage", os.path.join(ROOT, "scripts", "type-coverage.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


coverage = _coverage_script()


def _counted(source):
    """{qualified name: complete?} of the functions the script counts in `source`."""
    tree = ast.parse(textwrap.dedent(source))
    return {name: coverage.is_complete(node, is_method)
            for name, node, is_method in coverage.public_functions(tree)}


def test_functions_need_every_parameter_and_the_return():
    assert _counted("""
        def full(a: int, *args: str, b: int = 1, **kw: object) -> None: ...
        def no_return(a: int): ...
        def one_bare(a: int, b) -> None: ...
        def bare_args(a: int, *args) -> None: ...
        def bare_kwargs(*, k: int, **kw) -> None: ...
        def nothing() -> int: ...
        async def coroutine(a: int) -> int: ...
        def posonly(a, /) -> None: ...
    """) == {"full": True, "no_return": False, "one_bare": False, "bare_args": False,
             "bare_kwargs": False, "nothing": True, "coroutine": True, "posonly": False}


def test_methods_skip_self_and_cls_but_not_a_static_first_parameter():
    assert _counted("""
        class Public:
            def method(self, a: int) -> int: ...
            @classmethod
            def make(cls) -> "Public": ...
            @staticmethod
            def static(a) -> None: ...
            @staticmethod
            def static_ok(a: int) -> None: ...
            def bare(self): ...
            @property
            def size(self) -> int: ...
    """) == {"Public.method": True, "Public.make": True, "Public.static": False,
             "Public.static_ok": True, "Public.bare": False, "Public.size": True}


def test_init_may_omit_none_only_when_a_parameter_is_annotated():
    # mypy's rule: `def __init__(self, x: int)` is typed, `def __init__(self)` is not.
    assert _counted("""
        class A:
            def __init__(self, x: int): ...
        class B:
            def __init__(self): ...
        class C:
            def __init__(self) -> None: ...
        class D:
            def __init__(self, x): ...
    """) == {"A.__init__": True, "B.__init__": False, "C.__init__": True, "D.__init__": False}


def test_private_and_nested_functions_are_not_counted():
    assert _counted("""
        def _helper(a): ...
        def __getattr__(name): ...
        class _Private:
            def method(self, a): ...
        class Public:
            def _internal(self, a): ...
            def __repr__(self): ...
            def outer(self) -> None:
                def inner(a): ...
        def top() -> None:
            def nested(b): ...
    """) == {"Public.outer": True, "top": True}


def test_scan_skips_private_modules_and_reports_the_share(tmp_path, capsys):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("def typed(a: int) -> int: return a\n")
    (package / "half.py").write_text("def typed() -> None: ...\ndef bare(x): ...\n")
    (package / "_private.py").write_text("def bare(x): ...\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "empty.py").write_text("X = 1\n")
    rows = coverage.scan(str(package))
    assert [(name, done, total) for name, done, total, _ in rows] == [
        ("pkg", 1, 1), ("pkg.half", 1, 2)]
    assert rows[1][3] == ["bare"]
    assert coverage.main([str(package), "--fail-under", "66"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split()[1:] == ["2/3", "66.7%"]
    assert coverage.main([str(package), "--fail-under", "67"]) == 1


def _strict_modules():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        config = tomllib.load(handle)["tool"]["mypy"]
    names = []
    for override in config.get("overrides", []):
        if override.get("disallow_untyped_defs"):
            module = override["module"]
            names.extend([module] if isinstance(module, str) else module)
    return names


def _module_paths(name):
    """Files of module `name` ("probe.x" or "probe.x.*") inside the repository."""
    parts = name.split(".")
    if parts[-1] == "*":
        folder = os.path.join(ROOT, *parts[:-1])
        return [os.path.join(base, f) for base, _, files in os.walk(folder)
                for f in files if f.endswith(".py")]
    base = os.path.join(ROOT, *parts)
    return [path for path in (base + ".py", os.path.join(base, "__init__.py"))
            if os.path.isfile(path)]


def test_every_strict_module_exists():
    # mypy only notes an override that matches nothing: a module moved into a plane
    # folder would silently lose its check unless its entry moves with it.
    names = _strict_modules()
    assert "probe.naming" in names
    assert [name for name in names if not _module_paths(name)] == []


def test_strict_modules_are_fully_annotated():
    rows = {name: missing for name, _, _, missing in coverage.scan(PACKAGE)}
    strict = set()
    for name in _strict_modules():
        for path in _module_paths(name):
            strict.add(coverage.module_name(PACKAGE, path))
    assert strict
    assert {name: rows[name] for name in strict if rows.get(name)} == {}
