"""PACS delivery (issue 15): what the gateway's forwarder costs per instance, against a real
Orthanc, as a ratio to Orthanc's own upload of the same files measured in the same run.

- baseline: each DICOM file POSTed as it is to Orthanc's REST API (``/instances``), one
  request per file on one kept-alive connection: the least any client can do;
- the forwarder (clinic_gateway/forwarder.py) emptying a queue of the same files over
  DICOMweb STOW-RS, then over DIMSE C-STORE, each into a fresh Orthanc: its per-instance
  time / the baseline's (goal <= 3: reading and checking each file, the multipart or
  association, the queue's own file operations);
- every Orthanc is read back: instances held must equal the files sent (goal: all, once).

    python bench/bench_pacs.py [--instances 60]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import requests
from common import emit

from clinic_gateway.config import PacsConfig
from clinic_gateway.exporter import Exporter
from clinic_gateway.forwarder import Forwarder, pending
from clinic_gateway.pacs import make_sender
from sim.orthanc import PrivateOrthanc, find_orthanc
from sim.scene import SceneSpec, render

RATIO_GOAL = 3.0


def make_store(store: Path, count: int) -> list[Path]:
    """``count`` captures as the gateway stores them, exported and queued by the exporter."""
    # The full sensor (IMX477, 4056 x 3040) with its noise: a JPEG of a few MB, as devices send.
    frame = cv2.resize(render(SceneSpec(seed=5)), (4056, 3040), interpolation=cv2.INTER_CUBIC)
    noise = np.random.default_rng(5).normal(0, 6, frame.shape)
    frame = np.clip(frame + noise, 0, 255).astype(np.uint8)
    ok, jpeg = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 92])
    assert ok
    folder = store / "bench-0001"
    folder.mkdir(parents=True)
    exporter = Exporter(store, io.StringIO(), forward=True)
    for i in range(count):
        capture_id = f"bench-{i:05d}"
        (folder / f"{capture_id}.jpg").write_bytes(jpeg.tobytes())
        (folder / f"{capture_id}.json").write_text(json.dumps({
            "capture_id": capture_id, "device_id": "bench-0001",
            "captured_at": f"2026-11-25T12:{i // 60 % 60:02d}:{i % 60:02d}+00:00",
            "dicom": {"LightSourcePolarization": "POLARIZED"}}))
        exporter.do("bench-0001", capture_id, dicom=True)
    return sorted(folder.glob("*.dcm"))


def baseline(orthanc: PrivateOrthanc, files: list[Path]) -> float:
    """Seconds per file of Orthanc's own REST upload."""
    with requests.Session() as session:
        session.auth = (orthanc.user, orthanc.password)
        started = time.perf_counter()
        for path in files:
            answer = session.post(f"{orthanc.url}/instances", data=path.read_bytes(),
                                  timeout=30)
            answer.raise_for_status()
        return (time.perf_counter() - started) / len(files)


def forward(orthanc: PrivateOrthanc, store: Path, transport: str) -> float:
    """Seconds per instance of the forwarder emptying the queue (re-filled for each run)."""
    config = PacsConfig.model_validate({**orthanc.pacs_section(transport), "timeout_s": 30.0})
    forwarder = Forwarder(store, make_sender(config))
    queued = len(pending(store))
    started = time.perf_counter()
    if forwarder.run_once() is not None or pending(store):
        raise RuntimeError(f"{transport}: the queue was not emptied")
    return (time.perf_counter() - started) / queued


def requeue(store: Path) -> None:
    exporter = Exporter(store, io.StringIO(), forward=True)
    for path in sorted((store / "bench-0001").glob("*.dcm")):
        exporter.do("bench-0001", path.stem, dicom=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=20)
    args = parser.parse_args()
    if find_orthanc() is None:
        print("bench_pacs: Orthanc with its DICOMweb plugin is not installed (Debian packages "
              "orthanc and orthanc-dicomweb: make system-deps)")
        return 1
    with tempfile.TemporaryDirectory(prefix="bench-pacs-") as tmp:
        root = Path(tmp)
        store = root / "store"
        files = make_store(store, args.instances)
        mb = sum(p.stat().st_size for p in files) / len(files) / 2**20
        figures: dict[str, dict[str, float]] = {}
        held: dict[str, int] = {}
        for name in ("baseline", "stow-rs", "c-store"):
            with PrivateOrthanc(root / f"orthanc-{name}") as orthanc:
                if name == "baseline":
                    seconds = baseline(orthanc, files)
                else:
                    if not pending(store):
                        requeue(store)  # emptied by the previous transport's run
                    seconds = forward(orthanc, store, name)
                held[name] = len(orthanc.instances())
                figures[name] = {"ms_per_instance": seconds * 1000,
                                 "instances_per_s": 1 / seconds}
        base = figures["baseline"]["ms_per_instance"]
        for name in ("stow-rs", "c-store"):
            figures[name]["ratio"] = figures[name]["ms_per_instance"] / base
    ratio_ok = all(figures[n]["ratio"] <= RATIO_GOAL for n in ("stow-rs", "c-store"))
    held_ok = all(count == args.instances for count in held.values())
    lines = [f"instances         : {args.instances} DICOM files of {mb:.2f} MB each"]
    lines.append(f"baseline          : {base:.1f} ms per file (Orthanc's REST upload)")
    for name in ("stow-rs", "c-store"):
        f = figures[name]
        lines.append(f"forwarder {name:8s}: {f['ms_per_instance']:.1f} ms per instance, "
                     f"{f['ratio']:.2f}x the baseline (goal <= {RATIO_GOAL}: "
                     f"{'met' if f['ratio'] <= RATIO_GOAL else 'NOT met'})")
    lines.append(f"read back         : {held} instances held, {args.instances} sent to each "
                 f"({'all, once' if held_ok else 'NOT all once'})")
    emit("pacs", lines, {"figures": figures, "held": held, "instances": args.instances,
                         "goals": {"ratio": ratio_ok, "held": held_ok}})
    return 0 if ratio_ok and held_ok else 1


if __name__ == "__main__":
    sys.exit(main())
