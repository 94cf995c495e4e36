// The demo service used by the README, the examples, the tests and the benchmark.
// This file ships in the package for `probe demo`; idl/demo.thrift is a symlink to it.

exception DemoError {
    1: string message
}

service DemoService {
    string say();
    string echo(1: string text);
    i32 add(1: i32 a, 2: i32 b);
    string fail(1: string message) throws (1: DemoError error);
    string slow(1: i32 millis);
    string whoami();
    i32 pid();
}
