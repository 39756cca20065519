"""Every option of ``jobs.score``, defined once: its type, default, validation and ``--help`` text.

``JobConfig`` is what the driver passes around; ``jobs.score``'s argparse parser is generated from its
fields, so a flag, its default and its help can never drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from typing import Any

from jobs import dicomweb
from jobs.errors import JobError, JobFailed
from jobs.inputs.formats.base import MAX_SCAN_BYTES
from jobs.inputs.windows import AGGREGATES
from jobs.run.precision import PRECISIONS

__all__ = ["JobConfig", "JobError", "JobFailed", "build_parser", "parser"]

MODES = ("score", "embed")
DEVICES = ("auto", "gpu", "cpu")
LOG_FORMATS = ("text", "json")
DICOM_TILT = ("correct", "refuse")
RUN_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    flag: bool | str | tuple[str, ...] = True,
    format_option: bool = False,
    **argparse_kwargs: Any,
) -> Any:
    """A JobConfig field; ``help`` and ``argparse_kwargs`` become its command-line flag: ``--<name>`` (True), the
    given flag name(s), or none (False). ``format_option``: the value reaches every scan's
    :meth:`jobs.inputs.formats.base.Format.check` in its ``options`` (see :attr:`JobConfig.format_options`)."""
    metadata = {"help": help, "flag": flag, "format_option": format_option, "argparse": argparse_kwargs}
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class JobConfig:
    """One scoring run's options; constructing it validates them (``JobError`` with a short message).

    Args:
        manifest: str. Manifest (CSV, Parquet or JSON Lines) listing ``scan_id`` and ``path``; local path or URI.
        model: str. The ``.keras`` artifact written by ``vit3d.save``; local path or URI.
        output: str. Output folder or prefix; ``results/``, ``errors/`` and ``runs/`` go under it.
        mode: str. ``"score"`` (anomaly score + class probabilities) or ``"embed"`` (one vector per scan).
            Defaults to ``"score"``.
        batch_size: int. Scans per inference call. Defaults to ``8``.
        device: str. ``"gpu"``, ``"cpu"`` or ``"auto"``. Defaults to ``"auto"``.
        workers: int or None. Scoring actors. Defaults to ``None`` (one per GPU; on CPU, 1 locally, else CPUs/4).
        max_error_rate: float. Largest failed fraction of the attempted scans that still exits 0. Defaults to
            ``0.01``.
        retry_failed: bool. Also retry known-bad scans (last error at validate, decode or preprocess, file
            unchanged since), which are otherwise skipped. Defaults to ``False``.
        rescore_changed: bool. Score a done scan again when its source changed since its latest result row
            (:mod:`jobs.run.plan`). Defaults to ``True``.
        run_id: str or None. The run's name in results and ``runs/``. Defaults to ``None`` (time + random).
        model_sha256: str or None. Refuse the model unless its sha256 is this. Defaults to ``None``.
        ray_address: str or None. Ray cluster to join. Defaults to ``None`` ($RAY_ADDRESS, else a local instance).
        wait_for_gpus: float. Seconds to wait for the autoscaler's GPUs with ``device="gpu"``. Defaults to ``0.0``.
        rows_per_file: int. Rows gathered into one Parquet file. Defaults to ``50_000``.
        flush_seconds: float. A file is also committed this often. Defaults to ``300.0``.
        storage_retry_s: float. How long one scan read or one file commit retries transient storage errors
            (unreachable, reset, timeout, 5xx) before giving up. Defaults to ``60.0``.
        stall_timeout_s: float. Stop the run (exit 1, scored scans committed) when no scan has been scored for
            this many seconds; 0 waits forever. Defaults to ``1800.0``.
        settle_s: float. Defer (neither score nor fail) a scan any of whose files was modified less than this many
            seconds before the run started: a series still arriving. 0 is off. Defaults to ``0.0``.
        precision: str. ``"auto"`` (each scoring actor: ``"mixed_bfloat16"`` where its CPU or GPU computes
            bfloat16 natively, else ``"float32"``; :mod:`jobs.run.precision`), ``"float32"`` or
            ``"mixed_bfloat16"``. Defaults to ``"auto"``.
        xla: bool. Compile the scoring function with XLA (``jit_compile=True``). Defaults to ``False``.
        windows: bool. Score each scan as overlapping windows of the model's input size at the spacing its
            preprocessing spec names (MONAI's sliding-window placement), one result row per scan. Defaults to
            ``False``.
        window_overlap: float. Overlap of neighbouring windows, in [0, 1). Defaults to ``0.25``.
        window_aggregate: str. The scan's score from its windows': ``"max"``, ``"mean"`` or ``"top3"``. Defaults
            to ``"max"``.
        review: int. The report page's first section: the N highest-scoring scans of the run, with pictures
            (score mode); 0 leaves it out. Defaults to ``12``.
        write_back: str or None. A DICOMweb service root (``dicomweb+https://host/dicom-web``): each scored series
            that was read over DICOMweb gets a DICOM SR with its score stored there (``jobs.output.writeback``;
            score mode). Defaults to ``None``.
        write_back_min_score: float. With ``write_back``: only scans scoring this or more. Defaults to ``0.0``.
        progress: bool. Log progress while running. Defaults to ``True`` (``--quiet`` turns it off).
        progress_every_s: float. Off a terminal, seconds between two progress lines (on a terminal a live bar
            is drawn instead). Defaults to ``10.0``.
        log_format: str. ``"text"`` or ``"json"`` log lines (command line only). Defaults to ``"text"``.
        verbose: bool. Also show Ray's and TensorFlow's own INFO lines (command line only). Defaults to ``False``.
        redact_paths: bool. Scan_ids and paths in the page, the run report, the summary and the logs as keyed
            tokens (:mod:`jobs.redact`; key in ``$VIT3D_REDACT_KEY``, JobError without it). Defaults to ``False``.
        dicom_tilt: str. A gantry-tilted (sheared) DICOM series: ``"correct"`` resamples it onto an orthogonal grid
            (and says so in ``series_note``), ``"refuse"`` makes it a validate error. Defaults to ``"correct"``.
        max_scan_bytes: int. The most bytes one scan's source may be read or inflated to, checked before it is
            read (zip members and deflated DICOM datasets are also held to what their headers promise).
            Defaults to 4 GiB.

    Example:

    >>> config = JobConfig("manifest.csv", "model.keras", "out/", device="cpu", batch_size=4)
    >>> config.batch_size
    4
    """

    manifest: str = option(
        help="CSV, Parquet or JSON Lines with scan_id and path columns (local path or URI: s3://, gs://, "
        "file://); other columns are carried into the results",
        required=True,
    )
    model: str = option(help="the .keras artifact written by vit3d.save (local path or URI)", required=True)
    output: str = option(help="output folder or prefix: results/, errors/, runs/ go under it", required=True)
    mode: str = option(
        "score",
        choices=MODES,
        help="score: anomaly score in [0, 1] and class probabilities; embed: one vector per scan",
    )
    batch_size: int = option(8, type=int, help="scans per inference call (fixed; last batch padded)")
    device: str = option(
        "auto",
        choices=DEVICES,
        help="gpu: one scoring actor per GPU; cpu: CPU scoring actors; auto: gpu if the cluster has GPUs",
    )
    workers: int | None = option(
        None, type=int, help="scoring actors (default: one per GPU; on CPU, 1 on a local instance, else CPUs/4)"
    )
    max_error_rate: float = option(
        0.01,
        type=float,
        help="largest fraction of failed scans that still exits 0 (default %(default)s); above it, exit 3. "
        "The fraction is of the scans attempted: scans skipped as done or known bad do not count",
    )
    retry_failed: bool = option(
        False,
        action="store_true",
        help="also retry known-bad scans. Without it, a scan whose last error was at validate, decode or "
        "preprocess is skipped (counted as skipped_known_bad) while its file is unchanged: same path, size "
        "and mtime. Failures at read (missing file, storage), at infer or by a worker's death are always retried",
    )
    rescore_changed: bool = option(
        True,
        flag="--no-rescore-changed",
        action="store_false",
        help="do not score a done scan again when its source changed since it was scored (default: score it "
        "again, counted as rescored_changed, when the manifest's size_bytes and modified_at, or a stat without "
        "them, differ from the fingerprint its latest result row recorded; the old row stays for history)",
    )
    run_id: str | None = option(None, help="name of this run in the results and runs/ (default: time + random)")
    model_sha256: str | None = option(None, help="refuse the model unless its sha256 is this")
    ray_address: str | None = option(
        None, help="Ray cluster to join (default: $RAY_ADDRESS, else a new local Ray instance)"
    )
    wait_for_gpus: float = option(
        0.0,
        type=float,
        metavar="SECONDS",
        help="with --device gpu: ask the autoscaler for the GPUs and wait up to SECONDS for them "
        "(default 0: use the GPUs present now)",
    )
    rows_per_file: int = option(
        50_000,
        type=int,
        help="rows gathered into one Parquet file before it is committed (default %(default)s; a file is "
        "also committed every 5 minutes, so a killed run loses little)",
    )
    flush_seconds: float = option(300.0, flag=False, help="a file is committed at least this often")
    storage_retry_s: float = option(
        60.0,
        type=float,
        metavar="SECONDS",
        help="retry each scan read and each output write for up to SECONDS while storage is unreachable "
        "(connection refused/reset, timeouts, 5xx) before giving up (default %(default)s); then the run "
        "exits 1 with what was scored committed, and a rerun resumes",
    )
    stall_timeout_s: float = option(
        1800.0,
        type=float,
        metavar="SECONDS",
        help="stop with exit 1 (what was scored is committed) when no scan has been scored for SECONDS, e.g. "
        "a cluster that lost a node and has no CPU left to decode; 0 waits forever (default %(default)s, which "
        "includes the first result's wait for model loads)",
    )
    settle_s: float = option(
        0.0,
        type=float,
        metavar="SECONDS",
        help="defer to a later run any scan one of whose files was modified less than SECONDS before the run "
        "started, e.g. a DICOM series still arriving from the PACS (counted as deferred_unsettled; neither "
        "scored nor an error); 0 is off (default %(default)s)",
    )
    precision: str = option(
        "auto",
        choices=PRECISIONS,
        help="the scoring actors' compute precision: auto takes mixed_bfloat16 where the actor's CPU (avx512_bf16 "
        "or AMX) or GPU (compute capability 8.0 or later) computes bfloat16 natively, float32 elsewhere; the "
        "model is verified in float32 first either way. Each row records what scored it (precision) "
        "(default %(default)s)",
    )
    xla: bool = option(
        False,
        action="store_true",
        help="compile the scoring function with XLA (jit_compile). Off by default: on CPUs it measured no faster in "
        "float32 and slower in bfloat16 (docs/explanation/performance.md); its compile time adds to each actor's "
        "start-up. Unmeasured on GPUs",
    )
    windows: bool = option(
        False,
        action="store_true",
        help="score each scan as overlapping windows of the model's input size, cut at the voxel spacing the "
        "model's preprocessing spec names (placed as MONAI's sliding_window_inference places them), instead of "
        "resizing the scan to the input size; adds window_scores and where the highest window is. The model's "
        "spec must name a spacing",
    )
    window_overlap: float = option(
        0.25,
        type=float,
        metavar="FRACTION",
        help="with --windows: how much neighbouring windows overlap, in [0, 1) (default %(default)s, MONAI's overlap)",
    )
    window_aggregate: str = option(
        "max",
        choices=AGGREGATES,
        help="with --windows: a scan's score from its windows' scores: max (the most anomalous window), mean, or "
        "top3 (the mean of the three highest) (default %(default)s)",
    )
    review: int = option(
        12,
        type=int,
        metavar="N",
        help="the report page's first section: the N highest-scoring scans of the run, three slices through each "
        "one's highest window (or its centre) with the window scores overlaid (score mode; default %(default)s; "
        "0: none)",
    )
    write_back: str | None = option(
        None,
        metavar="URL",
        help="store each scored series read over DICOMweb back into the PACS at URL (its DICOMweb service root, "
        "dicomweb+https://host/dicom-web) as a DICOM Comprehensive 3D SR with its score (and, with --windows, a "
        "parametric map of the window scores), once per series, model and source version; credentials from "
        "VIT3D_DICOMWEB_TOKEN or VIT3D_DICOMWEB_USER/PASSWORD (score mode)",
    )
    write_back_min_score: float = option(
        0.0,
        type=float,
        metavar="S",
        help="with --write-back: only scans scoring S or more (default %(default)s: every scored series)",
    )
    progress: bool = option(
        True, help="no progress lines; warnings and errors only", flag="--quiet", action="store_false"
    )
    progress_every_s: float = option(
        10.0,
        type=float,
        metavar="SECONDS",
        flag="--progress-every",
        help="off a terminal (log files, ray job logs): a progress line (done/total, errors, rate, ETA) every "
        "SECONDS (default %(default)s); on a terminal a live bar shows the same figures",
    )
    log_format: str = option("text", choices=LOG_FORMATS, help="text: one line per event; json: one JSON object")
    verbose: bool = option(
        False,
        flag=("-v", "--verbose"),
        action="store_true",
        help="also show Ray's and TensorFlow's own start-up and INFO lines (hidden by default: a run shows its "
        "progress, summary and the warnings that need a person)",
    )
    redact_paths: bool = option(
        False,
        action="store_true",
        help="PHI in paths: every scan_id and path in the report page, the run report JSON, the summary and the "
        "logs (error messages included) becomes a keyed token, scan-/path-/name- + 16 hex digits of HMAC-SHA256 "
        "under the key in $VIT3D_REDACT_KEY (at least 16 characters, the same every night, so a scan keeps its "
        "token); without the key the run refuses to start (exit 2). results/ and errors/ keep the real values",
    )

    dicom_tilt: str = option(
        "correct",
        choices=DICOM_TILT,
        format_option=True,
        help="a gantry-tilted CT series (slices sheared along the table): correct resamples it onto an orthogonal "
        "grid, as dcm2niix's _Tilt_1 output, and says so in series_note; refuse makes it a validate error "
        "(default %(default)s)",
    )

    max_scan_bytes: int = option(
        MAX_SCAN_BYTES,
        type=lambda text: byte_count(text),
        metavar="BYTES",
        format_option=True,
        help="the most bytes one scan's source may be read or inflated to (a file, a series folder, a zip's "
        "members, a deflated DICOM dataset), checked before they are read; more is a validate error. "
        "Accepts 4GiB, 512MiB, 8G or a plain number of bytes (default 4GiB)",
    )

    def __post_init__(self) -> None:
        for name in ("manifest", "model", "output"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise JobError(f"--{name} must be a non-empty path or URI")
        choices = (
            ("mode", MODES),
            ("device", DEVICES),
            ("precision", PRECISIONS),
            ("dicom_tilt", DICOM_TILT),
            ("window_aggregate", AGGREGATES),
        )
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise JobError(f"--{flag_of(name)} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.log_format not in LOG_FORMATS:
            raise JobError(f"--log-format must be one of {', '.join(LOG_FORMATS)}, got {self.log_format!r}")
        if self.batch_size < 1 or self.rows_per_file < 1 or (self.workers is not None and self.workers < 1):
            raise JobError("--batch-size, --workers and --rows-per-file must be at least 1")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise JobError(f"--max-error-rate must be between 0 and 1, got {self.max_error_rate}")
        if self.wait_for_gpus < 0 or self.flush_seconds <= 0:
            raise JobError("--wait-for-gpus must be at least 0 (and flush_seconds above 0)")
        if not 0.0 <= self.window_overlap < 1.0:
            raise JobError(f"--window-overlap must be at least 0 and below 1, got {self.window_overlap}")
        if self.review < 0:
            raise JobError(f"--review must be at least 0, got {self.review}")
        if not self.progress_every_s > 0:
            raise JobError(f"--progress-every must be above 0 seconds, got {self.progress_every_s}")
        for name in ("storage_retry_s", "stall_timeout_s", "settle_s"):
            if not 0 <= getattr(self, name) < math.inf:
                raise JobError(f"--{flag_of(name)} must be at least 0 (and finite), got {getattr(self, name)}")
        if not isinstance(self.max_scan_bytes, int) or self.max_scan_bytes < 1024**2:
            raise JobError(f"--max-scan-bytes must be at least 1MiB, got {self.max_scan_bytes!r}")
        if self.write_back is not None:
            try:
                dicomweb.service_url(self.write_back)
            except ValueError as e:
                raise JobError(f"--write-back: {e}") from None
            if not dicomweb.is_dicomweb(self.write_back):
                raise JobError(
                    f"--write-back takes a dicomweb+https:// (or dicomweb+http://) URL, got {self.write_back}"
                )
            if self.mode != "score":
                raise JobError("--write-back stores scores: it needs --mode score")
        if not 0.0 <= self.write_back_min_score <= 1.0:
            raise JobError(f"--write-back-min-score must be between 0 and 1, got {self.write_back_min_score}")
        if self.run_id is not None and not RUN_ID.fullmatch(self.run_id):
            raise JobError(
                f"--run-id {self.run_id!r} must be letters, digits, '.', '_' or '-' (and not start with '.')"
            )

    @property
    def format_options(self) -> dict[str, Any]:
        """{name: value} of the fields marked ``format_option``: handed to every scan's format check beside the
        manifest row's options, so that the pipeline never names a format."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("format_option")}

    def replace(self, **changes: Any) -> JobConfig:
        """A copy with ``changes`` applied, validated again."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> JobConfig:
        """The config of parsed command-line ``args`` (from :func:`parser`)."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.metadata["flag"]})


_BYTE_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_BYTE_COUNT = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", re.IGNORECASE)


def byte_count(text: str) -> int:
    """``4GiB``, ``4G``, ``512MiB`` or ``1048576`` as bytes (binary units: 1 GiB = 1024**3 bytes)."""
    match = _BYTE_COUNT.fullmatch(str(text))
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a byte count such as 4GiB, 512MiB or 1048576")
    return int(float(match[1]) * _BYTE_UNITS[match[2].lower()])


def flag_of(name: str) -> str:
    return name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    """``python -m jobs.score``'s command line (here, not in jobs.score, so that tools such as the docs' CLI
    reference can build it without importing Ray)."""
    return parser(
        prog="python -m jobs.score",
        description="Score every scan of a manifest with a verified vit3d model; results land in Parquet.",
        epilog="Reruns skip scans already scored, and known-bad scans: those whose last error was at validate, "
        "decode or preprocess and whose file (path, size and mtime) is unchanged since; other failures (storage, "
        "a worker's death, inference) are retried. Exit codes: 0 done within the error budget (failed / "
        "attempted); 3 done but over it; 2 nothing scored (usage, manifest, model or output problem); 1 the run "
        "broke mid-way (scored scans are kept: rerun to resume).",
    )


def parser(**kwargs: Any) -> argparse.ArgumentParser:
    """argparse for every JobConfig field that has a flag: names, defaults, choices and help from the fields."""
    p = argparse.ArgumentParser(**kwargs)
    for field in dataclasses.fields(JobConfig):
        flag = field.metadata["flag"]
        if not flag:
            continue
        names = (
            [flag] if isinstance(flag, str) else list(flag) if isinstance(flag, tuple) else [f"--{flag_of(field.name)}"]
        )
        extra = dict(field.metadata["argparse"])
        if field.default is not dataclasses.MISSING:
            extra["default"] = field.default
        p.add_argument(*names, dest=field.name, help=field.metadata["help"], **extra)
    return p
