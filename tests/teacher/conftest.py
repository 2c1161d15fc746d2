"""Fixtures: a real loopback teacher server process shared by a module's tests (teacher_helpers)."""

from __future__ import annotations

import pytest

from teacher_helpers import set_faults, start_server, stop_server


@pytest.fixture(scope="module")
def server():
    proc, url = start_server()
    yield url
    stop_server(proc)


@pytest.fixture
def clean_server(server):
    """The module's server with no faults and its request count at 0."""
    set_faults(server, {})
    yield server
    set_faults(server, {})
