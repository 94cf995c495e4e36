"""Helpers shared by the benchmark driver and its worker processes: statistics,
child-process management (nothing outlives the run), and the stack watchdog."""

import contextlib
import ctypes
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDL = os.path.join(ROOT, "idl", "demo.thrift")
SERVICE = "DemoService"

# spawn, never fork: the driver holds kazoo threads, and a forked kazoo is broken.
CTX = multiprocessing.get_context("spawn")


class BenchError(Exception):
    """A real failure of the benchmark (not a missed performance target)."""


# -- statistics ----------------------------------------------------------------

def percentile(values, q):
    """Nearest-rank percentile of `values` (q in 0..100); None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(round(q / 100.0 * len(ordered) + 0.5)) - 1))
    return ordered[rank]


def median(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2.0


def latency_summary(samples):
    """p50/p99/mean in microseconds of per-call latencies given in seconds."""
    if not samples:
        return {"p50_us": None, "p99_us": None, "mean_us": None, "n": 0}
    ordered = sorted(samples)
    return {"p50_us": percentile(ordered, 50) * 1e6, "p99_us": percentile(ordered, 99) * 1e6,
            "mean_us": sum(ordered) / len(ordered) * 1e6, "n": len(ordered)}


def ratio(value, anchor):
    if value is None or anchor in (None, 0):
        return None
    return value / float(anchor)


# -- /proc (Linux; no psutil needed) ------------------------------------------------------

_TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid):
    """Fields of /proc/<pid>/stat after the command name (index 0 = state), or None."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2:].split()


def start_ticks(pid):
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def descendants(pid):
    """Pids of every live descendant of `pid`."""
    children = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields:
                children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def cpu_seconds(pid, with_descendants=True):
    """User+system CPU seconds of `pid` (and its live descendants)."""
    total = 0.0
    for one in [pid] + (descendants(pid) if with_descendants else []):
        fields = _stat(one)
        if fields:
            total += (int(fields[11]) + int(fields[12])) / float(_TICKS)
    return total


def rss_bytes():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def machine_cpu_seconds():
    """(busy, steal) CPU-seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as handle:
        values = [int(v) for v in handle.readline().split()[1:]]
    values += [0] * (8 - len(values))
    user, nice, system, idle, iowait, irq, softirq, steal = values[:8]
    return (user + nice + system + irq + softirq) / float(_TICKS), steal / float(_TICKS)


# -- worker processes --------------------------------------------------------------

def _die_with_parent():
    """Linux: get SIGKILL when the parent dies, however it dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _sigterm(signum, frame):
    raise SystemExit(0)


def child_entry(conn, module, function, kwargs):
    """Runs in every worker process: set up signals, run `module.function(conn, **kwargs)`,
    report an exception to the parent as {"error": traceback}."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the driver's to handle
    signal.signal(signal.SIGTERM, _sigterm)
    if os.getppid() == 1:
        os._exit(1)
    try:
        import importlib
        target = getattr(importlib.import_module(module), function)
        target(conn, **kwargs)
    except SystemExit:
        pass
    except BaseException:
        try:
            conn.send({"error": traceback.format_exc()})
        except Exception:
            pass
        os._exit(1)
    finally:
        try:
            conn.close()
        except Exception:
            pass


class Worker(object):
    """One worker process and the parent's end of its pipe."""

    def __init__(self, name, process, conn):
        self.name = name
        self.process = process
        self.conn = conn

    @property
    def pid(self):
        return self.process.pid

    def send(self, message):
        self.conn.send(message)

    def recv(self, timeout=60.0):
        if not self.conn.poll(timeout):
            raise BenchError("worker %s (pid %s) did not answer within %.0f s"
                             % (self.name, self.pid, timeout))
        try:
            message = self.conn.recv()
        except EOFError:
            self.process.join(1.0)
            raise BenchError("worker %s (pid %s) died (exit code %s)"
                             % (self.name, self.pid, self.process.exitcode))
        check_message(self.name, message)
        return message

    def ask(self, message, timeout=120.0):
        self.send(message)
        return self.recv(timeout)


def check_message(name, message):
    if isinstance(message, dict) and "error" in message:
        raise BenchError("worker %s failed:\n%s" % (name, message["error"]))


class Workers(object):
    """Every worker process the driver starts; `stop_all()` leaves none behind."""

    def __init__(self, watchdog=None):
        self.workers = []
        self.watchdog = watchdog

    def start(self, name, module, function, **kwargs):
        parent_conn, child_conn = CTX.Pipe()
        process = CTX.Process(target=child_entry, args=(child_conn, module, function, kwargs),
                              name="bench-" + name)
        process.start()
        child_conn.close()
        worker = Worker(name, process, parent_conn)
        self.workers.append(worker)
        if self.watchdog is not None:
            self.watchdog.track(process.pid)
        return worker

    def stop(self, worker, timeout=5.0):
        """Ask politely (None on the pipe), then SIGTERM, then SIGKILL, children too."""
        descendants = _descendants(worker.pid)
        try:
            worker.conn.send(None)
        except (OSError, ValueError, BrokenPipeError):
            pass
        worker.process.join(timeout)
        if worker.process.is_alive():
            worker.process.terminate()
            worker.process.join(2.0)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join(2.0)
        _kill_all(descendants)
        try:
            worker.conn.close()
        except Exception:
            pass
        if worker in self.workers:
            self.workers.remove(worker)

    def stop_many(self, workers, timeout=10.0):
        """Stop a batch in parallel: a polite None to all, one shared deadline."""
        descendants = []
        for worker in workers:
            descendants.extend(_descendants(worker.pid))
            try:
                worker.conn.send(None)
            except (OSError, ValueError, BrokenPipeError):
                pass
        deadline = time.monotonic() + timeout
        for worker in workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
        for worker in workers:
            if worker.process.is_alive():
                worker.process.terminate()
        for worker in workers:
            worker.process.join(2.0)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(2.0)
            try:
                worker.conn.close()
            except Exception:
                pass
            if worker in self.workers:
                self.workers.remove(worker)
        _kill_all(descendants)

    def stop_all(self):
        self.stop_many(list(self.workers), timeout=5.0)


def _descendants(pid):
    return [(child, start_ticks(child)) for child in descendants(pid)]


def _kill_all(processes):
    for pid, started in processes:
        if started is not None and start_ticks(pid) == started:  # not a recycled pid
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


# -- the watchdog ------------------------------------------------------------------------

_WATCHDOG = r"""
import os, shutil, signal, sys
state_dir, scratch = sys.argv[1], sys.argv[2]
def started(pid):
    try:
        with open("/proc/%d/stat" % pid, "rb") as handle:
            data = handle.read()
        return int(data[data.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None
def children_of():
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry, "rb") as handle:
                    data = handle.read()
                table.setdefault(int(data[data.rindex(b")") + 2:].split()[1]), []).append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return table
pids = []
for line in sys.stdin:              # EOF: the driver is gone (or done)
    try:
        pid, ticks = line.split()
        pids.append((int(pid), int(ticks)))
    except ValueError:
        pass
try:
    table = children_of()
    doomed = []
    for pid, ticks in pids:
        if started(pid) == ticks:
            todo = [pid]
            while todo:
                one = todo.pop()
                doomed.append(one)
                todo.extend(table.get(one, ()))
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
except OSError:
    pass
try:
    from probe.dev.stack import Stack
    Stack(state_dir=state_dir, ports="free").down(wipe=True)
finally:
    shutil.rmtree(scratch, ignore_errors=True)
"""


class Watchdog(object):
    """A process in its own session that outlives the driver by a moment: when the
    driver's pipe closes (normal end, exception, Ctrl-C, even SIGKILL) it kills the
    tracked workers, stops the stack and deletes the scratch folder."""

    def __init__(self, state_dir, scratch):
        self.process = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, state_dir, scratch], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, start_new_session=True, cwd=ROOT)

    def track(self, pid):
        ticks = start_ticks(pid)
        if ticks is None:
            return
        try:
            self.process.stdin.write(("%d %d\n" % (pid, ticks)).encode())
            self.process.stdin.flush()
        except (OSError, ValueError):
            pass

    def finish(self, timeout=60.0):
        """Close the pipe and wait for the cleanup to complete."""
        try:
            self.process.stdin.close()
        except (OSError, ValueError):
            pass
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()


# -- CPU placement -----------------------------------------------------------------------

def set_affinity(pid, cpus):
    """Pin every thread of `pid` and of its child processes to `cpus` (None: all CPUs).
    Threads created later inherit it from their creator. False when none could be pinned."""
    cpus = set(range(os.cpu_count() or 1)) if cpus is None else set(cpus)
    pids = [pid] + descendants(pid)
    done = False
    for proc in pids:
        try:
            tids = [int(t) for t in os.listdir("/proc/%d/task" % proc)]
        except OSError:
            tids = [proc]
        for tid in tids:
            try:
                os.sched_setaffinity(tid, cpus)
                done = True
            except OSError:
                pass
    return done


# -- propagation: one admin write -> N consumer processes (sections 6 and 7) --------------

class Propagation(object):
    """What one propagation bench varies; `measure_propagation` does the rest.

    :param label: names the bench in log lines and errors ("propagation").
    :param worker: the consumer worker, ``(module, function)``; it takes ``conn``, the
        keyword arguments `start_kwargs(i)` returns, sends ``("ready", t, ...)``, one
        message per change it sees and answers "cpu" (see `serve_cpu_requests`).
    :param name: worker name prefix ("consumer" makes consumer0, consumer1, ...).
    :param write: ``write(value)`` makes the admin change that consumers must see.
    :param arrived: ``arrived(message, value)``: does this consumer message carry `value`?
    :param what: names the value in the timeout error ("weight").
    :param call_key: the raw-results key of the admin call durations.
    :param cpu_key: the raw-results key of the consumers' CPU per change.
    """

    def __init__(self, label, worker, name, start_kwargs, write, arrived, what,
                 call_key, cpu_key):
        self.label, self.worker, self.name = label, worker, name
        self.start_kwargs, self.write, self.arrived, self.what = start_kwargs, write, arrived, what
        self.call_key, self.cpu_key = call_key, cpu_key


@contextlib.contextmanager
def timed_znode_writes(kazoo):
    """While the block runs, the wall-clock times at which `kazoo.set()` returned
    (the admin writes Redis or MySQL around the znode: this times the znode alone)."""
    written = []
    original_set = kazoo.set

    def timed_set(*args, **kwargs):
        result = original_set(*args, **kwargs)
        written.append(time.time())
        return result
    kazoo.set = timed_set
    try:
        yield written
    finally:
        kazoo.set = original_set


def measure_propagation(bench, spec, n, changes, value, written):
    """Start `n` consumers, make `changes` admin writes of value+1, value+2, ... and
    time until the last consumer saw each; returns (raw results, last value)."""
    bench.log("%s: starting %d consumer processes" % (spec.label, n))
    consumers = [bench.workers.start("%s%d" % (spec.name, i), spec.worker[0], spec.worker[1],
                                     **spec.start_kwargs(i))
                 for i in range(n)]
    out = {"from_return_ms": [], "from_write_ms": [], "from_call_ms": [],
           "each_from_write_ms": [], spec.call_key: []}
    try:
        started = time.monotonic()
        for consumer in consumers:
            message = consumer.recv(max(5.0, 240 - (time.monotonic() - started)))
            if message[0] != "ready":
                raise BenchError("%s consumer sent %r before ready" % (spec.label, message))
        bench.log("%s: %d consumers ready in %.1f s; %d changes"
                  % (spec.label, n, time.monotonic() - started, changes))
        for _ in range(changes):
            value += 1
            del written[:]
            t_call = time.time()
            spec.write(value)
            t_return = time.time()
            seen = _collect_arrivals(spec, consumers, value, timeout=15.0)
            t_write = written[-1] if written else t_return
            last = max(seen)
            out["from_return_ms"].append((last - t_return) * 1e3)
            out["from_write_ms"].append((last - t_write) * 1e3)
            out["from_call_ms"].append((last - t_call) * 1e3)
            out["each_from_write_ms"].extend((t - t_write) * 1e3 for t in seen)
            out[spec.call_key].append((t_return - t_call) * 1e3)
            time.sleep(0.05)
        cpu, counted = 0.0, 0
        for consumer in consumers:
            consumer.send("cpu")
            while True:
                message = consumer.recv(30)
                if message[0] == "cpu":
                    cpu += message[1]
                    counted += message[2]
                    break
        out[spec.cpu_key] = cpu / max(1, counted) * 1e3
    finally:
        bench.workers.stop_many(consumers)
    return out, value


def _collect_arrivals(spec, consumers, value, timeout):
    """Wait until every consumer reports `value`; the wall-clock times they saw it."""
    import multiprocessing.connection
    by_conn = {consumer.conn: i for i, consumer in enumerate(consumers)}
    seen = [None] * len(consumers)
    waiting = set(by_conn)
    deadline = time.monotonic() + timeout
    while waiting:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BenchError("%d of %d %s consumers did not see %s %d within %.0f s"
                             % (len(waiting), len(consumers), spec.label, spec.what, value,
                                timeout))
        for conn in multiprocessing.connection.wait(list(waiting), left):
            try:
                message = conn.recv()
            except EOFError:
                raise BenchError("%s consumer %d died" % (spec.label, by_conn[conn]))
            check_message("%s%d" % (spec.name, by_conn[conn]), message)
            if spec.arrived(message, value):
                seen[by_conn[conn]] = message[1]
                waiting.discard(conn)
    return seen


def report_propagation(report, section, per_n, call, return_note, cpu_title, limit,
                       call_key, cpu_key):
    """The rows of a propagation section, anchored on the smallest N.

    :param call: the admin call's name as the rows show it ("set_weight()").
    :param return_note: the note on the first "from ... return" row.
    :param cpu_title: names the consumer CPU row ("consumer CPU per table update").
    :param limit: the p99 target in ms.
    """
    first = min(per_n)
    anchor = "N=%d" % first
    for key, title, note in (
            ("from_return_ms", "from %s return" % call, return_note),
            ("from_write_ms", "from the znode write", "same, counted from the znode set() returning")):
        for stat, q in (("p50", 50), ("p99", 99)):
            base = percentile(per_n[first][key], q)
            for n in sorted(per_n):
                report.add(section, "N=%d, all consumers, %s, %s" % (n, title, stat),
                           percentile(per_n[n][key], q), "ms", anchor, base,
                           target=("value<", limit) if stat == "p99" else None,
                           note=note if (n == first and stat == "p50") else None)
    base = median(per_n[first][call_key])
    for n in sorted(per_n):
        report.add(section, "N=%d, %s call duration, median" % (n, call),
                   median(per_n[n][call_key]), "ms", anchor, base)
    base = per_n[first][cpu_key]
    for n in sorted(per_n):
        report.add(section, "N=%d, %s" % (n, cpu_title), per_n[n][cpu_key], "ms", anchor, base,
                   note="N x this / %d cores bounds how fast the last consumer can be"
                   % (os.cpu_count() or 1) if n == max(per_n) else None)


def serve_until_stopped(conn, answer):
    """A worker's loop: `answer(message)` each message of the driver until it sends
    None or closes the pipe."""
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        answer(message)


def serve_cpu_requests(conn, send_lock, counted):
    """A consumer worker's loop once it sent "ready": answer each "cpu" with the CPU
    seconds it spent and the changes it counted since (`counted()`)."""
    cpu_ready, counted_ready = time.process_time(), counted()

    def answer(message):
        if message == "cpu":
            with send_lock:
                conn.send(("cpu", time.process_time() - cpu_ready, counted() - counted_ready))
    serve_until_stopped(conn, answer)
