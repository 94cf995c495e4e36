"""Micro-benchmark of what recording one call costs on the call path.

    .venv/bin/python bench/metrics_observe.py [--calls N] [--rounds R]

Prints ns per call, best of R rounds in thread CPU time, for what the client does
on every call: `Recorder.thread_state()` once, then `observe_in(...)`; and for
`observe(...)` (both in one). The cost of the bare loop is measured the same way and subtracted.
No network, no Redis: only the in-process recording.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from probe import metrics  # noqa: E402

NODE = "DemoService_10.0.0.1_8081"
SECONDS = (0.00008, 0.0003, 0.0012, 0.004)  # several buckets, as real calls hit


def best_ns(body, calls, rounds):
    """The fastest of `rounds` runs of body(calls), in ns per call."""
    best = None
    for _ in range(rounds):
        started = time.thread_time_ns()
        body(calls)
        spent = (time.thread_time_ns() - started) / calls
        best = spent if best is None else min(best, spent)
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    recorder = metrics.Recorder("client", "bench_observe", "DemoService")
    thread_state, observe_in, observe = recorder.thread_state, recorder.observe_in, recorder.observe

    def empty(calls):
        for index in range(calls):
            SECONDS[index & 3]

    def client_path(calls):
        for index in range(calls):
            observe_in(thread_state(), "say", NODE, "ok", SECONDS[index & 3])

    def in_hand(calls):
        state = thread_state()
        for index in range(calls):
            observe_in(state, "say", NODE, "ok", SECONDS[index & 3])

    def one_call(calls):
        for index in range(calls):
            observe("say", NODE, "ok", SECONDS[index & 3])

    loop = best_ns(empty, args.calls, args.rounds)
    for name, body in (("thread_state() + observe_in()", client_path),
                       ("observe_in() (state in hand)", in_hand),
                       ("observe()", one_call)):
        print("%-32s %6.1f ns per call" % (name, best_ns(body, args.calls, args.rounds) - loop))
    calls = {}
    recorder.snapshot_into(calls)
    counted = sum(sum(cell[:-1]) for cell in calls.values())
    expected = 3 * args.calls * args.rounds
    if counted != expected:  # the benchmark measured something else than recording
        raise SystemExit("recorded %d calls, expected %d" % (counted, expected))


if __name__ == "__main__":
    main()
