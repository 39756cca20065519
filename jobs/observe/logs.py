"""Logging for the command lines: the ``jobs`` and ``vit3d`` loggers to stderr, as text or JSON lines.

Library code only calls ``logging.getLogger(__name__)``; a command line calls :func:`configure_logging` once.
The root logger is left alone, so embedding ``jobs`` does not change anyone else's logging.

Every line the command line prints passes :func:`jobs.redact.scrub` (credentials out; PHI too under
``--redact-paths``): the handlers' records (:class:`jobs.redact.ScrubFilter`), and, inside
:func:`filter_native_stderr` with a ``scrub``, native stderr lines and Python's ``sys.stdout``/``sys.stderr``
(where Ray prints its workers' forwarded lines).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import re
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO

from jobs.redact import ScrubFilter

PACKAGES = ("jobs", "vit3d")
# Set by the command line's -v/--verbose and passed on to Ray workers (jobs.run.pipeline): then nothing below is
# hidden: Ray's INFO lines, Ray Data's per-dataset lines, TensorFlow's start-up lines.
VERBOSE_ENV = "VIT3D_VERBOSE"
# Ray lines hidden unless verbose: said once per process, and nothing for a person to act on in this product.
RAY_NOISE = (
    "Token authentication is enabled for this Ray cluster.",  # a local ray.init() turns token auth on (good)
    "Progress bars disabled.",  # Ray Data's: jobs.run.pipeline turns them off, jobs.observe.progress shows progress
)
_cli: dict[str, bool] = {}  # what configure_logging chose, for Ray's loggers (adopt_ray_logging); empty when embedded


def is_verbose() -> bool:
    """True when -v/--verbose asked for everything (this process or, through the env, the driver's)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def _not_ray_noise(record):
    return is_verbose() or not record.getMessage().startswith(RAY_NOISE)


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_text:  # set (and scrubbed) by jobs.redact.ScrubFilter
            entry["exception"] = record.exc_text
        elif record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(progress: bool = True, log_format: str = "text", verbose: bool = False) -> None:
    """The CLI's logging: ``jobs`` and ``vit3d`` to stderr; INFO with progress, else warnings and errors only.

    Ray's loggers: WARNING and up (all with ``verbose``); :func:`adopt_ray_logging` gives them the same format
    once Ray has started. With JSON, Python warnings are logged too (logger ``py.warnings``), as JSON lines.
    """
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    verbose = is_verbose()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter() if log_format == "json" else logging.Formatter("%(name)s: %(message)s"))
    ScrubFilter.add_to(handler)  # credentials (and PHI under --redact-paths) out of every record
    level = logging.INFO if progress or verbose else logging.WARNING
    for name in (*PACKAGES, *(("py.warnings",) if log_format == "json" else ())):
        package_logger = logging.getLogger(name)
        package_logger.handlers[:] = [handler]
        package_logger.setLevel(level)
        package_logger.propagate = False
    if log_format == "json":
        logging.captureWarnings(True)
    # ray.init() sets the "ray" logger's level to its logging_level; jobs.run.pipeline.connect_ray passes this one on.
    logging.getLogger("ray").setLevel(logging.INFO if verbose else logging.WARNING)
    # Logged during ray.init(), before adopt_ray_logging can reach Ray's handler: filtered where it is logged.
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_not_ray_noise)
    _cli.update(json=log_format == "json")


def adopt_ray_logging() -> None:
    """Ray's console handlers (loggers ``ray`` and ``ray.data``) in the CLI's terms; call after ray.init() and
    ``import ray.data``. JSON logs: Ray's lines become JSON objects too. Ray Data's console shows WARNING and up
    (its per-dataset INFO lines stay in Ray's ``ray-data.log``) unless verbose. A no-op for a program that embeds
    ``jobs`` without calling :func:`configure_logging`: its logging is its own.
    """
    if not _cli:
        return
    for name in ("ray", "ray.data"):
        for handler in logging.getLogger(name).handlers:
            if not isinstance(handler, logging.StreamHandler) or isinstance(handler, logging.FileHandler):
                continue  # Ray's session log files keep everything, as they are
            ScrubFilter.add_to(handler)
            if _cli["json"]:
                handler.setFormatter(JsonLogFormatter())
            if name == "ray.data":
                handler.setLevel(logging.INFO if is_verbose() else logging.WARNING)
                handler.addFilter(_not_ray_noise)


# --- native start-up lines ------------------------------------------------------------------------------------

# absl's prefix: severity, MMDD, time, thread, file:line] (e.g. "I0000 00:00:1796191799.889 4327 port.cc:153] ").
_ABSL_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ ([\w.-]+):\d+\] ")
_ABSL_BANNER = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
_SEVERITY = {"I": 0, "W": 1, "E": 2, "F": 3}  # TF_CPP_MIN_LOG_LEVEL's numbers


def no_gpu_expected() -> bool:
    """True when this process cannot have a GPU: CUDA_VISIBLE_DEVICES hides them all, or no NVIDIA device node."""
    return os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1") or not os.path.exists("/dev/nvidiactl")


def tensorflow_startup_noise(line: str, min_level: int | None = None, no_gpu: bool | None = None) -> bool:
    """True for a line TensorFlow's native code prints at start-up that TF_CPP_MIN_LOG_LEVEL means to hide.

    TensorFlow's libraries log from static initializers when they load (oneDNN on, no CUDA driver), before
    TF_CPP_MIN_LOG_LEVEL is read, through absl's pre-initialization stderr logging. Those lines, and absl's banner,
    are hidden when below the level; so is the ERROR "failed call to cuInit" where no GPU can exist (a CPU-only
    machine, or a process given no GPU). Every other line, every other ERROR and FATAL included, is kept.
    """
    if min_level is None:
        try:
            min_level = int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
        except ValueError:
            min_level = 0
    line = line.rstrip("\n")
    if line == _ABSL_BANNER:
        return min_level >= 1
    match = _ABSL_LINE.match(line)
    if match is None:
        return False
    severity, source = _SEVERITY[match.group(1)], match.group(2)
    if severity < min_level:
        return True
    if source == "cuda_platform.cc" and "failed call to cuInit" in line:
        return no_gpu_expected() if no_gpu is None else no_gpu
    return False


@contextlib.contextmanager
def hide_native_stderr_lines(noise: Callable[[str], bool], enabled: bool = True) -> Iterator[None]:
    """Inside the block, lines written to file descriptor 2 (native code, and Python's stderr) are held back;
    at the end those for which ``noise(line)`` is false are written out, in order.

    For short blocks only (an import): nothing is shown until the block ends, and a process that dies inside it
    loses what was held back (run with -v to see everything). No-op when not ``enabled``.
    """
    if not enabled:
        yield
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as held:
            os.dup2(held.fileno(), 2)
            try:
                yield
            finally:
                with contextlib.suppress(Exception):
                    sys.stderr.flush()
                os.dup2(saved, 2)
                held.seek(0)
                text = held.read().decode("utf-8", "replace")
                kept = "".join(line for line in text.splitlines(keepends=True) if not noise(line))
                data = kept.encode()
                while data:
                    data = data[os.write(2, data) :]
    finally:
        os.close(saved)


# Said by Ray's C++ core worker in the driver for every actor Ray Data starts: Ray Data itself passes object refs to
# its actors' constructors (ray issue 53727); nothing a user can act on. Matched on the whole sentence.
_RAY_CONSTRUCTOR_ARGS = re.compile(
    r"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store"
)


def native_noise(line: str) -> bool:
    """True for a line native code writes to stderr that a run hides unless verbose: TensorFlow's start-up lines
    (:func:`tensorflow_startup_noise`) and Ray Data's actor constructor-argument notice."""
    return tensorflow_startup_noise(line) or bool(_RAY_CONSTRUCTOR_ARGS.search(line))


class ScrubbedStream:
    """A text stream whose writes pass through ``scrub`` first; everything else (isatty, fileno, encoding, flush)
    is the wrapped stream's, so that a progress bar still finds its terminal."""

    def __init__(self, stream: TextIO, scrub: Callable[[str], str]) -> None:
        self._stream, self._scrub = stream, scrub

    def write(self, text: str) -> int:
        self._stream.write(self._scrub(text))
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _never(line: str) -> bool:
    return False


@contextlib.contextmanager
def filter_native_stderr(
    noise: Callable[[str], bool] = native_noise, enabled: bool = True, scrub: Callable[[str], str] | None = None
) -> Iterator[None]:
    """For a command line's whole run: what native code (and child processes) write to file descriptor 2 passes
    through a pipe, and a thread forwards every line for which ``noise(line)`` is false, as it comes.

    Python's own ``sys.stderr`` is pointed at the real stderr meanwhile, so the progress bar still sees a terminal.
    ``scrub`` (:func:`jobs.redact.scrub`), if given, rewrites every forwarded line and every write to Python's
    ``sys.stdout`` and ``sys.stderr`` (Ray prints its workers' lines there), verbose or not. Without ``scrub``, a
    no-op when not ``enabled`` (``-v``); with it, ``-v`` only stops the noise filter. Also a no-op when file
    descriptor 2 cannot be duplicated.
    """
    quiet = enabled and not is_verbose()
    if not quiet and scrub is None:
        yield
        return
    if not quiet:
        noise = _never
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    try:
        saved = os.dup(2)
        read_fd, write_fd = os.pipe()
    except OSError:
        yield
        return
    python_stderr, python_stdout = sys.stderr, sys.stdout
    os.dup2(write_fd, 2)
    os.close(write_fd)

    def forward_line(data: bytes) -> None:
        text = data.decode("utf-8", "replace")
        if noise(text):
            return
        if scrub is not None:
            clean = scrub(text)
            if clean != text:
                data = clean.encode("utf-8", "replace")
        _write_all(saved, data)

    def forward():
        with open(read_fd, "rb", buffering=0) as pipe:
            pending = b""
            while chunk := pipe.read(65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    forward_line(line + b"\n")
            if pending:
                forward_line(pending)

    thread = threading.Thread(target=forward, name="vit3d-stderr", daemon=True)
    thread.start()
    own = None
    with contextlib.suppress(Exception):  # a real stderr for Python's writes: its isatty() is the terminal's
        encoding = getattr(python_stderr, "encoding", None) or "utf-8"
        own = open(os.dup(saved), "w", buffering=1, encoding=encoding)  # noqa: SIM115 (closed in the finally)
        sys.stderr = own if scrub is None else ScrubbedStream(own, scrub)
    if scrub is not None:
        sys.stdout = ScrubbedStream(python_stdout, scrub)
    try:
        yield
    finally:
        sys.stderr, sys.stdout = python_stderr, python_stdout
        if own is not None:
            own.close()
        with contextlib.suppress(Exception):
            python_stderr.flush()
        os.dup2(saved, 2)  # closes our write end of the pipe: the thread ends once child processes close theirs
        thread.join(timeout=2.0)
        if not thread.is_alive():  # else a child still holds the pipe: the thread keeps the descriptor it writes to
            os.close(saved)


def _write_all(fd: int, data: bytes) -> None:
    with contextlib.suppress(OSError):
        while data:
            data = data[os.write(fd, data) :]
