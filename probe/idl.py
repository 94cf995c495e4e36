"""Load a thrift IDL file once per process and find a service in it.

probe's clients and providers use the module parsed here. Code that needs the
IDL's structs or declared exceptions must take them from the same module
(:func:`load_thrift`): ``thriftpy2.load`` on the same file builds other classes,
and ``except DemoError`` would not catch what a probe client raises.
"""

import os
import re
import threading
from types import ModuleType
from typing import Dict, Optional

import thriftpy2

from .errors import ThriftFileError
from .naming import check_service_name

_modules: Dict[str, ModuleType] = {}
_lock = threading.Lock()


def load_module(thrift_path: str) -> ModuleType:
    """The thriftpy2 module for `thrift_path`, parsed once per process.

    :param thrift_path: path of a .thrift file; paths naming the same file (after
        resolving symlinks) share one module.
    :raises probe.errors.ThriftFileError: the file is missing or does not parse.
    """
    if not isinstance(thrift_path, str) or not thrift_path:
        raise ThriftFileError("thrift_path must be a path to a .thrift file, got %r" % (thrift_path,))
    path = os.path.realpath(thrift_path)
    if not os.path.isfile(path):
        raise ThriftFileError("thrift file %r not found (resolved to %s, cwd %s)"
                              % (thrift_path, path, os.getcwd()))
    with _lock:
        module = _modules.get(path)
        if module is None:
            stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
            try:
                module = thriftpy2.load(path, module_name="%s_thrift" % stem)
            except Exception as exc:  # thriftpy2 raises several parser error types
                raise ThriftFileError("thrift file %s does not parse: %s" % (path, exc))
            _modules[path] = module
    return module


def load_thrift(thrift_path: str) -> ModuleType:
    """The IDL module probe uses for `thrift_path`: its structs and exceptions are
    the classes probe clients return and raise, and providers receive.

    Use it instead of ``thriftpy2.load`` for a file probe also serves or calls::

        demo = probe.load_thrift("demo.thrift")
        try:
            client.fail("boom")
        except demo.DemoError as exc:
            ...

    :param thrift_path: path of the .thrift file given to ``build_client`` or
        ``start_service``.
    :raises probe.errors.ThriftFileError: the file is missing or does not parse.
    """
    return load_module(thrift_path)


def load_service(thrift_path: str, service_name: str) -> type:
    """The thriftpy2 service class `service_name` defined in `thrift_path`."""
    check_service_name(service_name)
    module = load_module(thrift_path)
    service = getattr(module, service_name, None)
    if service is None or not hasattr(service, "thrift_services"):
        defined = sorted(name for name, value in vars(module).items()
                         if hasattr(value, "thrift_services"))
        raise ThriftFileError("thrift file %s defines no service %r (it defines: %s)"
                              % (thrift_path, service_name, ", ".join(defined) or "none"))
    return service


def module_of(service: object) -> Optional[ModuleType]:
    """The module loaded here that defines the service class `service`, or None."""
    with _lock:
        modules = list(_modules.values())
    for module in modules:
        if any(value is service for value in vars(module).values()):
            return module
    return None
