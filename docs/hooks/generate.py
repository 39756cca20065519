"""MkDocs hook: reference tables generated from the code, so the docs cannot drift from it.

A page asks for a table with a placeholder on a line of its own; ``on_page_markdown`` replaces it before the
Markdown is rendered:

``<!-- generated: MODULE cli -->``
    The options of ``python -m MODULE``: one row per argparse action (flag, default, choices, help with
    ``%(default)s`` expanded), read from the command's own parser. For each module of ``CLI_MODULES[MODULE]``
    (default: MODULE itself) the parser is found by calling its ``build_parser()``, ``_parser()`` or
    ``parser()``, else by calling its ``main([])`` with ``ArgumentParser.parse_args`` replaced by a trap that
    hands back the parser before anything runs. Subcommands (``python -m vit3d inspect``) get a table each.

``<!-- generated: input formats -->``
    One row per registered input format (``jobs.inputs.formats.registered()``): its name, what it reads (its
    class docstring), how ``jobs.manifest`` lists it, the manifest columns it reads and its own result columns.

``<!-- generated: output schema -->``
    One table per pyarrow schema of the output (column, Arrow type, description), from
    ``jobs.output.schema`` (or, before that module existed, ``jobs.sink``). A column's description is its field
    metadata ``b"doc"``, else the entry for it in ``DESCRIPTIONS`` below. A schema whose columns are all in
    other schemas of the module (a concatenation such as ``PROVENANCE_SCHEMA``) is not repeated.
    ``<!-- generated: output schema NAME -->`` renders the one schema ``NAME``.

Nothing here imports TensorFlow, Keras, Ray, torch or MONAI: while a module is imported for the docs, those
imports are refused. ``jobs.score`` imports Ray at its top, so while it does its options come from
``CLI_FALLBACKS``: ``jobs.config.build_parser()`` if that exists, else ``jobs.config.parser()`` (the same
``JobConfig`` fields ``jobs.score.build_parser()`` turns into flags).

An unknown placeholder, a CLI whose parser cannot be found or a column without a description fails the build
(``mkdocs build --strict`` turns the warnings into errors).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.abc
import logging
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, NoReturn

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import Files
from mkdocs.structure.pages import Page

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger("mkdocs.hooks.generate")

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("ray", "tensorflow", "keras", "torch", "monai", "jax", "tf_keras")
PLACEHOLDER = re.compile(r"^[ \t]*<!--\s*generated:\s*(?P<what>[^>]*?)\s*-->[ \t]*$", re.MULTILINE)

# Where each documented command lives; the first module that imports (without the heavy libraries) and yields a
# parser wins. `python -m vit3d` runs vit3d/__main__.py.
CLI_MODULES = {
    "jobs.score": ["jobs.score"],
    "jobs.manifest": ["jobs.manifest", "jobs.inputs.listing"],
    "jobs.report": ["jobs.report", "jobs.report.cli", "jobs.report.page"],
    "jobs.compact": ["jobs.compact"],
    "jobs.heatmap": ["jobs.heatmap"],
    "jobs.demo": ["jobs.demo"],
    "vit3d": ["vit3d.__main__"],
    "vit3d.convert": ["vit3d.convert"],
}
# Used when none of the modules above can be imported without Ray: jobs.score's flags are JobConfig's fields.
CLI_FALLBACKS = {
    "jobs.score": [("jobs.config", "build_parser", {}), ("jobs.config", "parser", {"prog": "python -m jobs.score"})],
}
PARSER_FUNCTIONS = ("build_parser", "_parser", "parser")

SCHEMA_MODULES = ["jobs.output.schema", "jobs.output.sink", "jobs.sink"]
# The order of the tables: a results row's columns in file order, then the errors; other schemas after these.
SCHEMA_ORDER = [
    "KEY_SCHEMA",
    "SCORE_SCHEMA",
    "EMBED_SCHEMA",
    "WINDOW_SCHEMA",
    "DECODE_PROVENANCE",
    "FORMAT_PROVENANCE",
    "DICOM_PROVENANCE",
    "NRRD_PROVENANCE",
    "SCORING_PROVENANCE",
    "ERROR_SCHEMA",
    "WRITEBACK_SCHEMA",
]

# Used only while the schema module's fields carry no b"doc" metadata. Keyed by column, or by (schema, column)
# where one name means something else in another schema.
DESCRIPTIONS = {
    "scan_id": "the manifest's `scan_id` (unique, non-empty)",
    "path": "the scan's resolved location: an absolute path or a URI, not the manifest's relative text",
    "model_sha256": "sha256 of the model artifact; with `scan_id` the key of exactly-once",
    "run_id": "the run that wrote the row",
    "scored_at": "when the scan was scored (UTC)",
    "score": 'anomaly score in [0, 1]: with one class the sigmoid; with two or more, 1 − softmax p(class 0, "normal")',
    "probabilities": "the softmax (or, with one class, sigmoid) of the model's logits",
    "embedding": "`model.embed(x)`: the class token, or the mean patch token without classification; written "
    "`hidden_size` wide (`fixed_size_list<float>[hidden_size]`)",
    "original_shape": "the 3 spatial axes as stored in the source file",
    "voxel_spacing": "voxel size in mm along the 3 spatial axes, as stored",
    "orientation": 'axis codes as stored, e.g. "LPS"',
    "source_dtype": "the voxel type in the source file, e.g. int16",
    "read_s": "seconds to fetch the scan's bytes (mostly waiting on storage)",
    "decode_s": "seconds to check the header and decode (inflate, map) the voxels",
    "preprocess_s": "seconds to reorient, resample, resize and normalize",
    "infer_s": "this scan's share of its batch's inference time on the scoring device",
    "device": "where the scan was scored: `cpu`, or `gpu:N`",
    "worker_pid": "process id of the scoring actor",
    "series_instance_uid": "DICOM SeriesInstanceUID: the manifest's value when it has one (it chose the series), "
    "else the one read; null on other formats",
    "study_instance_uid": "DICOM StudyInstanceUID; null on other formats",
    "modality": "DICOM Modality (CT, MR, …); null on other formats",
    "transfer_syntax": "DICOM transfer syntax UID; several comma-separated if the files differ; null on other formats",
    "slices": "DICOM frames in the volume (scouts left out); null on other formats",
    "series_note": "what was left out of the DICOM series (e.g. a localizer), else null",
    ("ERROR_SCHEMA", "run_id"): "the run whose attempt failed",
    ("ERROR_SCHEMA", "model_sha256"): "sha256 of the model the attempt was for",
    "stage": "where it failed: read, read-transient, validate, decode, preprocess or infer",
    "error": "the reason, naming the file",
    "failed_at": "when the attempt failed (UTC)",
    "permanent": "true: a verdict on the file's bytes (validate, decode or preprocess), not retried while the file "
    "is unchanged; false: storage, a worker's death, inference or an unforeseen error",
    "source_size": "the file's size in bytes, stat'ed just before it was read (null: it could not be stat'ed)",
    "source_mtime": "the file's modification time (UTC), stat'ed just before it was read (null: it could not be "
    "stat'ed)",
}
SCHEMA_INTROS = {
    "KEY_SCHEMA": "The first columns of every results row.",
    "SCORE_SCHEMA": "`--mode score`: after the key and the manifest's own columns.",
    "EMBED_SCHEMA": "`--mode embed`, instead of the score columns.",
    "DECODE_PROVENANCE": "Measured by the CPU decode task, for every input format.",
    "DICOM_PROVENANCE": "DICOM rows; null on rows of other formats. A manifest may carry these columns too "
    "(`jobs.manifest --dicom` writes them): they are merged, not refused as a clash.",
    "NRRD_PROVENANCE": "NRRD rows; null on rows of other formats.",
    "FORMAT_PROVENANCE": "Every input format's own columns, declared by the format (see "
    "[Input formats](input-formats.md)); a row fills those of its own format, the others are null.",
    "SCORING_PROVENANCE": "Filled by the scoring actor.",
    "ERROR_SCHEMA": "Every row of `errors/`: one per failed attempt.",
    "WRITEBACK_SCHEMA": "`--write-back`: every row of `writeback/`, one per report a run stored in the PACS "
    "(see [Return results to the PACS](../how-to/pacs.md)).",
}


# --- importing without the heavy libraries ---------------------------------------------------------------------


class _RefuseHeavy(importlib.abc.MetaPathFinder):
    def find_spec(
        self, name: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if name.partition(".")[0] in HEAVY:
            raise ImportError(f"{name} is not imported while building the docs")
        return None


@contextlib.contextmanager
def _light() -> Iterator[None]:
    """Imports of the heavy libraries fail inside (Python drops a module whose import failed)."""
    finder = _RefuseHeavy()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)


def _import(name: str) -> tuple[ModuleType | None, str | None]:
    """The module, or None and why not."""
    try:
        with _light():
            return importlib.import_module(name), None
    except (ImportError, SystemExit) as e:
        return None, f"{name}: {e}"


# --- command lines ---------------------------------------------------------------------------------------------


class _Caught(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__("parser caught")
        self.parser = parser


def _parser_from_main(main: Callable[..., Any]) -> argparse.ArgumentParser | None:
    """The parser ``main`` builds, caught at its ``parse_args`` call before anything runs."""

    def trap(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> NoReturn:
        raise _Caught(self)

    saved = {name: getattr(argparse.ArgumentParser, name) for name in ("parse_args", "parse_known_args")}
    for name in saved:
        setattr(argparse.ArgumentParser, name, trap)
    try:
        with _light():
            main([])
    except _Caught as caught:
        return caught.parser
    except (Exception, SystemExit):
        return None
    finally:
        for name, method in saved.items():
            setattr(argparse.ArgumentParser, name, method)
    return None


def _parser_of(module: ModuleType) -> argparse.ArgumentParser | None:
    for name in PARSER_FUNCTIONS:
        function = getattr(module, name, None)
        if callable(function):
            try:
                with _light():
                    parser = function()
            except (TypeError, ImportError):
                continue
            if isinstance(parser, argparse.ArgumentParser):
                return parser
    main = getattr(module, "main", None)
    return _parser_from_main(main) if callable(main) else None


def find_parser(command: str) -> argparse.ArgumentParser:
    reasons: list[str] = []
    for name in CLI_MODULES.get(command, [command]):
        module, why = _import(name)
        if module is None:
            reasons.append(why or name)
            continue
        parser = _parser_of(module)
        if parser is not None:
            return parser
        reasons.append(f"{name}: no build_parser(), _parser(), parser() or main(argv) building an ArgumentParser")
    for name, function, kwargs in CLI_FALLBACKS.get(command, []):
        module, why = _import(name)
        if module is not None and callable(getattr(module, function, None)):
            with _light():
                return getattr(module, function)(**kwargs)
        reasons.append(why or f"{name}: no {function}()")
    raise PluginError(f"generated CLI reference: no parser found for {command!r} ({'; '.join(reasons)})")


_CODE = re.compile(r"``(.+?)``|:[a-z]+:`~?([^`]+)`|`([^`]+)`")


def text_md(text: object, table: bool = True) -> str:
    """Plain text (a help string, a docstring's line, a column's doc) as Markdown that renders as written.

    Code (RST ````x````, ``:role:`x```, Markdown ```x```) becomes a code span; elsewhere nothing is taken for markup
    or HTML (``*``, ``<run_id>``), and in a table cell ``|`` does not end the cell.
    """
    text = re.sub(r"\s+", " ", str(text)).strip()
    out, last = [], 0
    for m in _CODE.finditer(text):
        out += [_plain(text[last : m.start()], table), _code(m.group(1) or m.group(2) or m.group(3), table)]
        last = m.end()
    out.append(_plain(text[last:], table))
    return "".join(out)


def _plain(text: str, table: bool) -> str:
    for char, escaped in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ("*", "\\*"), ("_", "\\_")):
        text = text.replace(char, escaped)
    return text.replace("|", "\\|") if table else text


def _code(text: object, table: bool = True) -> str:
    text = str(text).replace("|", "\\|") if table else str(text)
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    if not action.help:
        return ""
    try:
        return parser._get_formatter()._expand_help(action)
    except (KeyError, TypeError, ValueError):
        return action.help


def _invocation(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    try:
        return parser._get_formatter()._format_action_invocation(action)
    except Exception:
        return ", ".join(action.option_strings) or action.dest


def _default(action: argparse.Action) -> str:
    if not action.option_strings:
        return "required" if action.nargs in (None, 1, "+") else "optional"
    if action.required:
        return "required"
    if action.nargs == 0:
        return "off"
    if action.default is None or action.default is argparse.SUPPRESS:
        return "none"
    return _code(action.default)


def cli_table(parser: argparse.ArgumentParser) -> str:
    rows: list[str] = []
    subcommands: list[tuple[str, argparse.ArgumentParser]] = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)) or action.help == argparse.SUPPRESS:
            continue
        if isinstance(action, argparse._SubParsersAction):
            subcommands.extend(action.choices.items())
            continue
        choices = ", ".join(_code(c) for c in action.choices) if action.choices else ""
        flag, default, description = (
            _code(_invocation(parser, action)),
            _default(action),
            text_md(_help(parser, action)),
        )
        rows.append(f"| {flag} | {default} | {choices} | {description} |")
    lines = [text_md(parser.description, table=False), ""] if parser.description else []
    if rows:
        lines += ["| option | default | choices | description |", "|---|---|---|---|", *rows, ""]
    for name, sub in subcommands:
        lines += [f"**`{parser.prog} {name}`**", "", cli_table(sub), ""]
    if parser.epilog:
        lines += [text_md(parser.epilog, table=False), ""]
    return "\n".join(lines).rstrip() + "\n"


# --- output schema ---------------------------------------------------------------------------------------------


def _schema_module() -> ModuleType:
    import pyarrow as pa  # noqa: F401  (the schemas are pyarrow objects)

    reasons = []
    for name in SCHEMA_MODULES:
        module, why = _import(name)
        if module is not None and hasattr(module, "KEY_SCHEMA"):
            return module
        reasons.append(why or f"{name}: no KEY_SCHEMA")
    raise PluginError(f"generated output schema: no schema module ({'; '.join(reasons)})")


def schemas() -> tuple[str, list[tuple[str, pa.Schema]]]:
    """(name, schema) of every module-level schema of the output, concatenations left out, in definition order."""
    import pyarrow as pa

    module = _schema_module()
    found = [(name, value) for name, value in vars(module).items() if isinstance(value, pa.Schema)]
    kept = []
    for name, schema in found:
        columns = set(schema.names)
        parts = [set(s.names) for n, s in found if n != name and set(s.names) < columns]
        if parts and set().union(*parts) == columns:
            continue
        kept.append((name, schema))
    rank = {name: i for i, name in enumerate(SCHEMA_ORDER)}
    kept.sort(key=lambda item: rank.get(item[0], len(rank)))  # stable: the rest keep the module's order
    return module.__name__, kept


def _doc(metadata: dict[bytes, bytes] | None) -> str | None:
    """A field's or schema's ``b"doc"`` metadata as Markdown, or None."""
    if not metadata or b"doc" not in metadata:
        return None
    return text_md(metadata[b"doc"].decode())


def schema_table(name: str, schema: pa.Schema) -> str:
    intro = _doc(schema.metadata) or SCHEMA_INTROS.get(name, "")
    lines = [f"### `{name}`", ""]
    if intro:
        lines += [intro, ""]
    lines += ["| column | Arrow type | description |", "|---|---|---|"]
    for field in schema:
        doc = _doc(field.metadata) or DESCRIPTIONS.get((name, field.name)) or DESCRIPTIONS.get(field.name)
        if doc is None:
            log.warning(
                "generated output schema: column %r of %s has no description (field metadata b'doc')", field.name, name
            )
            doc = ""
        lines.append(f"| `{field.name}` | {_code(field.type)} | {doc} |")
    return "\n".join(lines) + "\n"


def schema_section(wanted: str | None = None) -> str:
    module, kept = schemas()
    if wanted:
        by_name = dict(kept)
        if wanted not in by_name:
            raise PluginError(f"generated output schema: {module} has no schema {wanted!r} ({', '.join(by_name)})")
        return schema_table(wanted, by_name[wanted])
    tables = [schema_table(name, schema) for name, schema in kept]
    return f"*Generated from `{module}`.*\n\n" + "\n".join(tables)


# --- input formats ---------------------------------------------------------------------------------------------


def formats_table() -> str:
    """One row per registered input format, from its declaration (jobs.inputs.formats.base.Format)."""
    module, why = _import("jobs.inputs.formats")
    if module is None or not callable(getattr(module, "registered", None)):
        raise PluginError(f"generated input formats: no format registry ({why or 'no registered()'})")
    with _light():
        registered = module.registered()
    lines = [
        "| format | reads | listing (`jobs.manifest`) | manifest columns it reads | its own result columns |",
        "|---|---|---|---|---|",
    ]
    for fmt in registered:
        doc = (type(fmt).__doc__ or "").strip().split("\n\n")[0]
        flag = getattr(fmt, "listing_flag", None)
        globs = getattr(fmt, "default_globs", ()) or ()
        listing = _code(flag) if flag else "default"
        if globs:
            listing += ": " + ", ".join(_code(g) for g in globs)
        manifest = getattr(fmt, "manifest_columns", None)
        options = set(getattr(fmt, "options", ()) or ())
        manifest_cells = [_code(f.name) + (" (chooses)" if f.name in options else "") for f in manifest or []]
        manifest_cells += [
            _code(name) + " (chooses)" for name in sorted(options - set(manifest.names if manifest else []))
        ]
        provenance = getattr(fmt, "provenance", None)
        lines.append(
            f"| {_code(getattr(fmt, 'name', type(fmt).__name__))} | {text_md(doc)} | {listing} "
            f"| {', '.join(manifest_cells) or '—'} | {', '.join(_code(f.name) for f in provenance or []) or '—'} |"
        )
    return "\n".join(lines) + "\n"


# --- the hook --------------------------------------------------------------------------------------------------


_cache: dict[str, str] = {}


def render(what: str) -> str:
    if what not in _cache:
        words = what.split()
        if len(words) == 2 and words[1] == "cli":
            _cache[what] = cli_table(find_parser(words[0]))
        elif words == ["input", "formats"]:
            _cache[what] = formats_table()
        elif words[:2] == ["output", "schema"] and len(words) <= 3:
            _cache[what] = schema_section(words[2] if len(words) == 3 else None)
        else:
            raise PluginError(f"unknown placeholder <!-- generated: {what} -->")
    return _cache[what]


def on_config(config: MkDocsConfig) -> MkDocsConfig:
    root = str(Path(config.config_file_path).resolve().parent) if config.config_file_path else str(ROOT)
    if root not in sys.path[:1]:
        sys.path.insert(0, root)
    _cache.clear()
    return config


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    return PLACEHOLDER.sub(lambda m: render(m.group("what")), markdown)
