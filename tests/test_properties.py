"""Issue 14: every reader of user files, over generated and mutated inputs, loads or raises
LmkitError — no other exception, no hang. Bounded by default (``HYPOTHESIS_PROFILE=long`` runs
10,000 examples per reader); ``python -m lmkit.core.bench.fuzz`` is the standalone version."""

from __future__ import annotations

import os
import random
import signal
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmkit.core.bench import fuzz
from lmkit.errors import LmkitError

settings.register_profile("lmkit-default", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=list(HealthCheck))
settings.register_profile("lmkit-long", max_examples=10_000, deadline=None,
                          suppress_health_check=list(HealthCheck))
PROFILE = settings.get_profile(
    "lmkit-long" if os.environ.get("HYPOTHESIS_PROFILE") == "long" else "lmkit-default")
TIMEOUT_S = 10  # per input: longer is a hang


@pytest.fixture(scope="module")
def readers():
    return fuzz.cases()


def loads_or_lmkit_error(call) -> None:
    """Run ``call``: returning or LmkitError is fine; anything else (or a hang) fails."""
    def alarm(*_):
        raise TimeoutError("the reader hung")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, TIMEOUT_S)
    try:
        call()
    except LmkitError as exc:
        assert str(exc)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


READERS = ["shards", "artifact", "run.json", "state.json", "metrics.jsonl", "config.toml",
           "--set", "corpus.jsonl", "export config.json"]


@pytest.mark.parametrize("reader", READERS)
@PROFILE
@given(seed=st.integers(min_value=0, max_value=2**32))
def test_mutated_inputs_load_or_raise_lmkit_error(readers, reader, seed):
    with tempfile.TemporaryDirectory() as tmp:
        loads_or_lmkit_error(lambda: readers[reader](random.Random(seed), Path(tmp)))


RAW = {
    "shards": fuzz.read_shard,
    "artifact": fuzz.read_artifact_file,
    "run.json": lambda data, tmp: fuzz.read_run_files(data, tmp, "run.json"),
    "state.json": lambda data, tmp: fuzz.read_run_files(data, tmp, "state.json"),
    "metrics.jsonl": lambda data, tmp: fuzz.read_run_files(data, tmp, "metrics.jsonl"),
    "config.toml": fuzz.read_config,
    "corpus.jsonl": fuzz.read_corpus,
    "export config.json": fuzz.read_export_files,
}


@pytest.mark.parametrize("reader", list(RAW))
@PROFILE
@given(data=st.binary(max_size=2048))
def test_arbitrary_bytes_load_or_raise_lmkit_error(reader, data):
    with tempfile.TemporaryDirectory() as tmp:
        loads_or_lmkit_error(lambda: RAW[reader](data, Path(tmp)))


@PROFILE
@given(items=st.lists(st.text(max_size=40), min_size=1, max_size=3))
def test_arbitrary_set_items_resolve_or_raise_lmkit_error(items):
    loads_or_lmkit_error(lambda: fuzz.read_set(items))


@PROFILE
@given(obj=st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(), c,
                                                                              max_size=4),
                        max_leaves=20))
def test_strict_json_writer_round_trips_any_value(obj):
    import json

    from lmkit.core.jsonfile import dumps

    text = dumps(obj)
    json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in {text}"))


@PROFILE
@given(meta=st.binary(max_size=512), metrics=st.binary(max_size=512),
       huge_int=st.booleans())
def test_run_listing_survives_any_run_files(meta, metrics, huge_int):
    """`lmkit runs` lists a damaged run as unreadable rather than crashing (e.g. an integer
    literal past Python's 4300-digit limit, which is a ValueError but not a JSONDecodeError)."""
    from lmkit.core.runlist import list_runs

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "runs" / "r"
        (run / "checkpoint").mkdir(parents=True)
        (run / "run.json").write_bytes(b"9" * 5000 if huge_int else meta)
        (run / "metrics.jsonl").write_bytes(metrics)
        (run / "checkpoint" / "state.json").write_bytes(b'{"step": ' + b"1" * 5000 + b"}")
        (row,) = list_runs(tmp)
        assert row["path"] == str(run.resolve())
