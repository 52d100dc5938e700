"""Helpers shared by the oracle scripts: catch what transformers and PEFT say
while loading an adapter, and pick out the messages that mean keys went astray."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

# Words in a loader's message that mean a tensor was missing, unused or misshaped.
KEY_PROBLEM_WORDS = ("missing", "unexpected", "mismatch", "not found", "were not used", "not initialized")


@contextlib.contextmanager
def capture_warnings():
    """Collect python warnings, transformers/peft log records (WARNING+) and stderr."""
    records: list[str] = []

    class H(logging.Handler):
        def emit(self, rec):
            records.append(f"[{rec.name}] {rec.getMessage()}")

    h = H(level=logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("transformers", "peft", "")]
    for lg in loggers:
        lg.addHandler(h)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(record=True) as ws:
            warnings.simplefilter("always")
            with contextlib.redirect_stderr(sink):
                yield records
        records.extend(f"[warning] {w.message}" for w in ws)
        if sink.getvalue().strip():
            records.append(f"[stderr] {sink.getvalue().strip()}")
    finally:
        for lg in loggers:
            lg.removeHandler(h)


def key_problems(msgs: list[str]) -> list[str]:
    """The messages that report missing, unexpected or misshaped keys."""
    return [m for m in msgs if any(w in m.lower() for w in KEY_PROBLEM_WORDS)]
