// A test-only service for the hostile-input tests (tests/test_hostile_server.py, tests/test_hostile_listeners.py).

struct Node {
    1: optional Node child
}

service HostileService {
    string say();
    string boom(1: string text);
    i32 depth(1: Node node);
    string echo(1: string text);
}
