"""A WSGI app for gunicorn under `handoff run`: `GET /` answers `pid=<pid>`."""
import os


def app(environ, start_response):
    body = f"pid={os.getpid()}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
