#!/usr/bin/env python3
"""Share of probe's public functions and methods that carry complete type hints.

    python scripts/type-coverage.py [PACKAGE_DIR] [--fail-under PERCENT]

Counted: module-level functions and the methods of module-level classes whose
names do not start with "_", plus ``__init__`` (the constructor's signature is
public API), in modules and classes that are not private themselves. Nested
functions are not counted. Complete means every parameter is annotated (``self``
/ ``cls`` excepted, ``*args`` / ``**kwargs`` included) and so is the return;
``__init__`` may leave out ``-> None`` when it annotates a parameter, as mypy
allows. Reads the source with ``ast`` only: nothing is imported or executed.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from typing import Iterator, List, Optional, Tuple, Union

FunctionNode = Union[ast.FunctionDef, ast.AsyncFunctionDef]


def _is_public(name: str) -> bool:
    return not name.startswith("_") or name == "__init__"


def _is_static(node: FunctionNode) -> bool:
    return any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in node.decorator_list)


def is_complete(node: FunctionNode, is_method: bool) -> bool:
    """True when every parameter (bar self/cls) and the return carry a hint."""
    args = node.args
    positional = list(args.posonlyargs) + list(args.args)
    if is_method and not _is_static(node) and positional:
        positional = positional[1:]  # self or cls: mypy infers it
    params = positional + list(args.kwonlyargs)
    params += [a for a in (args.vararg, args.kwarg) if a is not None]
    if any(p.annotation is None for p in params):
        return False
    if node.returns is not None:
        return True
    # mypy treats `def __init__(self, x: int)` as typed; a bare one is not.
    return node.name == "__init__" and bool(params)


def public_functions(tree: ast.Module) -> Iterator[Tuple[str, FunctionNode, bool]]:
    """(qualified name, node, is_method) for each counted function of a module."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if _is_public(node.name) and node.name != "__init__":
                yield node.name, node, False
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and _is_public(item.name):
                    yield "%s.%s" % (node.name, item.name), item, True


def module_name(root: str, path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(os.path.abspath(root)))
    parts = rel[:-len(".py")].split(os.sep)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_private_module(name: str) -> bool:
    return any(p.startswith("_") for p in name.split("."))


def scan(root: str) -> List[Tuple[str, int, int, List[str]]]:
    """(module, complete, total, incomplete names) for each module under root."""
    rows = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for filename in sorted(files):
            if not filename.endswith(".py"):
                continue
            path = os.path.join(folder, filename)
            name = module_name(root, path)
            if _is_private_module(name):
                continue
            with open(path, encoding="utf-8") as handle:
                tree = ast.parse(handle.read(), filename=path)
            complete, missing = 0, []
            found = list(public_functions(tree))
            for qualname, node, is_method in found:
                if is_complete(node, is_method):
                    complete += 1
                else:
                    missing.append(qualname)
            if found:
                rows.append((name, complete, len(found), missing))
    return rows


def _share(complete: int, total: int) -> float:
    return 100.0 * complete / total if total else 100.0


def main(argv: Optional[List[str]] = None) -> int:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", nargs="?", default=os.path.join(here, "probe"))
    parser.add_argument("--fail-under", type=float, default=None, metavar="PERCENT",
                        help="exit 1 when the overall share is below PERCENT")
    parser.add_argument("--missing", action="store_true",
                        help="also list the functions that lack hints")
    options = parser.parse_args(argv)
    if not os.path.isdir(options.package):
        parser.error("no such package folder: %s" % options.package)

    rows = scan(options.package)
    width = max([len(r[0]) for r in rows] + [len("module")])
    print("%-*s  %8s  %6s" % (width, "module", "typed", "share"))
    for name, complete, total, missing in rows:
        print("%-*s  %8s  %5.1f%%" % (width, name, "%d/%d" % (complete, total),
                                      _share(complete, total)))
        if options.missing:
            for qualname in missing:
                print("%-*s    - %s" % (width, "", qualname))
    complete = sum(r[1] for r in rows)
    total = sum(r[2] for r in rows)
    overall = _share(complete, total)
    print("%-*s  %8s  %5.1f%%" % (width, "TOTAL", "%d/%d" % (complete, total), overall))
    if options.fail_under is not None and overall < options.fail_under:
        print("type coverage %.1f%% is below %.1f%%" % (overall, options.fail_under),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
