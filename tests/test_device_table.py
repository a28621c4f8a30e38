"""The device table and device selection: pure functions, no sockets."""

from __future__ import annotations

import functools
import itertools
import math
import statistics
import time

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kowalski.common.config import ControllerConfig
from kowalski.common.errors import NoDevicesAvailableError
from kowalski.common.messages import DeviceId, Heartbeat, Metrics
from kowalski.controller.fleet.device_table import (
    DeviceDiscovered,
    DeviceEvent,
    DeviceLost,
    DeviceRow,
    DeviceTable,
    HeartbeatFailed,
    HeartbeatReceived,
    JobAssigned,
    JobReleased,
    Source,
    TableSettings,
    Tick,
    apply,
)
from kowalski.controller.fleet.selection import (
    base_score,
    exclusion_reason,
    ranked,
    score,
    select,
)
from kowalski.controller.scoring import OPERATIONS, Operation

GIB = 1024**3
CONFIG = ControllerConfig(
    heartbeat_interval_s=1.0, failure_timeout_s=3.0, load_penalty=0.05,
    circuit_failure_threshold=3, circuit_reset_s=10.0,
)
SETTINGS = TableSettings.from_config(CONFIG)


def metrics(*, free: float = 0.5, total: int = 16 * GIB, cpu: float = 10.0) -> Metrics:
    return Metrics(
        memory_total_bytes=total, memory_available_bytes=int(total * free), cpu_percent=cpu,
        cpu_count=4, load_1m=0.5, load_5m=0.5, load_15m=0.5,
    )


def heartbeat(
    *, name: str = "node", languages: tuple[str, ...] = ("bash", "python"),
    free: float = 0.5, cpu: float = 10.0,
) -> Heartbeat:
    return Heartbeat(
        agent_id=f"agent-{name}", name=name, version="0.1.0", started_at=100.0, sent_at=0.0,
        seq=1, sandbox_mode="bwrap", languages=list(languages),
        metrics=metrics(free=free, cpu=cpu), jobs_running=0, jobs_queued=0, sessions=0,
    )


def found(device_id: str, at: float = 0.0, source: Source = "mdns") -> DeviceDiscovered:
    return DeviceDiscovered(
        device_id=DeviceId(device_id), name=device_id, url=f"http://{device_id}:7070",
        source=source, at=at,
    )


def beat(
    device_id: str, at: float, *, rtt_ms: float = 10.0,
    languages: tuple[str, ...] = ("bash", "python"), free: float = 0.5, cpu: float = 10.0,
) -> HeartbeatReceived:
    return HeartbeatReceived(
        device_id=DeviceId(device_id),
        heartbeat=heartbeat(name=device_id, languages=languages, free=free, cpu=cpu),
        rtt_ms=rtt_ms, at=at,
    )


def run(*events: DeviceEvent, table: DeviceTable | None = None) -> DeviceTable:
    start = DeviceTable(settings=SETTINGS) if table is None else table
    return functools.reduce(apply, events, start)


def row(table: DeviceTable, device_id: str) -> DeviceRow:
    return table.devices[DeviceId(device_id)]


def cluster(*specs: tuple[str, float, float], at: float = 1.0) -> DeviceTable:
    """Healthy devices from (id, free-memory fraction, rtt_ms)."""
    events: list[DeviceEvent] = []
    for device_id, free, rtt_ms in specs:
        events += [found(device_id), beat(device_id, at, free=free, rtt_ms=rtt_ms)]
    return run(*events)


def reason(
    table: DeviceTable, *, language: str | None = None, exclude: frozenset[str] = frozenset(),
    now: float = 1.0,
) -> str:
    with pytest.raises(NoDevicesAvailableError) as caught:
        select(table, "code_execution", language=language, exclude=exclude, now=now)
    assert str(caught.value) == f"no devices available: {caught.value.reason}"
    return caught.value.reason


# Health and the failure detector


def test_discovered_device_is_unknown_until_first_heartbeat() -> None:
    table = run(found("a"), Tick(now=2.9))
    assert row(table, "a").health == "unknown"
    assert row(table, "a").metrics is None
    table = run(beat("a", 2.95), table=table)
    assert row(table, "a").health == "healthy"


def test_first_heartbeat_fills_the_row() -> None:
    table = run(found("a"), beat("a", 1.0, languages=("python", "bash"), free=0.25, rtt_ms=4.0))
    device = row(table, "a")
    assert device.agent_id == "agent-a"
    assert device.languages == ("bash", "python")
    assert device.sandbox_mode == "bwrap"
    assert device.metrics == metrics(free=0.25)
    assert device.memory_free_fraction == pytest.approx(0.25)
    assert device.last_heartbeat_at == 1.0
    assert device.latency_ms == 4.0
    assert device.rtt_samples_ms == (4.0,)


def test_device_turns_unhealthy_exactly_at_failure_timeout() -> None:
    table = run(found("a"), beat("a", 10.0))
    assert row(apply(table, Tick(now=12.999)), "a").health == "healthy"
    assert row(apply(table, Tick(now=13.0)), "a").health == "unhealthy"


def test_failure_timeout_comes_from_config() -> None:
    fast = TableSettings.from_config(
        ControllerConfig(heartbeat_interval_s=0.1, failure_timeout_s=0.3),
    )
    table = run(found("a"), beat("a", 1.0), table=DeviceTable(settings=fast))
    assert row(apply(table, Tick(now=1.29)), "a").health == "healthy"
    assert row(apply(table, Tick(now=1.3)), "a").health == "unhealthy"


def test_unhealthy_device_recovers_on_first_good_heartbeat() -> None:
    table = run(found("a"), beat("a", 1.0), Tick(now=5.0))
    assert row(table, "a").health == "unhealthy"
    table = run(beat("a", 6.0), table=table)
    assert row(table, "a").health == "healthy"
    assert select(table, "code_execution", now=6.5).device_id == "a"


def test_device_never_heard_from_turns_unhealthy_after_timeout_since_discovery() -> None:
    table = run(found("a", at=0.0), Tick(now=2.0))
    assert row(table, "a").health == "unknown"
    assert row(apply(table, Tick(now=3.0)), "a").health == "unhealthy"


def test_heartbeat_failures_count_misses_but_only_the_timeout_makes_unhealthy() -> None:
    table = run(
        found("a"), beat("a", 1.0),
        HeartbeatFailed(device_id=DeviceId("a"), reason="timed out", at=2.0),
        HeartbeatFailed(device_id=DeviceId("a"), reason="connection refused", at=3.0),
    )
    device = row(table, "a")
    assert (device.health, device.consecutive_misses) == ("healthy", 2)
    assert device.last_error == "connection refused"
    table = run(HeartbeatFailed(device_id=DeviceId("a"), reason="timed out", at=4.0), table=table)
    assert row(table, "a").health == "unhealthy"
    table = run(beat("a", 5.0), table=table)
    assert (row(table, "a").consecutive_misses, row(table, "a").last_error) == (0, "")


def test_selection_skips_a_silent_device_before_the_next_tick() -> None:
    table = cluster(("a", 0.5, 10.0))
    assert select(table, "code_execution", now=3.9).device_id == "a"
    with pytest.raises(NoDevicesAvailableError):
        select(table, "code_execution", now=4.0)


def test_reply_older_than_the_last_heartbeat_is_ignored() -> None:
    table = run(found("a"), beat("a", 5.0, rtt_ms=10.0))
    assert apply(table, beat("a", 4.0, rtt_ms=900.0)) is table


# mDNS loss and static agents


def test_mdns_loss_keeps_the_row_marked_and_unselectable() -> None:
    table = run(found("a"), beat("a", 1.0), DeviceLost(device_id=DeviceId("a"), at=1.5))
    device = row(table, "a")
    assert device.lost
    assert device.health == "unhealthy"
    assert "mDNS" in device.last_error
    with pytest.raises(NoDevicesAvailableError):
        select(table, "code_execution", now=1.6)


def test_static_device_is_never_lost() -> None:
    table = run(found("a", source="static"), beat("a", 1.0))
    assert apply(table, DeviceLost(device_id=DeviceId("a"), at=1.5)) is table


def test_lost_device_comes_back_on_rediscovery_and_heartbeat() -> None:
    table = run(found("a"), beat("a", 1.0), DeviceLost(device_id=DeviceId("a"), at=1.5))
    table = run(found("a", at=20.0), table=table)
    assert not row(table, "a").lost
    assert row(table, "a").health == "unhealthy"
    table = run(beat("a", 21.0), table=table)
    assert row(table, "a").health == "healthy"


def test_lost_row_is_forgotten_later_but_not_while_a_job_runs_on_it() -> None:
    forget_s = SETTINGS.forget_lost_after_s
    table = run(
        found("a"), beat("a", 1.0),
        JobAssigned(device_id=DeviceId("a"), job_id="j1", at=1.1),
        DeviceLost(device_id=DeviceId("a"), at=2.0),
        Tick(now=2.0 + forget_s),
    )
    assert "a" in table.devices
    table = run(
        JobReleased(device_id=DeviceId("a"), job_id="j1", outcome="failure", at=2.0 + forget_s),
        Tick(now=2.0 + forget_s + 1),
        table=table,
    )
    assert "a" not in table.devices


def test_mdns_announcement_does_not_replace_a_static_address() -> None:
    static = found("a", source="static")
    table = run(static, msgspec.structs.replace(found("a"), url="http://10.0.0.9:7070"))
    assert row(table, "a").source == "static"
    assert row(table, "a").url == static.url


# Latency, history, in-flight jobs, persistence


def test_latency_is_a_moving_average_with_bounded_samples() -> None:
    limited = msgspec.structs.replace(SETTINGS, latency_samples=3)
    table = run(
        found("a"), *(beat("a", float(at), rtt_ms=rtt) for at, rtt in enumerate([10, 20, 30, 40])),
        table=DeviceTable(settings=limited),
    )
    device = row(table, "a")
    assert device.rtt_samples_ms == (20.0, 30.0, 40.0)
    # alpha = 0.3: 10 -> 13 -> 18.1 -> 24.67
    assert device.latency_ms == pytest.approx(24.67)


@pytest.mark.parametrize("rtt_ms", [math.nan, math.inf, -1.0])
def test_invalid_rtt_is_not_a_latency_sample(rtt_ms: float) -> None:
    table = run(found("a"), beat("a", 1.0, rtt_ms=8.0), beat("a", 2.0, rtt_ms=rtt_ms))
    assert row(table, "a").latency_ms == 8.0
    assert row(table, "a").rtt_samples_ms == (8.0,)
    assert row(table, "a").last_heartbeat_at == 2.0


def test_history_is_bounded_spaced_and_within_its_window() -> None:
    small = msgspec.structs.replace(SETTINGS, history_window_s=10.0, history_points=10)
    events = [beat("a", 0.5 * step, cpu=float(step)) for step in range(100)]
    table = run(found("a"), *events, table=DeviceTable(settings=small))
    history = row(table, "a").history
    assert len(history) == 10
    assert all(later.at - earlier.at >= 1.0 for earlier, later in itertools.pairwise(history))
    assert history[-1].at == 49.0
    assert history[-1].cpu_percent == 98.0
    assert history[-1].memory_used_percent == pytest.approx(50.0)
    # After a long silence the old samples fall out of the window.
    table = run(beat("a", 200.0), table=table)
    assert [sample.at for sample in row(table, "a").history] == [200.0]


def test_jobs_in_flight_are_tracked_and_release_is_idempotent() -> None:
    a = DeviceId("a")
    table = run(
        found("a"), beat("a", 1.0),
        JobAssigned(device_id=a, job_id="j1", at=1.0),
        JobAssigned(device_id=a, job_id="j2", at=1.0),
        JobAssigned(device_id=a, job_id="j2", at=1.0),
    )
    assert row(table, "a").in_flight == {"j1", "j2"}
    release = JobReleased(device_id=a, job_id="j1", outcome="success", at=1.1)
    table = apply(table, release)
    assert row(table, "a").in_flight == {"j2"}
    assert apply(table, release) is table


def test_job_outcomes_drive_the_circuit_breaker() -> None:
    a = DeviceId("a")
    events: list[DeviceEvent] = [found("a"), beat("a", 1.0)]
    for number in range(3):
        events += [
            JobAssigned(device_id=a, job_id=f"j{number}", at=1.0),
            JobReleased(device_id=a, job_id=f"j{number}", outcome="failure", at=1.0),
        ]
    table = run(*events)
    assert row(table, "a").circuit.state == "open"
    # Heartbeats keep it healthy, but the open circuit keeps work away.
    table = run(beat("a", 2.0), table=table)
    assert reason(table, now=2.0) == "circuit open on the only healthy device"
    # Half-open after circuit_reset_s: exactly one probe goes out.
    table = run(beat("a", 11.0), table=table)
    assert select(table, "code_execution", now=11.0).device_id == "a"
    table = run(JobAssigned(device_id=a, job_id="probe", at=11.0), table=table)
    with pytest.raises(NoDevicesAvailableError):
        select(table, "code_execution", now=11.0)
    table = run(JobReleased(device_id=a, job_id="probe", outcome="success", at=11.5), table=table)
    assert row(table, "a").circuit.state == "closed"


def test_a_restarted_agent_starts_with_a_closed_circuit() -> None:
    a = DeviceId("a")
    events: list[DeviceEvent] = [found("a"), beat("a", 1.0)]
    events += [JobReleased(device_id=a, job_id="old", outcome="failure", at=1.0)
               for _ in range(3)]
    table = run(*events, beat("a", 2.0))
    assert row(table, "a").circuit.state == "open"
    restarted = msgspec.structs.replace(
        beat("a", 3.0), heartbeat=msgspec.structs.replace(heartbeat(name="a"), started_at=200.0))
    table = run(restarted, table=table)
    assert row(table, "a").circuit.state == "closed"
    assert select(table, "code_execution", now=3.0).device_id == "a"


def test_cancelled_probe_frees_the_probe_slot() -> None:
    a = DeviceId("a")
    events: list[DeviceEvent] = [found("a"), beat("a", 1.0)]
    events += [
        JobReleased(device_id=a, job_id="old", outcome="failure", at=1.0) for _ in range(3)
    ]
    table = run(*events, beat("a", 11.0), JobAssigned(device_id=a, job_id="probe", at=11.0))
    assert row(table, "a").circuit.probe_job_id == "probe"
    table = run(JobReleased(device_id=a, job_id="probe", outcome="cancelled", at=11.2), table=table)
    assert row(table, "a").circuit.probe_job_id is None
    assert select(table, "code_execution", now=11.3).device_id == "a"


def test_events_for_unknown_devices_are_ignored() -> None:
    table = run(found("a"))
    ghost = DeviceId("ghost")
    for event in (
        beat("ghost", 1.0), DeviceLost(device_id=ghost, at=1.0),
        HeartbeatFailed(device_id=ghost, reason="x", at=1.0),
        JobAssigned(device_id=ghost, job_id="j", at=1.0),
        JobReleased(device_id=ghost, job_id="j", outcome="success", at=1.0),
    ):
        assert apply(table, event) is table


def test_apply_leaves_the_previous_table_untouched() -> None:
    before = run(found("a"), found("b"), beat("a", 1.0))
    after = apply(before, beat("b", 1.5))
    assert row(before, "b").health == "unknown"
    assert row(after, "b").health == "healthy"
    assert row(after, "a") is row(before, "a")
    assert after.revision == before.revision + 1


def test_events_round_trip_as_tagged_json() -> None:
    events: list[DeviceEvent] = [
        found("a"), beat("a", 1.0), Tick(now=2.0),
        JobReleased(device_id=DeviceId("a"), job_id="j", outcome="cancelled", at=3.0),
    ]
    data = msgspec.json.encode(events)
    assert msgspec.json.decode(data, type=list[DeviceEvent]) == events


# Scores


def test_code_execution_score_by_hand() -> None:
    # 0.4 * 0.5 + 0.6 / (1 + 50/50) = 0.2 + 0.3
    assert base_score(row(cluster(("a", 0.5, 50.0)), "a"), "code_execution") == (
        pytest.approx(0.5)
    )
    # 0.4 * 0.25 + 0.6 / (1 + 0) = 0.1 + 0.6
    assert base_score(row(cluster(("a", 0.25, 0.0)), "a"), "code_execution") == (
        pytest.approx(0.7)
    )


@pytest.mark.parametrize(
    ("operation", "free", "rtt_ms", "expected"),
    [
        ("llm_inference", 0.9, 10.0, 0.5),  # 1 / (1 + 10/10)
        ("llm_inference", 0.1, 30.0, 0.25),  # 1 / (1 + 30/10)
        ("context_compression", 0.9, 5.0, 0.5),  # 1 / (1 + 5/5)
        ("context_compression", 0.9, 15.0, 0.25),  # 1 / (1 + 15/5)
        ("model_loading", 0.75, 500.0, 0.75),  # the free-memory fraction, latency ignored
    ],
)
def test_operation_scores_by_hand(
    operation: Operation, free: float, rtt_ms: float, expected: float,
) -> None:
    device = row(cluster(("a", free, rtt_ms)), "a")
    assert base_score(device, operation) == pytest.approx(expected)


def test_load_penalty_is_subtracted_per_job_in_flight() -> None:
    a = DeviceId("a")
    table = run(
        JobAssigned(device_id=a, job_id="j1", at=1.0),
        JobAssigned(device_id=a, job_id="j2", at=1.0),
        table=cluster(("a", 0.5, 50.0)),
    )
    assert score(row(table, "a"), "code_execution", load_penalty=0.05) == pytest.approx(0.4)
    [(value, _)] = ranked(table, "code_execution", now=1.0)
    assert value == pytest.approx(0.4)


def assign_many(table: DeviceTable, count: int, operation: Operation) -> list[str]:
    chosen: list[str] = []
    for number in range(count):
        device = select(table, operation, now=1.0)
        chosen.append(device.device_id)
        table = apply(table, JobAssigned(device_id=device.device_id, job_id=f"j{number}", at=1.0))
    return chosen


def test_penalty_spreads_jobs_over_equal_devices() -> None:
    table = cluster(("a", 0.5, 10.0), ("b", 0.5, 10.0))
    assert assign_many(table, 6, "code_execution") == ["a", "b"] * 3


def test_penalty_outweighs_a_small_advantage_after_a_few_jobs() -> None:
    # model_loading scores the free fraction: a leads b by 0.07, so with a 0.05
    # penalty a takes two jobs (0.77, 0.72 > 0.70) before b gets one.
    table = cluster(("a", 0.77, 10.0), ("b", 0.70, 10.0))
    assert assign_many(table, 3, "model_loading") == ["a", "a", "b"]


def test_each_operation_prefers_what_it_needs() -> None:
    table = cluster(("roomy", 0.9, 40.0), ("near", 0.1, 2.0))
    assert select(table, "model_loading", now=1.0).device_id == "roomy"
    assert select(table, "llm_inference", now=1.0).device_id == "near"
    assert select(table, "context_compression", now=1.0).device_id == "near"


def test_ranked_lists_eligible_devices_best_first() -> None:
    table = run(found("down"), table=cluster(("a", 0.2, 30.0), ("b", 0.8, 30.0)))
    ranking = ranked(table, "model_loading", now=1.0)
    assert [device.device_id for _, device in ranking] == ["b", "a"]
    assert [value for value, _ in ranking] == pytest.approx([0.8, 0.2])


def test_devices_lacking_the_language_are_excluded() -> None:
    events: list[DeviceEvent] = [
        found("py"), beat("py", 1.0, languages=("python",), free=0.1),
        found("rs"), beat("rs", 1.0, languages=("python", "rust"), free=0.05),
    ]
    table = run(*events)
    assert select(table, "code_execution", language="rust", now=1.0).device_id == "rs"
    assert select(table, "code_execution", language="python", now=1.0).device_id == "py"


def test_excluded_devices_are_skipped() -> None:
    table = cluster(("a", 0.9, 10.0), ("b", 0.1, 10.0))
    assert select(table, "code_execution", exclude={"a"}, now=1.0).device_id == "b"


# Why no device fits


def test_reason_when_nothing_was_discovered() -> None:
    assert reason(run()) == "no devices discovered"


def test_reason_when_all_devices_are_unhealthy() -> None:
    table = run(found("a"), found("b"), found("c"), beat("c", 0.5), Tick(now=5.0))
    assert reason(table) == "all 3 devices are unhealthy"


def test_reason_when_no_heartbeat_arrived_yet() -> None:
    assert reason(run(found("a"), found("b"))) == "all 2 devices are waiting for a first heartbeat"


def test_reason_names_the_language_and_what_is_available() -> None:
    table = run(found("a"), beat("a", 1.0, languages=("python", "bash")), found("down"))
    assert reason(table, language="rust") == (
        "no healthy device runs rust (available: bash, python)"
    )


def test_reason_when_all_circuits_are_open() -> None:
    table = cluster(("a", 0.5, 10.0), ("b", 0.5, 10.0))
    for device_id in ("a", "b"):
        table = run(
            *(
                JobReleased(device_id=DeviceId(device_id), job_id="j", outcome="failure", at=1.0)
                for _ in range(3)
            ),
            table=table,
        )
    assert reason(table, language="python") == (
        "circuit open on all 2 healthy devices that can run python"
    )


def test_reason_when_every_candidate_was_already_tried() -> None:
    table = cluster(("a", 0.5, 10.0), ("b", 0.5, 10.0))
    assert reason(table, exclude=frozenset({"a", "b"})) == (
        "already tried all 2 candidate devices for this job"
    )
    table = run(
        *(
            JobReleased(device_id=DeviceId("b"), job_id="j", outcome="failure", at=1.0)
            for _ in range(3)
        ),
        table=table,
    )
    assert reason(table, exclude=frozenset({"a"})) == (
        "already tried 1 candidate device for this job, circuit open on the other 1"
    )


def test_selection_over_1000_devices_is_not_pathologically_slow() -> None:
    specs = [(f"d{index:04}", (index % 10) / 10, float(index % 50)) for index in range(1000)]
    table = cluster(*specs)
    timings = []
    for _ in range(7):
        start = time.perf_counter()
        select(table, "code_execution", language="python", exclude={"d0001"}, now=1.0)
        timings.append(time.perf_counter() - start)
    assert statistics.median(timings) < 0.02


def test_heartbeats_from_1000_devices_are_cheap_to_apply() -> None:
    table = cluster(*((f"d{index:04}", 0.5, 5.0) for index in range(1000)))
    events = [beat(f"d{index:04}", 2.0) for index in range(1000)]
    start = time.perf_counter()
    table = run(*events, table=table)
    # About 10 ms on a laptop; the bound only catches a per-event cost that grows badly.
    assert time.perf_counter() - start < 1.0
    assert row(table, "d0999").last_heartbeat_at == 2.0


# Properties

DEVICES = [DeviceId(name) for name in ("a", "b", "c")]
times = st.floats(min_value=0.0, max_value=100.0)
device_ids = st.sampled_from(DEVICES)
metric_values = st.builds(
    Metrics,
    memory_total_bytes=st.integers(-1, 2**40),
    memory_available_bytes=st.integers(-1, 2**41),
    cpu_percent=st.floats(0, 100),
    cpu_count=st.integers(1, 64),
    load_1m=st.just(0.0), load_5m=st.just(0.0), load_15m=st.just(0.0),
)
heartbeats = st.builds(
    Heartbeat,
    agent_id=st.text(max_size=4), name=st.text(max_size=4), version=st.just("1"),
    started_at=times, sent_at=times, seq=st.integers(0, 10), sandbox_mode=st.just("rlimit"),
    languages=st.lists(st.sampled_from(["python", "bash", "rust"]), max_size=3),
    metrics=metric_values, jobs_running=st.just(0), jobs_queued=st.just(0), sessions=st.just(0),
)
events = st.one_of(
    st.builds(
        DeviceDiscovered, device_id=device_ids, name=st.text(max_size=4), url=st.just("http://x"),
        source=st.sampled_from(["mdns", "static"]), at=times,
    ),
    st.builds(DeviceLost, device_id=device_ids, at=times),
    st.builds(
        HeartbeatReceived, device_id=device_ids, heartbeat=heartbeats,
        rtt_ms=st.floats(allow_nan=True, allow_infinity=True), at=times,
    ),
    st.builds(HeartbeatFailed, device_id=device_ids, reason=st.text(max_size=4), at=times),
    st.builds(Tick, now=times),
    st.builds(JobAssigned, device_id=device_ids, job_id=st.sampled_from(["j1", "j2"]), at=times),
    st.builds(
        JobReleased, device_id=device_ids, job_id=st.sampled_from(["j1", "j2"]),
        outcome=st.sampled_from(["success", "failure", "cancelled"]), at=times,
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(events, max_size=40))
def test_apply_never_raises_and_keeps_its_invariants(sequence: list[DeviceEvent]) -> None:
    table = DeviceTable(settings=SETTINGS)
    expected_jobs: dict[DeviceId, set[str]] = {}
    for event in sequence:
        before = table
        table = apply(table, event)
        assert table.revision >= before.revision
        if isinstance(event, JobAssigned) and event.device_id in table.devices:
            expected_jobs.setdefault(event.device_id, set()).add(event.job_id)
        elif isinstance(event, JobReleased):
            expected_jobs.get(event.device_id, set()).discard(event.job_id)
        elif isinstance(event, DeviceDiscovered) and event.device_id not in before.devices:
            expected_jobs[event.device_id] = set()
    for device_id, device in table.devices.items():
        assert device.in_flight == expected_jobs.get(device_id, set())
        assert not (device.lost and device.source == "static")
        assert device.health != "healthy" or device.last_heartbeat_at is not None
        assert len(device.history) <= SETTINGS.history_points
        assert len(device.rtt_samples_ms) <= SETTINGS.latency_samples
        assert 0.0 <= device.memory_free_fraction <= 1.0


@settings(max_examples=200, deadline=None)
@given(st.lists(events, max_size=40), times)
def test_fast_selection_agrees_with_the_stated_rules(
    sequence: list[DeviceEvent], now: float,
) -> None:
    table = functools.reduce(apply, sequence, DeviceTable(settings=SETTINGS))
    for operation in OPERATIONS:
        ranking = ranked(table, operation, language="python", exclude={"c"}, now=now)
        eligible = {
            device_id for device_id, device in table.devices.items()
            if exclusion_reason(device, SETTINGS, language="python", exclude={"c"}, now=now)
            is None
        }
        assert {device.device_id for _, device in ranking} == eligible
        for value, device in ranking:
            assert 0.0 <= base_score(device, operation) <= 1.0
            assert value == base_score(device, operation) - 0.05 * len(device.in_flight)
        if ranking:
            chosen = select(table, operation, language="python", exclude={"c"}, now=now)
            assert chosen is ranking[0][1]
        else:
            with pytest.raises(NoDevicesAvailableError):
                select(table, operation, language="python", exclude={"c"}, now=now)


@given(
    free=st.floats(0.0, 1.0), rtt_ms=st.floats(0.0, 1e9),
    operation=st.sampled_from(OPERATIONS),
)
def test_base_scores_stay_within_zero_and_one(
    free: float, rtt_ms: float, operation: Operation,
) -> None:
    device = row(cluster(("a", free, rtt_ms)), "a")
    assert 0.0 <= base_score(device, operation) <= 1.0
