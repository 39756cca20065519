"""A real PACS for tests and benches: Debian's Orthanc with its DICOMweb plugin, started on free ports of 127.0.0.1
in a folder of its own, stopped with SIGTERM to its own pid (never anything else).

``OverwriteInstances`` is on, as the how-to asks of a PACS the job writes back to: with it off, Orthanc answers a
second store of a SOP Instance UID with 200 and silently keeps the first object (measured).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path

import pydicom
import requests

from jobs.testing.processes import wait_until

ORTHANC = "Orthanc"
PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
REQUIRE_ENV = "VIT3D_REQUIRE_PACS"  # "1": the PACS tests must run (CI installs Orthanc); else they skip
USER, PASSWORD = "scorer", "orthanc-test-password"


def missing() -> str | None:
    """Why a PACS cannot be started here (the Debian packages to install), or None when it can."""
    if shutil.which(ORTHANC) is None or not os.path.exists(PLUGIN):
        return "Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)"
    return None


def tool(name: str) -> str | None:
    """Why the command-line tool ``name`` is missing here (the Debian package to install), or None."""
    if shutil.which(name) is not None:
        return None
    package = {"dciodvfy": "dicom3tools", "dsr2html": "dcmtk"}.get(name, name)
    return f"{name} is not installed (apt-get install {package})"


def require(why: str | None) -> None:
    """Nothing when ``why`` is None; else skip the calling test for that reason, or fail it where
    VIT3D_REQUIRE_PACS=1 (CI installs Orthanc, dicom3tools and dcmtk, so there they must run)."""
    if why is None:
        return
    import pytest

    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{why}, but {REQUIRE_ENV}=1")
    pytest.skip(f"{why}; CI sets {REQUIRE_ENV}=1 and installs it")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Orthanc:
    """One Orthanc process: ``url`` is its HTTP root, ``dicomweb`` the DICOMweb service root (``http://…``)."""

    def __init__(self, folder: str | os.PathLike, *, auth: bool = False, http_port: int | None = None) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.auth = (USER, PASSWORD) if auth else None
        self.port = http_port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb = f"{self.url}/dicom-web"
        self.process: subprocess.Popen[bytes] | None = None
        config = {
            "Name": "vit3d-test-pacs",
            "StorageDirectory": str(self.folder / "db"),
            "IndexDirectory": str(self.folder / "db"),
            "HttpPort": self.port,
            "DicomPort": free_port(),
            "DicomServerEnabled": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": auth,
            "RegisteredUsers": {USER: PASSWORD} if auth else {},
            "OverwriteInstances": True,
            "Plugins": [PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        (self.folder / "config.json").write_text(json.dumps(config))

    def start(self) -> Orthanc:
        """Start it (the same storage folder again after :meth:`stop`) and wait until it answers."""
        with open(self.folder / "orthanc.log", "ab") as log:
            self.process = subprocess.Popen(
                [ORTHANC, str(self.folder / "config.json")], stdout=log, stderr=subprocess.STDOUT
            )
        process = self.process

        def answers() -> bool:
            try:
                return requests.get(f"{self.url}/system", auth=self.auth, timeout=2).status_code == 200
            except requests.RequestException:
                return False

        wait_until(answers, f"Orthanc on port {self.port}", timeout=60, alive=lambda: process.poll() is None)
        return self

    def stop(self) -> None:
        """SIGTERM to its own process, then wait for it to exit (it takes about 3 s)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def store(self, datasets: Iterable[pydicom.Dataset | str | os.PathLike]) -> None:
        """Store instances (datasets or files) with STOW-RS; AssertionError naming any the server refused."""
        from jobs import dicomweb

        items = [d if isinstance(d, pydicom.Dataset) else pydicom.dcmread(d) for d in datasets]
        web = dicomweb.client(self.dicomweb) if self.auth is None else self._client()
        answer = web.store_instances(items)
        failed = answer.get("FailedSOPSequence", [])
        assert not failed, f"Orthanc refused {len(failed)} of {len(items)} instances"

    def _client(self):  # noqa: ANN202  (a dicomweb_client.DICOMwebClient with this server's test user)
        from dicomweb_client import DICOMwebClient

        session = requests.Session()
        session.auth = self.auth
        return DICOMwebClient(url=self.dicomweb, session=session)

    def instances(self, **query: str) -> list[dict]:
        """QIDO-RS on all instances (e.g. ``Modality="SR"``), as the server answers them."""
        reply = requests.get(f"{self.dicomweb}/instances", params=query, auth=self.auth, timeout=30)
        reply.raise_for_status()
        return reply.json() if reply.content else []


@contextlib.contextmanager
def running(folder: str | os.PathLike, *, auth: bool = False) -> Iterator[Orthanc]:
    """An Orthanc started for the block and stopped after it."""
    server = Orthanc(folder, auth=auth).start()
    try:
        yield server
    finally:
        server.stop()
