#!/usr/bin/env python3
"""A small HTTP server in Python that speaks systemd socket activation, used to
test `handoff run` with a server that is not written in Rust.

It takes fd 3 from LISTEN_FDS (checking LISTEN_PID), answers
`GET /` with `pid=<pid>`, and sends READY=1 to NOTIFY_SOCKET once it serves.
On SIGTERM it stops accepting, answers each open connection's next request
with `Connection: close`, and exits once no request has been in flight for a
second (or at once when there are none)."""

import http.server
import os
import signal
import socket
import sys
import threading
import time

draining = threading.Event()
lock = threading.Lock()
in_flight = 0
last_activity = time.monotonic()


def notify(message):
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(message.encode(), address)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        global in_flight, last_activity
        with lock:
            in_flight += 1
        try:
            body = f"pid={os.getpid()}\n".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            if draining.is_set():
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(body)
        finally:
            with lock:
                in_flight -= 1
                last_activity = time.monotonic()

    def log_message(self, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


def main():
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or os.environ.get("LISTEN_FDS") != "1":
        sys.exit("expected one socket from socket activation")
    sock = socket.socket(fileno=3)
    server = Server(sock.getsockname(), Handler, bind_and_activate=False)
    server.socket = sock
    signal.signal(signal.SIGTERM, lambda *_: draining.set())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    notify("READY=1")
    # Wake up now and then: the kernel may deliver SIGTERM to another thread,
    # and CPython runs the handler only when the main thread runs.
    while not draining.wait(0.1):
        pass
    server.shutdown()
    sock.close()
    while True:
        with lock:
            idle = in_flight == 0 and time.monotonic() - last_activity > 1.0
        if idle:
            break
        time.sleep(0.05)


if __name__ == "__main__":
    main()
