"""A fake OpenAI-compatible judge server for the evaluation tests."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeJudge:
    """A tiny local server answering POST /v1/chat/completions like an OpenAI-compatible API.

    ``decide(user_message) -> str`` returns the judge's whole answer text; every request's
    messages are recorded in ``requests``. With ``api_key``, a request without the header
    ``Authorization: Bearer <api_key>`` gets HTTP 401, as OpenAI's API answers.
    """

    def __init__(self, decide, *, api_key=None):
        self.decide = decide
        self.api_key = api_key
        self.requests = []
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, payload):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self._send(200, {"object": "list", "data": [{"id": "judge", "object": "model"}]})

            def do_POST(self):
                if self.path != "/v1/chat/completions":
                    self._send(404, {"error": "not found"})
                    return
                if judge.api_key and self.headers.get("Authorization") != f"Bearer {judge.api_key}":
                    self._send(401, {"error": {"message": "Incorrect API key provided"}})
                    return
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.requests.append(request)
                text = judge.decide(request["messages"][-1]["content"])
                self._send(
                    200,
                    {
                        "id": "x",
                        "object": "chat.completion",
                        "model": request.get("model"),
                        "choices": [
                            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                        ],
                    },
                )

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def shown_responses(user_message: str) -> tuple[str, str]:
    """The two responses as shown in the side-by-side judge prompt."""
    first = user_message.split("[Response A]\n", 1)[1].split("\n\n[Response B]\n", 1)[0]
    second = user_message.split("[Response B]\n", 1)[1].split("\n\nExplain your reasoning", 1)[0]
    return first, second
