"""DICOM objects a PACS viewer shows beside a scored scan: the score as a Comprehensive 3D SR (:mod:`.report`) and
the window scores as a Parametric Map (:mod:`.heatmap`). Pure builders and readers: no network, no clock, no
randomness, so a rerun with the same inputs yields the same bytes and the same UIDs."""

from __future__ import annotations

from jobs.output.pacs.heatmap import heatmap_map, read_heatmap_map
from jobs.output.pacs.report import read_score_report, report_uid, score_report

__all__ = ["heatmap_map", "read_heatmap_map", "read_score_report", "report_uid", "score_report"]
