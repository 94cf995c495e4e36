"""What a call of one thrift method needs, looked up once: the client and the
server both read their method's shape from here instead of from thriftpy2's
generated classes on every call."""

from typing import Dict, Tuple

from thriftpy2.thrift import TMessageType


class MethodSpec(object):
    """One method of a thriftpy2 service.

    :param service: the thriftpy2 service class (``module.DemoService``).
    :param name: the method's name in the IDL.
    """

    __slots__ = ("name", "args_cls", "result_cls", "arg_names", "oneway", "has_success",
                 "void", "exceptions", "message_type")

    name: str
    args_cls: type
    result_cls: type
    arg_names: Tuple[str, ...]
    oneway: bool
    has_success: bool
    void: bool
    exceptions: Tuple[Tuple[str, type], ...]
    message_type: int

    def __init__(self, service: type, name: str) -> None:
        self.name = name
        self.args_cls = getattr(service, name + "_args")
        self.result_cls = getattr(service, name + "_result")
        args_spec = getattr(self.args_cls, "thrift_spec")
        self.arg_names = tuple(args_spec[key][1] for key in sorted(args_spec))
        self.oneway = bool(getattr(self.result_cls, "oneway", False))
        result_spec = getattr(self.result_cls, "thrift_spec")
        self.has_success = any(item[1] == "success" for item in result_spec.values())
        self.void = not result_spec
        # (result field name, exception class) of every declared exception.
        self.exceptions = tuple((item[1], item[2]) for _, item in sorted(result_spec.items())
                                if item[1] != "success")
        self.message_type = TMessageType.ONEWAY if self.oneway else TMessageType.CALL

    def __repr__(self) -> str:
        return "<MethodSpec %s>" % self.name


def method_specs(service: type) -> Dict[str, MethodSpec]:
    """{name: MethodSpec} for every method of a thriftpy2 service."""
    return {name: MethodSpec(service, name) for name in getattr(service, "thrift_services")}
