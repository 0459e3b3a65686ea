"""A live server for HTTP tests: the real app under uvicorn on a free loopback port."""

import threading
import time

import pytest


class LiveServer:
    """uvicorn in a thread on a free loopback port."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    @property
    def scheduler(self):
        return self.app.state.server.scheduler

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def live_server():
    """``live_server(app)`` starts ``app``; every server started is stopped with the module."""
    started = []

    def start(app):
        started.append(LiveServer(app))
        return started[-1]

    yield start
    for server in started:
        server.close()
