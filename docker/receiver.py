#!/usr/bin/env python3
"""A tiny partner endpoint for trying courier out.

It prints the method, path, headers and body of every POST it receives and answers
200 with an empty JSON object. GET, PUT, PATCH and DELETE get 405.
Standard library only.

Usage: python3 receiver.py [PORT]    (default: $PORT, else 8080)
"""

import os
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        lines = [f"{self.command} {self.path}"]
        lines += [f"{name}: {value}" for name, value in self.headers.items()]
        lines.append("")
        # The body exactly as received (invalid UTF-8 shown as U+FFFD).
        lines.append(body.decode("utf-8", errors="replace"))
        lines.append("-" * 60)
        print("\n".join(lines), flush=True)
        self.answer(200, b"{}")

    def do_GET(self):
        self.answer(405, b'{"error":"only POST is accepted"}')

    do_PUT = do_DELETE = do_PATCH = do_GET

    def answer(self, status, payload):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format, *args):
        # The request is printed in full above; skip the one-line access log.
        pass


def main():
    port = int(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("PORT", "8080"))
    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    # As PID 1 in a container, SIGTERM is ignored unless handled: exit on it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"receiver listening on 0.0.0.0:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
