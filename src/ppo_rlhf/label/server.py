"""The labelling web server: stdlib `http.server`, one JSON API, the page from static/.

    ppo-rlhf label --pairs pairs.jsonl --out prefs.jsonl      # then open the printed URL

API (all JSON; errors are `{"error": message}` with a 4xx status):
    GET  /api/state                          -> state
    POST /api/label {"index": i, "choice": 1 | 2 | "tie" | "skip"} -> state
    POST /api/undo                           -> state (the undone pair is shown again)
where state = {"total", "done", "next": {"index", "prompt", "a", "b"} | null, "can_undo", "out_path"}.

A choice of 1 or 2 appends `{"prompt", "chosen", "rejected"}` -- the reward stage's input format --
to the output file; a tie or a skip goes to the sidecar `<out>.skipped.jsonl`. Each label is one
whole-line `write` to a file opened with O_APPEND, under a lock, then fsync'ed, so a crash or many
concurrent requests never leave a torn or interleaved line. Pairs already in either file when the
server starts count as done, so a restarted session resumes where it stopped.

The server binds 127.0.0.1 by default and answers only requests whose Host names a loopback
address (DNS-rebinding) and whose Origin, if any, is the page itself (cross-site POSTs); POST
bodies must be `application/json` and at most 16 KiB.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
import sys
import threading
import webbrowser
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ppo_rlhf.errors import UserError
from ppo_rlhf.fileio import atomic_write_text

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024
STATIC_DIR = Path(__file__).parent / "static"
STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
CHOICES = {1: "1", 2: "2", "1": "1", "2": "2", "tie": "tie", "skip": "skip"}
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


class RequestError(Exception):
    """A request the server refuses; `status` is the HTTP status, the message goes to the page."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def pair_key(prompt: str, first: str, second: str) -> tuple[str, str, str]:
    """Identity of a pair regardless of which response is shown first or was chosen."""
    return (prompt, *sorted((first, second)))


def skipped_path(out_path: str | Path) -> Path:
    """The sidecar file of ties and skips next to the preference file."""
    return Path(str(out_path) + ".skipped.jsonl")


class LabelStore:
    """The pairs of a labelling session, what is done, and the two output files. Thread-safe.

    `out_path` receives `{"prompt", "chosen", "rejected"}` lines; ties and skips go to
    `skipped_path(out_path)` as `{"prompt", "a", "b", "label": "tie" | "skip"}`.
    """

    def __init__(self, pairs: list[dict], out_path: str | Path) -> None:
        self.pairs = _unique_pairs(pairs)
        # Two identical responses compare nothing (pairs_from_model has already re-drawn them).
        self.identical = sum(p["a"] == p["b"] for p in self.pairs)
        self.pairs = [p for p in self.pairs if p["a"] != p["b"]]
        self._keys = [pair_key(p["prompt"], p["a"], p["b"]) for p in self.pairs]
        self.out_path = Path(out_path)
        self.skipped_path = skipped_path(out_path)
        self._lock = threading.Lock()
        self._done = _labelled_keys(self.out_path, ("chosen", "rejected"))
        self._done |= _labelled_keys(self.skipped_path, ("a", "b"))
        self._undo: list[tuple[Path, str, int]] = []  # (file, line written, pair index), this session

    def state(self, prefer: int | None = None) -> dict:
        """Progress and the next pair to show: `prefer` if it is still to do, else the first to do."""
        with self._lock:
            return self._state(prefer)

    def label(self, index: Any, choice: Any) -> dict:
        """Record `choice` (1, 2, "tie", "skip") for pair `index`; return the new state."""
        pair = self._pair(index)
        if isinstance(choice, bool) or not isinstance(choice, (int, str)) or choice not in CHOICES:
            raise RequestError(HTTPStatus.BAD_REQUEST, 'field "choice" must be 1, 2, "tie" or "skip"')
        choice = CHOICES[choice]
        if choice in ("1", "2"):
            chosen, rejected = (pair["a"], pair["b"]) if choice == "1" else (pair["b"], pair["a"])
            path, record = self.out_path, {"prompt": pair["prompt"], "chosen": chosen, "rejected": rejected}
        else:
            path, record = self.skipped_path, {**pair, "label": choice}
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            key = self._keys[index]
            if key in self._done:
                raise RequestError(HTTPStatus.CONFLICT, f"pair {index} is already labelled; reload the page")
            append_line(path, line)
            self._done.add(key)
            self._undo.append((path, line, index))
            return self._state(None)

    def undo(self) -> dict:
        """Remove the last label of this session from its file (atomic rewrite); return the state."""
        with self._lock:
            if not self._undo:
                raise RequestError(HTTPStatus.CONFLICT, "nothing to undo: no label was made in this session")
            path, line, index = self._undo[-1]
            try:
                lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
            except FileNotFoundError:
                lines = []
            if line not in lines:
                raise RequestError(HTTPStatus.CONFLICT,
                                   f"the last label is no longer in {path}; nothing undone")
            position = len(lines) - 1 - lines[::-1].index(line)
            atomic_write_text(path, "".join(lines[:position] + lines[position + 1:]))
            self._undo.pop()
            self._done.discard(self._keys[index])
            return self._state(index)

    def _pair(self, index: Any) -> dict:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self.pairs):
            raise RequestError(HTTPStatus.BAD_REQUEST,
                               f'field "index" must be an integer in [0, {len(self.pairs)}), got {index!r}')
        return self.pairs[index]

    def _state(self, prefer: int | None) -> dict:
        todo = [i for i, key in enumerate(self._keys) if key not in self._done]
        index = prefer if prefer in todo else (todo[0] if todo else None)
        return {
            "total": len(self.pairs),
            "done": len(self.pairs) - len(todo),
            "next": None if index is None else {"index": index, **self.pairs[index]},
            "can_undo": bool(self._undo),
            "out_path": str(self.out_path),
            "identical_skipped": self.identical,
        }


def append_line(path: Path, line: str) -> None:
    """Append one whole line with a single O_APPEND write, then fsync.

    A file whose last line lacks its newline (written by another tool) gets one first, so the new
    record never glues onto it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)  # read: the last byte
    try:
        size = os.fstat(fd).st_size
        data = line.encode("utf-8")
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
        os.fsync(fd)
    finally:
        os.close(fd)


def _labelled_keys(path: Path, fields: tuple[str, str]) -> set[tuple[str, str, str]]:
    """Pair keys of the records already in a label file (missing file: none)."""
    if not path.exists():
        return set()
    keys = set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{lineno}: not valid JSON ({err.msg}); fix: repair or delete that "
                                "line, then start labelling again") from None
            if isinstance(record, dict) and all(isinstance(record.get(k), str) for k in ("prompt", *fields)):
                keys.add(pair_key(record["prompt"], record[fields[0]], record[fields[1]]))
    return keys


def _unique_pairs(pairs: list[dict]) -> list[dict]:
    """Validated {"prompt", "a", "b"} copies, duplicates (same prompt and responses) dropped."""
    unique, seen = [], {}
    for i, pair in enumerate(pairs):
        if not isinstance(pair, dict) or not all(isinstance(pair.get(k), str) for k in ("prompt", "a", "b")):
            raise UserError(f"pair {i}: needs string fields 'prompt', 'a' and 'b'; got {pair!r:.200}")
        key = pair_key(pair["prompt"], pair["a"], pair["b"])
        if key in seen:
            log.warning("pair %d repeats pair %d; labelling it once", i, seen[key])
            continue
        seen[key] = i
        unique.append({"prompt": pair["prompt"], "a": pair["a"], "b": pair["b"]})
    return unique


class LabelServer(ThreadingHTTPServer):
    """A threaded HTTP server holding the `LabelStore` its handlers use."""

    daemon_threads = True
    request_queue_size = 128  # bursts of clients queue in the backlog instead of being refused

    def __init__(self, address: tuple[str, int], store: LabelStore) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.store = store
        self.loopback_only = _is_loopback(address[0])
        super().__init__(address, LabelHandler)


class LabelHandler(BaseHTTPRequestHandler):
    """Serves the page, its static files and the JSON API of `LabelStore`."""

    server: LabelServer
    server_version = "ppo-rlhf-label"

    def do_GET(self) -> None:
        self._handle(self._get)

    def do_POST(self) -> None:
        self._handle(self._post)

    def _get(self) -> None:
        path = urlsplit(self.path).path
        if path == "/api/state":
            self._send_json(HTTPStatus.OK, self.server.store.state())
            return
        name = "index.html" if path in ("/", "/index.html") else path.removeprefix("/static/")
        if name not in STATIC_FILES:
            raise RequestError(HTTPStatus.NOT_FOUND, f"no such page: {path}")
        self._send(HTTPStatus.OK, (STATIC_DIR / name).read_bytes(), STATIC_FILES[name])

    def _post(self) -> None:
        path = urlsplit(self.path).path
        if path not in ("/api/label", "/api/undo"):
            raise RequestError(HTTPStatus.NOT_FOUND, f"no such endpoint: POST {path}")
        body = self._read_json()
        store = self.server.store
        state = store.label(body.get("index"), body.get("choice")) if path == "/api/label" else store.undo()
        self._send_json(HTTPStatus.OK, state)

    def _handle(self, method) -> None:
        try:
            self._check_host_and_origin()
            method()
        except RequestError as err:
            self._send_json(err.status, {"error": str(err)})
        except Exception as err:  # the page shows the message; the server keeps running
            log.exception("label server: %s %s failed", self.command, self.path)
            self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"server error: {err}"})

    def _check_host_and_origin(self) -> None:
        host = self.headers.get("Host", "")
        if self.server.loopback_only and urlsplit(f"//{host}").hostname not in _LOOPBACK_NAMES:
            raise RequestError(HTTPStatus.FORBIDDEN, f"Host {host!r} is not a loopback address")
        origin = self.headers.get("Origin")
        if origin is not None and origin != f"http://{host}":
            raise RequestError(HTTPStatus.FORBIDDEN, f"cross-origin request from {origin!r} refused")

    def _read_json(self) -> dict:
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise RequestError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "the body must be application/json")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required") from None
        if not 0 <= length <= MAX_BODY_BYTES:
            self.close_connection = True  # the unread body must not be taken for the next request
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"the body is limited to {MAX_BODY_BYTES} bytes")
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"the body is not valid JSON: {err}") from None
        if not isinstance(body, dict):
            raise RequestError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
        return body

    def _send_json(self, status: HTTPStatus, obj: Any) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self._send(status, data, "application/json; charset=utf-8")

    def _send(self, status: HTTPStatus, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", _CSP)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("label server: " + format, *args)


def make_server(pairs: list[dict], out_path: str | Path, host: str = "127.0.0.1",
                port: int = 0) -> tuple[LabelServer, str]:
    """A bound, not yet running labelling server and its URL (`port=0`: any free port).

    Run it with `server.serve_forever()` (e.g. in a thread); stop with `shutdown()` and
    `server_close()`.
    """
    server = LabelServer((host, port), LabelStore(pairs, out_path))
    bound_port = server.server_address[1]
    url_host = f"[{host}]" if ":" in host else host
    return server, f"http://{url_host}:{bound_port}/"


def serve(pairs: list[dict], out_path: str | Path, *, host: str = "127.0.0.1", port: int = 0,
          open_browser: bool = False) -> None:
    """Serve the labelling page until Ctrl-C; labels go to `out_path` (see module docstring)."""
    try:
        server, url = make_server(pairs, out_path, host, port)
    except OSError as err:
        raise UserError(f"cannot listen on {host}:{port} ({err.strerror}); fix: pick another --port") from None
    state = server.store.state()
    if not server.loopback_only:
        print(f"warning: listening on {host}: anyone who can reach this machine can read the pairs "
              "and add labels", file=sys.stderr)
    if state["identical_skipped"]:
        print(f"Skipped {state['identical_skipped']} pair(s) whose two responses are identical "
              "(nothing to compare)", flush=True)
    print(f"Labelling {state['total']} pairs ({state['done']} already done) at {url}\n"
          f"Preferences -> {server.store.out_path}; ties and skips -> {server.store.skipped_path}\n"
          "Press Ctrl-C to stop.", flush=True)
    if open_browser:
        webbrowser.open(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    print(f"Stopped: {server.store.state()['done']} / {state['total']} pairs labelled.", flush=True)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
