from pathlib import Path

import pytest

from tests.annotate.helpers import LiveServer


@pytest.fixture
def live_server():
    """Start ``alignforge annotate serve`` subprocesses; they are stopped after the test."""
    servers: list[LiveServer] = []

    def start(project_dir: Path) -> LiveServer:
        s = LiveServer(project_dir).start()
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()
