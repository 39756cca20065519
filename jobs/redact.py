"""What a run prints and writes beside its Parquet carries neither credentials nor, on request, PHI.

Two concerns, one module (the base layer: standard library only, no Ray, no pyarrow):

- **Credentials, always.** :func:`scrub_secrets` takes out of any text a URI's user info
  (``s3://KEY:SECRET@bucket/…`` → ``s3://***@bucket/…``), secret-looking query parameters (``…?token=…``), and the
  values of secret-looking environment variables (``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, the user and
  password of a URL such as ``AWS_ENDPOINT_URL=http://user:pass@host``; :data:`SECRET_ENV`). The command lines'
  log handlers (:class:`ScrubFilter`), their console streams and the run report go through :func:`scrub`;
  ``results/`` and ``errors/`` keep each path without its user info (:func:`strip_credentials`).
- **PHI in paths, with ``--redact-paths``.** A :class:`Redactor` replaces scan_ids and paths with stable keyed
  tokens: ``scan-``, ``path-`` or ``name-`` and the first 16 hex digits of HMAC-SHA256 under the key in
  ``$VIT3D_REDACT_KEY`` (:data:`KEY_ENV`) of the scan_id, the path (:func:`canonical_path`: no scheme, user info
  or query, percent-decoded) or one file or folder name. The same value gives the same token every night under
  the same key; without the key nobody can tell which name a token stands for, nor test a guessed name.

Free text (log lines, error messages, the report) is redacted by :meth:`Redactor.text` against what the
redactor learned from the manifest (:meth:`Redactor.learn`): every occurrence of a scan's path (as written,
without scheme or user info, percent-decoded, an object key without its bucket), of its parent folders below
the archive root, of its scan_id, and of the names of its file and folders below the archive root (and the file
name without extension) where they stand alone; a longer path that starts with a known one (a file inside a
series folder, ``x.zip!member``) keeps only what follows it, where each known name is redacted too. Which names
stand alone, and the limits: ``docs/design-decisions.md`` ("PHI in paths: --redact-paths").
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import quote, unquote

from jobs.errors import JobError

__all__ = [
    "KEY_ENV",
    "MIN_KEY_CHARS",
    "SECRET_ENV",
    "Redactor",
    "ScrubFilter",
    "active",
    "canonical_path",
    "scrub",
    "scrub_data",
    "scrub_secrets",
    "secret_values",
    "strip_credentials",
]

KEY_ENV = "VIT3D_REDACT_KEY"
MIN_KEY_CHARS = 16
TOKEN_HEX = 16  # 64 bits: no collision among the scans of any archive
MASK = "***"

# --- credentials -----------------------------------------------------------------------------------------------

# Environment variables whose values are secrets: masked wherever they appear (values of 8 characters or more, so
# that a flag such as "true" is never masked out of a sentence).
SECRET_ENV = re.compile(
    r"SECRET|TOKEN|PASSWORD|PASSWD|PASSPHRASE|CREDENTIAL|ACCESS_KEY|API_KEY|PRIVATE_KEY|SESSION_KEY|REDACT_KEY",
    re.IGNORECASE,
)
MIN_SECRET_CHARS = 8
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<info>[^\s/?#@'\"<>]+)@")
_SECRET_QUERY = re.compile(
    r"(?P<name>[?&;][\w.-]*?(?:secret|token|password|passwd|signature|credential|access[_-]?key|api[_-]?key|sig)"
    r"[\w.-]*=)[^&\s'\"<>#]+",
    re.IGNORECASE,
)


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """The values :func:`scrub_secrets` masks (longest first): the values of the secret-named variables of
    ``environ`` (default: ``os.environ``), and the user and password of any URL in it."""
    values = set()
    for name, value in (os.environ if environ is None else environ).items():
        if SECRET_ENV.search(name) and len(value) >= MIN_SECRET_CHARS:
            values.add(value)
        if "@" in value and "://" in value:
            for match in _USERINFO.finditer(value):
                for part in match.group("info").split(":", 1):
                    if len(part) >= 4:  # a user name too: it names the account the password belongs to
                        values.update({part, unquote(part)})
    encoded = {quote(v, safe="") for v in values}  # as they appear inside a URI
    return sorted(values | encoded, key=len, reverse=True)


def scrub_secrets(text: str, userinfo: str = MASK + "@", secrets: Iterable[str] | None = None) -> str:
    """``text`` without credentials: a URI's user info becomes ``userinfo`` (``***@``; ``""`` drops it), secret
    query parameters ``***``, and every secret environment variable's value ``***`` (``secrets``: the values to
    mask, default :func:`secret_values` now)."""
    if not text:
        return text
    if "://" in text and "@" in text:
        text = _USERINFO.sub(lambda m: m.group("scheme") + userinfo, text)
    if "=" in text:
        text = _SECRET_QUERY.sub(lambda m: m.group("name") + MASK, text)
    for value in secret_values() if secrets is None else secrets:
        if value in text:
            text = text.replace(value, MASK)
    return text


def strip_credentials(uri: str) -> str:
    """A path or URI without the user info of its URIs (``s3://KEY:SECRET@bucket/x`` → ``s3://bucket/x``): what
    ``results/`` and ``errors/`` keep of a path."""
    if "://" not in uri or "@" not in uri:
        return uri
    return _USERINFO.sub(lambda m: m.group("scheme"), uri)


# --- PHI: keyed tokens ---------------------------------------------------------------------------------------

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# A word of free text: what lies between spaces, quotes, brackets, commas, semicolons, '|' and '=' (a URI's '='s,
# in its query, are its own).
_DELIMITERS = r"\s'\"`()\[\]{}<>,;|="
_WORD = re.compile(rf"[A-Za-z][A-Za-z0-9+.-]*://[^{_DELIMITERS[:-1]}]+|[^{_DELIMITERS}]+")
_HAS_DELIMITER = re.compile(rf"[{_DELIMITERS}]")
_SEPARATOR = re.compile(r"([/\\!])")  # inside a path: folders, and a zip's member (x.zip!member)
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
MIN_NAME_CHARS = 4  # a name or scan_id shorter than this is redacted only as part of a path
MIN_PART_CHARS = 3


def canonical_path(path: str) -> str:
    """The form of a path its token is computed from: a URI without scheme, user info, query and trailing slash,
    percent-decoded (``s3://K:S@bkt/DOE%5EJ/x.nii.gz?endpoint_override=…`` → ``bkt/DOE^J/x.nii.gz``); a local
    path as it is (without a trailing slash)."""
    text = str(path)
    scheme = _SCHEME.match(text)
    if scheme:
        rest = text[scheme.end() :].split("?", 1)[0].split("#", 1)[0]
        netloc, sep, key = rest.partition("/")
        text = netloc.rsplit("@", 1)[-1] + sep + key
        if "%" in text:
            text = unquote(text)
    return text.rstrip("/") or text


def _stems(name: str) -> list[str]:
    """A file name without its extension(s): ``IM1.nii.gz`` → ``IM1``, ``DOE^J.zip`` → ``DOE^J``."""
    out = []
    base = name
    for ext in _COMPRESSED:
        if base.lower().endswith(ext):
            base = base[: -len(ext)]
            out.append(base)
            break
    stem, ext = os.path.splitext(base)
    if stem and 1 < len(ext) <= 6 and ext[1:].isalnum() and not ext[1:].isdigit():
        out.append(stem)
    return out


def _tree(parts: list[str]) -> str:
    """The top-level folder (or a URI's bucket) of a path's components."""
    return parts[1] if not parts[0] and len(parts) > 1 else parts[0]


def _archive_roots(components: list[list[str]]) -> dict[str, int]:
    """Per top-level folder or bucket: how many leading components its archive root has (see Redactor.learn)."""
    trees: dict[str, list[list[str]]] = {}
    for parts in components:
        trees.setdefault(_tree(parts), []).append(parts)
    roots = {}
    for tree, members in trees.items():
        first, shared = members[0], 0
        while shared < len(first) and all(len(c) > shared and c[shared] == first[shared] for c in members):
            shared += 1
        roots[tree] = max(0, min(shared, min(len(c) for c in members) - 2))
    return roots


def _stands_alone(name: str) -> bool:
    """Whether a file or folder name is redacted where it stands alone in a sentence, not only inside a path:
    long enough, and not a plain word (``DICOM``, ``series``) that the sentences of the job's messages use."""
    return len(name) >= MIN_NAME_CHARS and not name.isalpha()


class Redactor:
    """Keyed tokens for scan_ids, paths and names, and free text with them replaced (see the module).

    Args:
        key: str or bytes. The HMAC key: at least :data:`MIN_KEY_CHARS` characters, the same every night.

    Example:

    >>> r = Redactor("0123456789abcdef0123456789abcdef")
    >>> r.scan_id("DOE^JANE_19570312-ct")
    'scan-f9f4781ec8399ae1'
    >>> r.learn(["DOE^JANE_19570312-ct"], ["/export/DOE^JANE_19570312/ct.nii.gz"])
    >>> r.text("/export/DOE^JANE_19570312/ct.nii.gz: not a NIfTI file")
    'path-0145da3b12da1478: not a NIfTI file'
    """

    def __init__(self, key: str | bytes) -> None:
        self._key = key.encode() if isinstance(key, str) else bytes(key)
        if len(self._key) < MIN_KEY_CHARS:
            raise JobError(f"the --redact-paths key (${KEY_ENV}) must have at least {MIN_KEY_CHARS} characters")
        self._paths: set[str] = set()  # canonical paths of the scans and of their folders below the archive root
        self._scans: set[str] = set()  # scan_ids, redacted wherever they stand (MIN_NAME_CHARS and longer)
        self._names: set[str] = set()  # names below the archive root that are redacted where they stand alone
        self._parts: set[str] = set()  # every name below the archive root: redacted inside a path
        self._buckets: set[str] = set()  # an object key in a message may come without its bucket
        self._phrases: dict[str, list[tuple[int, str, str]]] = {}  # first word -> (offset, text, token)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Redactor:
        """The redactor of the key in ``$VIT3D_REDACT_KEY``; JobError (exit 2) when it is missing or short."""
        key = (os.environ if environ is None else environ).get(KEY_ENV, "")
        if not key:
            raise JobError(
                f"--redact-paths needs its key in ${KEY_ENV} (a secret of at least {MIN_KEY_CHARS} characters, "
                "e.g. from `openssl rand -hex 32`, kept in a secret store): it is not set. The key must be the same "
                "every night, since a scan keeps its token only under the same key; a random one is never made up"
            )
        if len(key) < MIN_KEY_CHARS:
            raise JobError(f"${KEY_ENV} must have at least {MIN_KEY_CHARS} characters (it has {len(key)})")
        return cls(key)

    # --- tokens ------------------------------------------------------------------------------------------------

    def token(self, value: str, kind: str) -> str:
        """``kind-`` and the first 16 hex digits of HMAC-SHA256(key, value as UTF-8)."""
        digest = hmac.new(self._key, value.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()
        return f"{kind}-{digest[:TOKEN_HEX]}"

    def scan_id(self, scan_id: str) -> str:
        """The token of a scan_id: ``scan-…``."""
        return self.token(str(scan_id), "scan")

    def path(self, path: str) -> str:
        """The token of a path or URI: ``path-…`` of its :func:`canonical_path`."""
        return self.token(canonical_path(str(path)), "path")

    @property
    def key_id(self) -> str:
        """8 hex digits that tell keys apart (an HMAC of a fixed text, so it says nothing about the key)."""
        return self.token("vit3d-batch redaction key id", "key")[4:12]

    def describe(self) -> dict[str, str]:
        """What the run report records of the redaction (``redaction``): the method and the key's id."""
        return {
            "method": f"HMAC-SHA256, first {TOKEN_HEX} hex digits",
            "key_env": KEY_ENV,
            "key_id": self.key_id,
        }

    # --- learning what to redact -------------------------------------------------------------------------------

    def learn(self, scan_ids: Iterable[str], paths: Iterable[str]) -> None:
        """Remember the scans (scan_id and path pairs) whose ids, paths, folders and names :meth:`text` redacts.

        The archive root and the folders above it stay readable: per top-level folder or bucket, the deepest
        folder its scans share that is at least two levels above each of them (``/export`` for
        ``/export/<patient>/<file>``), so that the output and the model, kept beside the archive, stay readable.
        """
        pairs = [(str(s), str(p)) for s, p in zip(scan_ids, paths, strict=True)]
        canonical = [canonical_path(p) for _, p in pairs]
        components = [c.split("/") for c in canonical]
        roots = _archive_roots(components)
        for (scan_id, raw), path, parts in zip(pairs, canonical, components, strict=True):
            root = roots[_tree(parts)]
            if len(scan_id) >= MIN_NAME_CHARS:
                self._scans.add(scan_id)
                self._phrase(scan_id, "scan")
            uri = bool(_SCHEME.match(raw))
            if uri and len(parts) > 1:
                self._buckets.add(parts[0])
            self._paths.add(path)
            self._phrase(path, "path")
            if uri and len(parts) > 1:
                self._phrase("/".join(parts[1:]), "path", path)  # an object key without its bucket
            for depth in range(max(root, 1) + 1, len(parts)):  # parent folders below the root
                folder = "/".join(parts[:depth])
                if folder not in self._paths:
                    self._paths.add(folder)
                    self._phrase(folder, "path")
            for candidate in {*parts[root:], *_stems(parts[-1])}:  # folder and file names below the root
                if len(candidate) >= MIN_PART_CHARS:
                    self._parts.add(candidate)
                if _stands_alone(candidate) and candidate not in self._names:
                    self._names.add(candidate)
                    self._phrase(candidate, "name")
        for entries in self._phrases.values():
            entries.sort(key=lambda entry: -len(entry[1]))

    def _phrase(self, text: str, kind: str, value: str | None = None) -> None:
        """A value with a space, quote or other word delimiter in it is also matched as a whole string (its token
        is of ``value``, default ``text``)."""
        if not _HAS_DELIMITER.search(text):
            return
        first = _WORD.search(text)
        if first is None:
            return
        entry = (first.start(), text, self.token(text if value is None else value, kind))
        entries = self._phrases.setdefault(first.group(), [])
        if entry not in entries:
            entries.append(entry)

    # --- free text ---------------------------------------------------------------------------------------------

    def text(self, text: str) -> str:
        """``text`` with every learned scan_id, path, folder and name replaced by its token (see the module)."""
        if not text or not (self._paths or self._scans):
            return text
        if self._phrases:
            text = self._replace_phrases(text)
        return _WORD.sub(self._word, text)

    def _replace_phrases(self, text: str) -> str:
        out, position = [], 0
        for match in _WORD.finditer(text):
            if match.start() < position:
                continue
            for offset, phrase, token in self._phrases.get(match.group(), ()):
                start, end = match.start() - offset, match.start() - offset + len(phrase)
                if start < position or not text.startswith(phrase, start):
                    continue
                if (start and text[start - 1].isalnum()) or (end < len(text) and text[end].isalnum()):
                    continue  # part of a longer word
                out += [text[position:start], token]
                position = end
                break
        return "".join(out) + text[position:] if out else text

    def _word(self, match: re.Match[str]) -> str:
        word = match.group()
        core = word.rstrip(".:")
        if not core:
            return word
        new = self._lookup(core)
        return word if new is None else new + word[len(core) :]

    def _known_path(self, form: str) -> str | None:
        if form in self._paths:
            return form
        for bucket in self._buckets:  # an object key as S3 errors name it, without its bucket
            if f"{bucket}/{form}" in self._paths:
                return f"{bucket}/{form}"
        return None

    def _lookup(self, core: str) -> str | None:
        """The replacement of one word, or None when nothing in it is known."""
        if core in self._scans:
            return self.scan_id(core)
        forms = [canonical_path(core)]
        if "%" in forms[0]:
            forms.append(unquote(forms[0]))
        for form in forms:
            path = self._known_path(form)
            if path is not None:
                return self.token(path, "path")
            if form in self._names:
                return self.token(form, "name")
        form = forms[-1]
        if not _SEPARATOR.search(form):
            return None
        pieces = _SEPARATOR.split(form)  # name, separator, name, …
        for end in range(len(pieces) - 2, 0, -2):  # the longest known path before a separator
            path = self._known_path("".join(pieces[:end]))
            if path is not None:
                return self.token(path, "path") + self._names_in(pieces[end:])
        new = self._names_in(pieces)
        return new if new != form else None

    def _names_in(self, pieces: list[str]) -> str:
        """Separators kept; each known name (a folder, a file, a scan_id) replaced by its token."""
        out = []
        for piece in pieces:
            if piece in self._scans:
                out.append(self.scan_id(piece))
            elif piece in self._parts:
                out.append(self.token(piece, "name"))
            else:
                out.append(piece)
        return "".join(out)


# --- one scrub for every line a command line prints --------------------------------------------------------------

_ACTIVE: list[Redactor] = []


@contextlib.contextmanager
def active(redactor: Redactor | None) -> Iterator[None]:
    """Inside the block, :func:`scrub` also redacts PHI with ``redactor`` (None: credentials only)."""
    if redactor is None:
        yield
        return
    _ACTIVE.append(redactor)
    try:
        yield
    finally:
        _ACTIVE.remove(redactor)


def scrub(text: str) -> str:
    """What every console line and the run report go through: credentials out (:func:`scrub_secrets`), then, while
    a :class:`Redactor` is :func:`active`, its tokens in (:meth:`Redactor.text`)."""
    text = scrub_secrets(text)
    return _ACTIVE[-1].text(text) if _ACTIVE else text


def scrub_data(value: Any) -> Any:
    """``value`` (JSON-like: dicts, lists, strings, numbers) with every string, keys included, through
    :func:`scrub`."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, Mapping):
        return {scrub(k) if isinstance(k, str) else k: scrub_data(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub_data(v) for v in value]
    return value


class ScrubFilter(logging.Filter):
    """A handler filter that passes every record's message, exception and stack through :func:`scrub`, whatever
    the handler's format (text, JSON, Ray's)."""

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: the handler reports it as it always did
            return True
        clean = scrub(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        return True

    @classmethod
    def add_to(cls, handler: logging.Handler) -> None:
        """Add one to ``handler`` unless it has one."""
        if not any(isinstance(f, cls) for f in handler.filters):
            handler.addFilter(cls())
