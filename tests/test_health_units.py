"""Unit tests (no stack) for node health, the retry budget, p2c_ewma and the
overload reply: deterministic, with an injected clock and random source."""

import random
from collections import Counter

import pytest
from thriftpy2.thrift import TApplicationException
from thriftpy2.transport import TTransportException

from probe.routing.balancer import Node, RoutingTable, make_balancer
from probe.errors import InvalidHealthPolicy, NodeCallFailed, ProbeError
from probe.routing.budget import RetryBudget
from probe.routing.health import HealthPolicy, ServiceHealth
from probe.rpc.outcomes import (APPLICATION_ERROR, CONNECTION_ERROR, DECLARED_EXCEPTION,
                                NOT_SENT, OK, OVERLOADED, TIMEOUT)
from probe.rpc.overload import (OVERLOAD_PREFIX, InflightLimiter, is_overload_reply,
                                make_limiter, overload_reply, unforgeable)


class Clock(object):
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def nodes(count, weight=10):
    return [Node("S_127.0.0.1_%d" % (9000 + i), "127.0.0.1", 9000 + i, weight, 1)
            for i in range(count)]


def engine(policy=None, **kwargs):
    clock = Clock()
    return ServiceHealth(policy or HealthPolicy(), clock=clock, **kwargs), clock


def picks(health, table, count, seed=1, balancer=None):
    pick = (balancer or make_balancer("weighted_random", rng=random.Random(seed))).pick
    return Counter(health.choose(table, pick).name for _ in range(count))


# -- HealthPolicy ----------------------------------------------------------------------

@pytest.mark.parametrize("bad", [{"consecutive_failures": 0}, {"consecutive_failures": 2.5},
                                 {"failure_rate_percent": 0}, {"failure_rate_percent": 101},
                                 {"base_ejection_s": 0}, {"max_ejection_s": 0.5},
                                 {"max_ejected_percent": -1}, {"panic_threshold_percent": 150},
                                 {"latency_decay_s": 0}, {"slow_ratio": 0.5},
                                 {"min_health_factor": 0}, {"failure_window_s": float("nan")},
                                 {"consecutive_failures": True}])
def test_policy_refuses_bad_values_by_name(bad):
    with pytest.raises(InvalidHealthPolicy, match=list(bad)[0]):
        HealthPolicy(**bad)


def test_policy_is_frozen():
    policy = HealthPolicy()
    with pytest.raises(Exception):
        policy.consecutive_failures = 9


# -- ejection, half-open, re-admission --------------------------------------------------

def test_consecutive_failures_eject_and_declared_exceptions_do_not():
    health, clock = engine()
    a, b = nodes(2)
    table = RoutingTable([a, b])
    health.choose(table, make_balancer("weighted_random").pick)
    for _ in range(10):
        health.end(a, DECLARED_EXCEPTION, 0.001)
    health.end(a, TIMEOUT, 0.5)
    health.end(a, OK, 0.001)  # an answer resets the streak
    health.end(a, TIMEOUT, 0.5)
    health.end(a, APPLICATION_ERROR, 0.001)
    assert health.ejected() == {}
    health.end(a, CONNECTION_ERROR, 0.001)
    assert list(health.ejected()) == [a.name]
    assert "3 consecutive failures" in health.ejected()[a.name]
    assert set(picks(health, table, 200)) == {b.name}
    assert health.ejections == 1


def test_neutral_outcomes_count_neither_way():
    health, clock = engine()
    a, b = nodes(2)
    health.choose(RoutingTable([a, b]), make_balancer(None).pick)
    for _ in range(10):
        health.end(a, OVERLOADED, 0.001)
        health.end(a, NOT_SENT, 0.001)
    assert health.ejected() == {} and health.overloads == 10


def test_failure_rate_ejects_a_node_that_fails_every_other_call():
    health, clock = engine(HealthPolicy(failure_rate_percent=40, failure_min_calls=20))
    a, b = nodes(2)
    health.choose(RoutingTable([a, b]), make_balancer(None).pick)
    for i in range(9):
        health.end(a, OK, 0.001)
        health.end(a, APPLICATION_ERROR, 0.001)
        clock.now += 0.01
    assert health.ejected() == {}  # 18 calls: below failure_min_calls
    health.end(a, OK, 0.001)
    health.end(a, APPLICATION_ERROR, 0.001)
    assert "10 of 20 calls failed" in health.ejected()[a.name]


def test_failures_outside_the_window_are_forgotten():
    health, clock = engine(HealthPolicy(failure_rate_percent=40, failure_min_calls=20,
                                        failure_window_s=10))
    a, b = nodes(2)
    health.choose(RoutingTable([a, b]), make_balancer(None).pick)
    for _ in range(9):
        health.end(a, OK, 0.001)
        health.end(a, APPLICATION_ERROR, 0.001)
    clock.now += 30
    for _ in range(2):
        health.end(a, OK, 0.001)
        health.end(a, APPLICATION_ERROR, 0.001)
    assert health.ejected() == {}


def test_half_open_sends_one_probe_at_a_time_and_readmits_on_an_answer():
    health, clock = engine(HealthPolicy(base_ejection_s=1.0))
    a, b = nodes(2)
    table = RoutingTable([a, b])
    pick = make_balancer("weighted_random", rng=random.Random(3)).pick
    health.choose(table, pick)
    for _ in range(3):
        health.end(a, TIMEOUT, 0.5)
    assert a.name not in picks(health, table, 100)
    clock.now += 1.01  # the ejection is over: half-open
    health.end(b, OK, 0.001)  # the engine learns the time from attempts that end
    chosen = [health.choose(table, pick).name for _ in range(200)]
    assert chosen.count(a.name) == 1  # one probe; the rest avoid it while it is out
    health.end(a, OK, 0.001)
    assert health.ejected() == {} and health.readmissions == 1
    assert a.name in picks(health, table, 100)


def test_a_failed_probe_doubles_the_ejection_up_to_the_max():
    health, clock = engine(HealthPolicy(base_ejection_s=1.0, max_ejection_s=3.0))
    a, b = nodes(2)
    table = RoutingTable([a, b])
    pick = make_balancer("weighted_random", rng=random.Random(5)).pick
    health.choose(table, pick)
    for _ in range(3):
        health.end(a, TIMEOUT, 0.5)
    ejected_for = [health._states[a.name].ejected_until - clock.now]
    for _ in range(3):
        clock.now = health._states[a.name].ejected_until + 0.01
        while health.choose(table, pick).name != a.name:
            pass
        health.end(a, TIMEOUT, 0.5)  # the probe failed
        ejected_for.append(health._states[a.name].ejected_until - clock.now)
    assert [round(x, 3) for x in ejected_for] == [1.0, 2.0, 3.0, 3.0]
    assert health.ejections == 4 and "probe failed" in health.ejected()[a.name]


def test_a_probe_that_learns_nothing_frees_the_slot():
    health, clock = engine()
    a, b = nodes(2)
    table = RoutingTable([a, b])
    pick = make_balancer("weighted_random", rng=random.Random(7)).pick
    health.choose(table, pick)
    for _ in range(3):
        health.end(a, CONNECTION_ERROR, 0.001)
    clock.now += 1.01
    while health.choose(table, pick).name != a.name:
        pass
    health.end(a, OVERLOADED, 0.001)
    assert a.name in picks(health, table, 200)  # may be probed again


# -- never eject the service away ------------------------------------------------------

def test_at_most_the_capped_share_is_ejected_and_then_panic_mode():
    health, clock = engine(HealthPolicy(max_ejected_percent=50, panic_threshold_percent=50))
    four = nodes(4)
    table = RoutingTable(four)
    pick = make_balancer("weighted_random", rng=random.Random(11)).pick
    health.choose(table, pick)
    for node in four[:3]:
        for _ in range(3):
            health.end(node, TIMEOUT, 0.5)
    assert len(health.ejected()) == 2  # 50% of 4
    assert len(health.sick()) == 3
    counted = picks(health, table, 400)  # 1 of 4 healthy < 50%: panic, all nodes used
    assert health.panic and set(counted) == {n.name for n in four}
    assert health.panics == 1


def test_every_node_failing_routes_across_all_of_them():
    health, clock = engine()
    pair = nodes(2)
    table = RoutingTable(pair)
    health.choose(table, make_balancer(None).pick)
    for node in pair:
        for _ in range(5):
            health.end(node, CONNECTION_ERROR, 0.001)
    assert len(health.ejected()) == 1 and len(health.sick()) == 2
    assert set(picks(health, table, 200)) == {n.name for n in pair} and health.panic
    for node in pair:
        health.end(node, OK, 0.001)
    picks(health, table, 1)
    assert not health.panic and health.ejected() == {}


def test_one_node_is_never_ejected():
    health, clock = engine()
    (only,) = nodes(1)
    table = RoutingTable([only])
    health.choose(table, make_balancer(None).pick)
    for _ in range(10):
        health.end(only, TIMEOUT, 0.5)
    assert health.ejected() == {}
    assert set(picks(health, table, 10)) == {only.name}


# -- slowness --------------------------------------------------------------------------

def test_a_slow_node_loses_weight_and_regains_it():
    health, clock = engine()
    fast, slow = nodes(2)
    table = RoutingTable([fast, slow])
    health.choose(table, make_balancer(None).pick)
    for _ in range(200):
        clock.now += 0.01
        health.end(fast, OK, 0.0002)
        health.end(slow, OK, 0.050)
    clock.now += 0.2
    counted = picks(health, table, 4000)
    assert counted[slow.name] < 0.2 * 4000
    assert health.factors()[slow.name] < 0.3
    for _ in range(500):
        clock.now += 0.01
        health.end(fast, OK, 0.0002)
        health.end(slow, OK, 0.0002)
    clock.now += 0.2
    counted = picks(health, table, 4000)
    assert health.factors() == {} and counted[slow.name] > 0.4 * 4000


def test_small_latency_differences_do_not_scale_weights():
    health, clock = engine()
    a, b = nodes(2)
    table = RoutingTable([a, b])
    health.choose(table, make_balancer(None).pick)
    for _ in range(100):
        clock.now += 0.01
        health.end(a, OK, 0.0001)
        health.end(b, OK, 0.0009)  # 9x slower, but far under the 5 ms margin
    clock.now += 0.2
    picks(health, table, 1)
    assert health.factors() == {}


def test_p2c_ewma_prefers_the_lower_latency_times_inflight():
    health, clock = engine(track_inflight=True)
    fast, slow = nodes(2)
    table = RoutingTable([fast, slow])
    for _ in range(20):
        clock.now += 0.01
        for node, seconds in ((fast, 0.001), (slow, 0.004)):
            health.begin(node)
            health.end(node, OK, seconds)
    clock.now += 0.2
    health.choose(table, make_balancer(None).pick)  # latency samples are folded in
    balancer = make_balancer("p2c_ewma", cost=health.cost, rng=random.Random(2))
    counted = Counter(balancer.pick(table).name for _ in range(1000))
    assert counted[fast.name] >= 700  # every draw of both picks fast
    for _ in range(5):
        health.begin(fast)  # 5 in flight: 0.001 * 6 > 0.004 * 1
    counted = Counter(balancer.pick(table).name for _ in range(1000))
    assert counted[slow.name] >= 700


def test_p2c_ewma_needs_a_cost_function():
    with pytest.raises(ProbeError, match="cost"):
        make_balancer("p2c_ewma")


# -- the retry budget ------------------------------------------------------------------

def test_retry_budget_allows_percent_of_calls_plus_per_second():
    clock = Clock()
    budget = RetryBudget(percent=20, min_per_second=10, clock=clock)
    allowed = 0
    for second in range(5):
        for _ in range(1000):
            budget.deposit()
            if budget.try_withdraw():
                allowed += 1
            clock.now += 0.001
    # 20% of 5000 calls + 10/s over 5 s + the 10 banked at the start
    assert 1000 <= allowed <= 1000 + 50 + 10


def test_retry_budget_does_not_bank_a_long_quiet_spell_or_a_long_healthy_one():
    clock = Clock()
    budget = RetryBudget(percent=20, min_per_second=10, clock=clock)
    for _ in range(100000):
        budget.deposit()  # a long healthy run: no retries needed
    clock.now += 600
    allowed = sum(budget.try_withdraw() for _ in range(10000))
    assert allowed <= 10 + 20000 / 600 + 1


def test_retry_budget_validates():
    with pytest.raises(InvalidHealthPolicy, match="percent"):
        RetryBudget(percent=-1)
    with pytest.raises(InvalidHealthPolicy, match="min_per_second"):
        RetryBudget(min_per_second="10")


# -- errors and the overload reply -----------------------------------------------------

def test_node_call_failed_is_a_transport_error_naming_node_service_and_method():
    cause = TTransportException(TTransportException.TIMED_OUT, "timed out")
    error = NodeCallFailed("S_127.0.0.1_9000", "app/S", "slow", cause)
    assert isinstance(error, TTransportException) and isinstance(error, ProbeError)
    assert error.type == TTransportException.TIMED_OUT
    assert "S_127.0.0.1_9000" in str(error) and "app/S.slow" in str(error)
    assert error.__cause__ is cause


def test_overload_reply_is_recognised_and_cannot_be_forged():
    reply = overload_reply("DemoService", "slow", "max_inflight", 4)
    assert reply.type == TApplicationException.INTERNAL_ERROR
    assert reply.message == OVERLOAD_PREFIX + "DemoService.slow (max_inflight 4 reached)"
    assert is_overload_reply(reply)
    assert not is_overload_reply(TApplicationException(TApplicationException.INTERNAL_ERROR,
                                                       "internal error in DemoService.slow"))
    assert not is_overload_reply(unforgeable(reply))
    other = TApplicationException(TApplicationException.UNKNOWN, "x")
    assert unforgeable(other) is other


def test_limiter_caps_in_all_and_per_method():
    limiter = InflightLimiter(3, {"slow": 1})
    assert limiter.enter("slow") is None
    assert limiter.enter("slow") == ("max_inflight_per_method", 1)
    assert limiter.enter("say") is None and limiter.enter("say") is None
    assert limiter.enter("say") == ("max_inflight", 3)
    limiter.exit("slow")
    assert limiter.enter("slow") is None
    assert limiter.refused == 2


def test_make_limiter_validates_names_and_values():
    methods = ["say", "slow"]
    assert make_limiter(None, None, methods) is None
    assert make_limiter(None, 2, methods).per_method == {"say": 2, "slow": 2}
    with pytest.raises(ProbeError, match="unknown methods nope"):
        make_limiter(None, {"nope": 1}, methods)
    with pytest.raises(ProbeError, match="max_inflight"):
        make_limiter(0, None, methods)
    with pytest.raises(ProbeError, match="max_inflight_per_method"):
        make_limiter(None, {"slow": "3"}, methods)


def test_calls_ending_after_their_node_was_forgotten_leave_no_negative_inflight():
    # A node deregisters with calls in flight (forget drops its state), then comes
    # back under the same name: its in-flight count must not go negative, or
    # p2c_ewma's cost (EWMA x (inflight + 1)) would rate it free.
    health = ServiceHealth(track_inflight=True, clock=lambda: 1.0)
    node = Node("n1", "127.0.0.1", 1, 10, 1)
    health.begin(node)
    health.forget(lambda name: False)
    health.end(node, OK, 0.001, 1.0)
    # cost = EWMA x (inflight + 1): zero would mean an in-flight count of -1.
    assert health.cost(node) > 0
