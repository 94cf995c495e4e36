"""probe's lean compact protocol (probe.rpc.compact.FastCompactProtocol) against
thriftpy2's own TCompactProtocol: the same bytes for the same message, the same
values decoded, the same errors for truncated input and out-of-range integers.
Seeded random structs of every Thrift type (nested structs, lists, sets, maps,
bools, far-apart field ids, non-ASCII strings, extreme integers)."""

import os
import random

import thriftpy2
from thriftpy2.protocol import TCompactProtocol
from thriftpy2.transport.memory import TCyMemoryBuffer

from probe.rpc.compact import FastCompactProtocol

m = thriftpy2.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "compact_fuzz.thrift"),
                   module_name="compact_fuzz_thrift")
R = random.Random(1)


def rs(): return "".join(R.choice("aé€x\U0001F600") for _ in range(R.choice([0,1,5,130,2000])))
def ri(bits): return R.choice([0, 1, -1, 63, 64, -64, -65, 127, 128, 2**(bits-1)-1, -2**(bits-1), R.randint(-2**(bits-1), 2**(bits-1)-1)])
def inner():
    x = m.Inner()
    if R.random()<.7: x.a = ri(32)
    if R.random()<.7: x.s = rs()
    if R.random()<.7: x.b = R.random()<.5
    if R.random()<.5: x.far = ri(64)
    return x
def big():
    x = m.Big(); g = {
      "b1": lambda: R.random()<.5, "y": lambda: R.randint(-128, 127), "h": lambda: ri(16), "i": lambda: ri(32), "l": lambda: ri(64),
      "d": lambda: R.random()*1e10, "s": rs, "bn": lambda: rs().encode(), "li": lambda: [ri(32) for _ in range(R.randint(0,20))],
      "ss": lambda: {rs() for _ in range(R.randint(0,3))}, "m": lambda: {rs(): ri(64) for _ in range(R.randint(0,3))},
      "inner": inner, "lin": lambda: [inner() for _ in range(R.randint(0,17))], "b2": lambda: R.random()<.5,
      "farstr": rs, "farh": lambda: ri(16), "farl": lambda: ri(64), "lb": lambda: [R.random()<.5 for _ in range(R.randint(0,4))],
      "mi": lambda: {ri(32): inner() for _ in range(R.randint(0,3))}, "b3": lambda: R.random()<.5, "farbin": lambda: rs().encode()}
    for k, f in g.items():
        if R.random() < .6: setattr(x, k, f())
    return x
def enc(P, obj, name, ttype, seqid):
    b = TCyMemoryBuffer(); p = P(b); p.write_message_begin(name, ttype, seqid); p.write_struct(obj); p.write_message_end(); return b.getvalue()
def dec(P, data):
    b = TCyMemoryBuffer(data); p = P(b); h = p.read_message_begin(); o = m.Big(); p.read_struct(o); p.read_message_end(); return h, o


def test_fast_compact_protocol_is_byte_for_byte_thriftpy2s():
    for n in range(600):
        o = big()
        name = R.choice(["say", "x" * 200, "\u00e9", b"raw"])
        t = R.randint(1, 4)
        sq = R.choice([0, 1, 127, 128, 2**31 - 1, R.randint(0, 2**31 - 1)])
        a = enc(TCompactProtocol, o, name, t, sq)
        assert enc(FastCompactProtocol, o, name, t, sq) == a, n
        ha, oa = dec(TCompactProtocol, a)
        hb, ob = dec(FastCompactProtocol, a)
        assert ha == hb and oa == ob, n
        cut = a[:R.randint(0, len(a))]
        results = []
        for P in (TCompactProtocol, FastCompactProtocol):
            try:
                results.append(("ok", dec(P, cut)))
            except Exception as exc:
                results.append(("err", type(exc).__name__))
        assert results[0] == results[1], n


def test_out_of_range_values_fail_alike():
    for bad in ({"h": 2**15}, {"i": 2**31}, {"l": 2**63}, {"s": 5}):
        o = m.Big(**bad)
        results = []
        for P in (TCompactProtocol, FastCompactProtocol):
            try:
                enc(P, o, "n", 1, 1)
                results.append("ok")
            except Exception as exc:
                results.append((type(exc).__name__, str(exc)))
        assert results[0] == results[1], bad
    for text in ("abc", "\u00e9\u20ac", ""):
        o = m.Big(bn=text, farbin=text)
        assert enc(TCompactProtocol, o, "n", 1, 1) == enc(FastCompactProtocol, o, "n", 1, 1)
