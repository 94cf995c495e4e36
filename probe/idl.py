"""Load a thrift IDL file once per process and find a service in it."""

import os
import re
import threading

import thriftpy2

from .errors import ThriftFileError
from .naming import check_service_name

_modules = {}
_lock = threading.Lock()


def load_module(thrift_path):
    """The thriftpy2 module for `thrift_path`, parsed once per process."""
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


def load_service(thrift_path, service_name):
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
