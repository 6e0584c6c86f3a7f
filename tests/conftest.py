from __future__ import annotations

import os

import pytest

# keep onnxruntime from oversubscribing the 2-core machine when tests run
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _prune_round_to_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """prune-channels rounds Conv channel counts to a multiple measured per machine by default;
    tests inject 1 so that their outcomes do not depend on the machine (tests of the
    measurement call ``_channel_multiple`` themselves)."""
    from onnxopt.passes import _channel_multiple

    monkeypatch.setattr(_channel_multiple, "measured_round_to", lambda: 1)
