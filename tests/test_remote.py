"""ggufrun.remote's words for `ggufrun ps`."""

import datetime

from ggufrun.remote import processor, until

NOW = datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc)


def test_until_reads_times_with_and_without_an_offset() -> None:
    assert until({"expires_at": "2030-01-01T00:04:30Z"}, NOW) == "4 minutes from now"
    assert until({"expires_at": "2030-01-01T02:00:00+02:00"}, NOW) == "Stopping..."
    assert until({"expires_at": "2030-01-01T00:00:30"}, NOW) == "30 seconds from now"  # no offset: UTC
    assert until({"expires_at": "2300-01-01T00:00:00Z"}, NOW) == "Forever"
    assert until({"expires_at": None}, NOW) == until({}, NOW) == "?"


def test_processor_splits_memory_as_ollama_ps_does() -> None:
    assert processor({"size": 100, "size_vram": 0}) == "100% CPU"
    assert processor({"size": 100, "size_vram": 100}) == "100% GPU"
    assert processor({"size": 100, "size_vram": 52}) == "48%/52% CPU/GPU"
