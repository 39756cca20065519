"""The job's DICOMweb transport: a PACS (Orthanc, dcm4chee, a cloud archive) read and written over QIDO-RS, WADO-RS
and STOW-RS with ``dicomweb-client``, under the same retry rules as object storage (:mod:`jobs.storage`).

A series is named by a manifest path ``dicomweb+https://host/dicom-web/studies/<StudyUID>/series/<SeriesUID>``
(``dicomweb+http`` too): the service root is what precedes ``/studies/``.

Credentials come from the environment, never from a path or a flag: ``VIT3D_DICOMWEB_TOKEN`` (sent as
``Authorization: Bearer …``), else ``VIT3D_DICOMWEB_USER`` and ``VIT3D_DICOMWEB_PASSWORD`` (HTTP basic). The
driver reads its own and hands them to the decode tasks in memory (:class:`Credentials`, :func:`grant`), so that
they need to be set where the job is started only; a worker without them falls back to its own environment. A
path with user info is refused. No request's headers are ever logged.

Errors: connection refused or reset, timeouts, 429 and 5xx are transient (:class:`Unreachable`, an OSError that
:func:`jobs.storage.retrying` retries within ``--storage-retry-s``); 401/403/404 and other 4xx are
:class:`Refused`, permanent, with the status and what it means. ``dicomweb-client``'s own retries are turned off
(five attempts with back-off hid a stopped server for 30 s, measured), so the retry budget is ours alone.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import pydicom
import pydicom.uid
import requests
from pydicom.valuerep import DA, TM
from requests.adapters import HTTPAdapter

from jobs import storage

__all__ = [
    "PASSWORD_ENV",
    "SCHEMES",
    "TOKEN_ENV",
    "USER_ENV",
    "Credentials",
    "Refused",
    "SeriesRef",
    "Unreachable",
    "client",
    "grant",
    "instance_time_us",
    "is_dicomweb",
    "iter_pages",
    "parse_series",
    "request",
    "service_url",
]

T = TypeVar("T")

SCHEMES = ("dicomweb+https://", "dicomweb+http://")
TOKEN_ENV = "VIT3D_DICOMWEB_TOKEN"
USER_ENV = "VIT3D_DICOMWEB_USER"
PASSWORD_ENV = "VIT3D_DICOMWEB_PASSWORD"  # noqa: S105  (the variable's name, not a password)
TIMEOUT_S = (10.0, 120.0)  # connect, and between bytes of a reply: a server that stops answering is transient
_SERIES = re.compile(r"^(?P<root>.+?)/studies/(?P<study>[0-9.]+)/series/(?P<series>[0-9.]+)/?$")


class Unreachable(ConnectionError):
    """The server did not answer, or answered 429 or 5xx: transient, retried within the storage retry budget."""


class Refused(OSError):
    """The server answered with a permanent error (401, 403, 404, another 4xx). ``status``: the HTTP status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class SeriesRef:
    """One series on a DICOMweb server: its service root (``http(s)://host/dicom-web``) and UIDs."""

    root: str
    study: str
    series: str

    @property
    def path(self) -> str:
        """The manifest path naming this series."""
        return f"dicomweb+{self.root}/studies/{self.study}/series/{self.series}"


def is_dicomweb(path: str) -> bool:
    """Whether ``path`` names something on a DICOMweb server (``dicomweb+http(s)://``)."""
    return path.lower().startswith(SCHEMES)


def service_url(url: str) -> str:
    """The HTTP(S) service root of a ``dicomweb+http(s)://`` URL (or of a plain ``http(s)://`` one), without a
    trailing '/'. ValueError for a URL with user info, a query, or another scheme."""
    plain = url[len("dicomweb+") :] if is_dicomweb(url) else url
    if not plain.lower().startswith(("http://", "https://")):
        raise ValueError(f"not a DICOMweb URL (dicomweb+https://host/dicom-web/...): {url}")
    netloc = plain.split("://", 1)[1].split("/", 1)[0]
    if "@" in netloc:
        raise ValueError(f"credentials in a DICOMweb URL are refused; set {TOKEN_ENV} or {USER_ENV}/{PASSWORD_ENV}")
    if "?" in plain or "#" in plain:
        raise ValueError(f"a DICOMweb URL takes no query or fragment: {url}")
    return plain.rstrip("/")


def parse_series(path: str) -> SeriesRef:
    """The series a manifest path names; ValueError saying what is wrong otherwise."""
    root = service_url(path)
    match = _SERIES.match(root)
    if match is None:
        raise ValueError(f"not a DICOMweb series path (…/studies/<StudyUID>/series/<SeriesUID>): {path}")
    for uid in (match["study"], match["series"]):
        if len(uid) > 64 or not pydicom.uid.UID(uid).is_valid:
            raise ValueError(f"not a valid DICOM UID (digits and dots, at most 64): {uid}")
    return SeriesRef(match["root"].rstrip("/"), match["study"], match["series"])


class _TimeoutAdapter(HTTPAdapter):
    """Every request with a timeout: requests has none by default, and a silent server would hang a task."""

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = TIMEOUT_S
        return super().send(request, **kwargs)


@dataclasses.dataclass(frozen=True)
class Credentials:
    """A bearer token, or a user and password: what the driver's environment holds, as it travels to the decode
    tasks (pickled with their arguments, never in a runtime environment, which Ray's dashboard shows). Its repr
    shows neither value."""

    token: str | None = dataclasses.field(default=None, repr=False)
    user: str | None = dataclasses.field(default=None, repr=False)
    password: str | None = dataclasses.field(default=None, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Credentials | None:
        """Those of ``environ`` (default: this process's environment); None when it holds none."""
        env = os.environ if environ is None else environ
        if env.get(TOKEN_ENV):
            return cls(token=env[TOKEN_ENV])
        if env.get(USER_ENV):
            return cls(user=env[USER_ENV], password=env.get(PASSWORD_ENV, ""))
        return None

    def apply(self, session: requests.Session) -> None:
        if self.token:
            session.headers["Authorization"] = f"Bearer {self.token}"
        elif self.user:
            session.auth = (self.user, self.password or "")


_granted: list[Credentials | None] = [None]


def grant(credentials: Credentials | None) -> None:
    """Use ``credentials`` in this process from now on (a decode task: the driver's); None: this process's own
    environment again."""
    _granted[0] = credentials


def _credentials() -> Credentials | None:
    return _granted[0] or Credentials.from_env()


def _session(credentials: Credentials | None) -> requests.Session:
    """A session carrying ``credentials``, with timeouts and no retries of its own."""
    session = requests.Session()
    session.mount("http://", _TimeoutAdapter(max_retries=0))
    session.mount("https://", _TimeoutAdapter(max_retries=0))
    if credentials is not None:
        credentials.apply(session)
    return session


_local = threading.local()


def client(root: str) -> Any:
    """A ``dicomweb_client.DICOMwebClient`` for the service root ``root`` (http(s)://…/dicom-web), one per thread,
    root and credentials (a decode task's threads each keep theirs), with its own retries off."""
    from dicomweb_client import DICOMwebClient  # imported where used: its import pulls in PIL and retrying

    credentials = _credentials()
    key = (root, credentials)
    clients = _local.__dict__.setdefault("clients", {})
    if key not in clients:
        web = DICOMwebClient(url=root, session=_session(credentials))
        web.set_http_retry_params(retry=False)
        clients[key] = web
    return clients[key]


_MEANING = {
    401: "unauthorized: credentials missing or refused ({token} or {user}/{password})",
    403: "forbidden: these credentials may not read it",
    404: "not found on the server",
}


def _classified(error: Exception) -> Exception:
    """``error`` from requests as :class:`Unreachable` (transient) or :class:`Refused` (permanent). The messages
    name the status, never the request (its headers carry the credentials)."""
    if isinstance(error, requests.HTTPError) and error.response is not None:
        status = error.response.status_code
        if status == 429 or status >= 500:
            return Unreachable(f"HTTP {status} {error.response.reason}")
        meaning = _MEANING.get(status, error.response.reason or "refused").format(
            token=TOKEN_ENV, user=USER_ENV, password=PASSWORD_ENV
        )
        return Refused(f"HTTP {status} {meaning}", status)
    if isinstance(error, (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)):
        return Unreachable(f"server unreachable ({type(error).__name__})")
    return error


def request(call: Callable[[], T], what: str, retry_s: float | None) -> T:
    """``call()`` (one DICOMweb request, or a retrieval consumed whole), retried as object storage is
    (:func:`jobs.storage.retrying`, its log lines naming ``what``): raises :class:`jobs.errors.StorageUnreachable`
    once the budget is spent, :class:`Refused` at once."""

    def attempt() -> T:
        try:
            return call()
        except (requests.RequestException, requests.exceptions.ChunkedEncodingError) as e:
            raise _classified(e) from None

    return storage.retrying(attempt, what, retry_s)


def instance_time_us(item: pydicom.Dataset) -> int | None:
    """An instance's time in µs since the epoch, for fingerprints and settling: InstanceCreationDate/Time, else
    ContentDate/Time, else AcquisitionDate/Time. DICOM times carry no zone unless TimezoneOffsetFromUTC says one;
    without it they are taken as UTC. None when the instance has none of them."""
    offset = _utc_offset(item.get("TimezoneOffsetFromUTC", ""))
    for date_key, time_key in (
        ("InstanceCreationDate", "InstanceCreationTime"),
        ("ContentDate", "ContentTime"),
        ("AcquisitionDate", "AcquisitionTime"),
    ):
        date, clock = str(item.get(date_key, "") or ""), str(item.get(time_key, "") or "")
        if len(date) == 8 and date.isdigit():
            stamp = _parse_time(date, clock)
            if stamp is not None:
                return int((stamp - offset).replace(tzinfo=datetime.UTC).timestamp() * 1_000_000)
    return None


def _parse_time(date: str, clock: str) -> datetime.datetime | None:
    """A DICOM date and time (DA, TM: pydicom's parsers; a missing time is midnight), or None when either does
    not conform."""
    try:
        day, moment = DA(date), TM(clock) if clock else datetime.time()
    except ValueError:
        return None
    return datetime.datetime.combine(day, moment or datetime.time()) if day is not None else None


def _utc_offset(text: str) -> datetime.timedelta:
    text = str(text)
    if len(text) == 5 and text[0] in "+-" and text[1:].isdigit():
        delta = datetime.timedelta(hours=int(text[1:3]), minutes=int(text[3:5]))
        return delta if text[0] == "+" else -delta
    return datetime.timedelta(0)


def iter_pages(search: Callable[[int, int], list[T]], page: int) -> Iterator[T]:
    """Every result of a QIDO search, ``page`` at a time (``search(limit, offset)``), until a page comes back
    empty: a server may cap a page below ``page``, so a short page does not mean the last."""
    offset = 0
    while True:
        found = search(page, offset)
        if not found:
            return
        yield from found
        offset += len(found)
