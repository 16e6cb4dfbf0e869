"""Optional trackers go through accelerate's tracker API."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.recipes


def test_tensorboard_tracker_writes_event_files(train_recipe):
    pytest.importorskip("tensorboard")
    run = train_recipe("lora", "debug=quick", "logger=tensorboard")
    events = list((run.dir / "trackers").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
