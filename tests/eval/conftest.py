"""Fixtures for the evaluation tests."""

import pytest
from judge_server import FakeJudge


@pytest.fixture
def fake_judge():
    servers = []

    def start(decide, **options):
        server = FakeJudge(decide, **options)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()
