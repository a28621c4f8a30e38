"""Runs the benchmarks, stores each one's outcome and renders docs/BENCHMARKS.md from all."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (python bench/run.py): import the bench package from the repository
    # root instead of its modules from their own folder.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench import REPO_ROOT, machine, store
from bench.report import Section, StoredRun, render

Measure = Callable[[Path, bool], Awaitable[list[Section]]]
COMMAND = "python -m bench.run"
# A 1-minute load average above this at the start means other work shares the machine.
BUSY_LOAD = 0.5


def _roundtrip() -> Measure:
    from bench import roundtrip
    return roundtrip.measure


def _rlm() -> Measure:
    from bench import rlm_overhead
    return rlm_overhead.measure


def _batch() -> Measure:
    from bench import batch_throughput
    return batch_throughput.measure


def _failover() -> Measure:
    from bench import failover
    return failover.measure


def _mdns() -> Measure:
    from bench import mdns_discovery
    return mdns_discovery.measure


def _scale() -> Measure:
    from bench import scale
    return scale.measure


def _compression() -> Measure:
    from bench import compression
    return compression.measure


def _embedded() -> Measure:
    from bench import embedded
    return embedded.measure


def _hung_endpoint() -> Measure:
    from bench import hung_endpoint
    return hung_endpoint.measure


def _resumed_agent() -> Measure:
    from bench import resumed_agent
    return resumed_agent.measure


def _state_polling() -> Measure:
    from bench import state_polling
    return state_polling.measure


def _batch_outage() -> Measure:
    from bench import batch_outage
    return batch_outage.measure


def _session_open() -> Measure:
    from bench import session_open
    return session_open.measure
def _pool() -> Measure:
    from bench import pool
    return pool.measure


def _fanout() -> Measure:
    from bench import fanout
    return fanout.measure


def _peer() -> Measure:
    from bench import peer
    return peer.measure


def _session_flood() -> Measure:
    from bench import session_flood
    return session_flood.measure
def _demo() -> Measure:
    from bench import demo
    return demo.measure


def _grammar() -> Measure:
    from bench import grammar
    return grammar.measure


# key, title (for a benchmark that fails before it reports), loader, time limit in seconds.
BENCHMARKS: list[tuple[str, str, Callable[[], Measure], float]] = [
    ("roundtrip", "Sandboxed job round trip", _roundtrip, 420.0),
    ("rlm", "Controller overhead per RLM iteration", _rlm, 120.0),
    ("batch", "Batch of prompts against a 50 ms endpoint", _batch, 120.0),
    ("failover", "Failure detection at default settings", _failover, 180.0),
    ("scale", "Scale: many agents heartbeating", _scale, 180.0),
    ("embedded", "Embedded model through the full stack", _embedded, 240.0),
    ("mdns", "Discovery over mDNS at default settings", _mdns, 300.0),
    ("compression", "A large context's time to the agent, plain and compressed",
     _compression, 420.0),
    ("hung_endpoint", "Controller start beside a hung exo endpoint", _hung_endpoint, 180.0),
    ("resumed_agent", "Fresh work on an agent resumed from SIGSTOP", _resumed_agent, 300.0),
    ("state_polling", "exo v1 endpoint poll: whole /state vs. its sub-trees", _state_polling,
     120.0),
    ("fanout", "Sub-calls of one run over several endpoints", _fanout, 300.0),
    ("batch_outage", "A model outage in the middle of a batch", _batch_outage, 180.0),
    ("peer", "Side by side with the reference rlm", _peer, 600.0),
    ("session_flood", "Agent memory while every session floods its pipes", _session_flood,
     300.0),
    ("session_open", "A run's session open, warm and cold", _session_open, 300.0),
    ("pool", "Cold Python jobs with the sandbox pool warm and empty", _pool, 300.0),
    ("demo", "The demo, end to end: first token and total time", _demo, 900.0),
    ("grammar", "The demo's replies with and without the REPL grammar", _grammar, 3600.0),
]


async def run_all(keys: list[str], quick: bool, tmp: Path) -> list[tuple[str, list[Section]]]:
    """Each benchmark asked for, in BENCHMARKS order: its key and the sections it produced."""
    outcomes: list[tuple[str, list[Section]]] = []
    for key, title, load, limit_s in BENCHMARKS:
        if key not in keys:
            continue
        print(f"bench: {key} ...", file=sys.stderr, flush=True)
        started, load_average = time.monotonic(), os.getloadavg()[0]
        work = tmp / key
        work.mkdir()
        try:
            async with asyncio.timeout(limit_s):
                produced = await load()(work, quick)
        except Exception as exc:
            logging.getLogger("bench").exception("benchmark %s failed", key)
            reason = (f"it did not finish within {limit_s:g} s" if isinstance(exc, TimeoutError)
                      else f"{exc!r}"[:500])
            produced = [Section(key=key, title=title, method="", error=reason)]
        elapsed = time.monotonic() - started
        # Sections measured together share one duration, kept on the first.
        produced[0].duration_s = elapsed
        produced[0].load_at_start = load_average
        for section in produced:
            for target in section.targets:
                verdict = "met" if target.met else "MISSED"
                print(f"bench:   {target.name}: {target.measured:.3f} {target.unit} "
                      f"(goal {target.comparison} {target.limit:g}) {verdict}", file=sys.stderr)
            if section.error:
                print(f"bench:   {section.title} FAILED: {section.error}", file=sys.stderr)
        outcomes.append((key, produced))
    return outcomes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, a few seconds per benchmark (a smoke run); stores "
                             "nothing and writes only --output")
    parser.add_argument("--only", default="",
                        help="comma-separated benchmarks to run: "
                             + ", ".join(key for key, *_ in BENCHMARKS))
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: render --output from the stored results")
    parser.add_argument("--output", type=Path,
                        help="the Markdown report to write (default docs/BENCHMARKS.md; "
                             "with --quick a temporary file)")
    parser.add_argument("--results", type=Path, default=store.RESULTS_DIR,
                        help="the folder of stored results, one KEY.json per benchmark")
    parser.add_argument("--json", type=Path, help="also write this run's figures as JSON here")
    return parser.parse_args(argv)


def _output(args: argparse.Namespace) -> Path:
    if args.output is not None:
        return Path(args.output)
    if args.quick:
        handle, name = tempfile.mkstemp(prefix="kowalski-bench-", suffix=".md")
        os.close(handle)
        return Path(name)
    return REPO_ROOT / "docs" / "BENCHMARKS.md"


def _keep(run: StoredRun, results_dir: Path) -> bool:
    """Store a run unless it failed or skipped where an earlier run measured figures."""
    measured = any(not (section.error or section.skipped) for section in run.sections)
    return measured or not (results_dir / f"{run.key}.json").exists()


def render_stored(results_dir: Path, output: Path) -> None:
    """BENCHMARKS.md from every stored result, in BENCHMARKS order."""
    runs = store.load_all(results_dir, [key for key, *_ in BENCHMARKS])
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render(runs, command=COMMAND))
    print(f"bench: rendered {output} from {len(runs)} stored results", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """0 when every benchmark ran (targets met or not), 1 when one failed to run."""
    args = parse_args(argv)
    output = _output(args)
    if args.render:
        render_stored(args.results, output)
        return 0
    known = [key for key, *_ in BENCHMARKS]
    keys = [key.strip() for key in args.only.split(",") if key.strip()] or known
    unknown = sorted(set(keys) - set(known))
    if unknown:
        print(f"bench: unknown benchmarks {unknown}; known: {known}", file=sys.stderr)
        return 2
    if args.quick and args.json is not None and args.json.resolve().parent == \
            args.results.resolve():
        print(f"bench: --quick figures are never stored; give --json a path outside "
              f"{args.results}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from kowalski.common.tls import loop_factory

    described = machine.describe()
    load_before = machine.load_average()
    shared = os.getloadavg()[0] > BUSY_LOAD
    if shared:
        print(f"bench: the machine is busy (load {load_before}); figures will show it",
              file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="kowalski-bench-") as tmp, \
            asyncio.Runner(loop_factory=loop_factory()) as runner:
        outcomes = runner.run(run_all(keys, args.quick, Path(tmp)))
    described.append(("load average (1, 5, 15 min)",
                      f"{load_before} before the run; {machine.load_average()} after"))
    command = COMMAND + (" --quick" if args.quick else "") + (
        f" --only {','.join(keys)}" if keys != known else "")
    runs = [StoredRun(key=key, sections=sections, machine=dict(described), command=command,
                      quick=args.quick, shared=shared) for key, sections in outcomes]
    sections = [section for run in runs for section in run.sections]
    if args.json is not None:
        # The stored format, so that `--json bench/results/KEY.json` of one key is its result.
        figures = store.run_json(StoredRun(key=",".join(keys), sections=sections,
                                           machine=dict(described), command=command,
                                           quick=args.quick, shared=shared))
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1, ensure_ascii=False) + "\n")
    if args.quick:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(render(runs, command=command))
        print(f"bench: wrote {output} (a --quick run stores nothing)", file=sys.stderr)
    else:
        for run in runs:
            if _keep(run, args.results):
                print(f"bench: stored {store.save(run, args.results)}", file=sys.stderr)
            else:
                print(f"bench: {run.key} did not measure; its stored result stays",
                      file=sys.stderr)
        render_stored(args.results, output)
    return 1 if any(section.error for section in sections) else 0


if __name__ == "__main__":
    sys.exit(main())
