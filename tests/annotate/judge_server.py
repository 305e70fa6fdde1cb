"""A real OpenAI-compatible HTTP server on 127.0.0.1 that answers like a judge, by rule.

Rules: ``entities`` prefers the response with more entities (a fair judge), ``first`` always
prefers response 1 (a position-biased judge). Faults can be injected: the first
``fail_first`` requests get HTTP 503; with ``reject_json_mode`` a request carrying
``response_format`` gets HTTP 400; with ``reject_all`` every chat request gets HTTP 400 (as
for a prompt longer than the judge's context); ``fenced`` wraps the JSON in prose and a code
fence.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def count_entities(text: str) -> int:
    return len(re.findall(r'"name"\s*:', text))


class JudgeServer:
    def __init__(
        self, rule="entities", fail_first=0, reject_json_mode=False, fenced=False, reject_all=False
    ):
        self.rule, self.fail_first, self.reject_json_mode, self.fenced = (
            rule, fail_first, reject_json_mode, fenced)  # fmt: skip
        self.reject_all = reject_all
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    n = len(server.requests)
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": "not found"})
                if server.reject_all:
                    return self._send(400, {"error": "prompt is longer than the context"})
                if n <= server.fail_first:
                    return self._send(503, {"error": "overloaded"})
                if server.reject_json_mode and "response_format" in body:
                    return self._send(400, {"error": "response_format is not supported"})
                self._send(
                    200,
                    {
                        "choices": [
                            {"message": {"role": "assistant", "content": server.answer(body)}}
                        ]
                    },
                )

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def answer(self, body: dict) -> str:
        user = body["messages"][-1]["content"]
        r1 = re.search(r"<response_1>\n(.*?)\n</response_1>", user, re.S).group(1)
        r2 = re.search(r"<response_2>\n(.*?)\n</response_2>", user, re.S).group(1)
        keys = re.findall(r'^- "(\w+)":', user, re.M)
        if self.rule == "first":
            v = "1"
        else:
            n1, n2 = count_entities(r1), count_entities(r2)
            v = "1" if n1 > n2 else "2" if n2 > n1 else "tie"
        out = json.dumps({k: v for k in keys})
        return f"Here is my verdict:\n```json\n{out}\n```\nThanks." if self.fenced else out

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
