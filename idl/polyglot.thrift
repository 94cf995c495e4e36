// The service the polyglot tests (tests/test_polyglot.py) serve and call in Java,
// Node and Python: a struct of the types whose encodings differ most between the
// binary and compact protocols, a declared exception, and a oneway method.

namespace java probe.polyglot

struct Sample {
    1: i64 id,
    2: list<string> tags,
    3: map<string, i64> counts,
    4: binary blob,
}

exception PolyError {
    1: string message
}

service PolyService {
    Sample roundtrip(1: Sample sample);
    string whoami();
    string fail(1: string message) throws (1: PolyError error);
    oneway void note(1: string text);
    string notes();
}
