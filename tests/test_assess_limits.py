"""Image files that claim more pixels than memory should hold: refused from the header, never
decoded, and the rest of the call still done (issue 12, finding 6)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

from device_agent.camera.imagefile import DEFAULT_MAX_PIXELS, image_size, load_image
from device_agent.camera.quality import ImageError

DATA = Path(__file__).parent / "data"
GOOD = DATA / "chelsea.jpg"  # a sharp, well exposed photograph: "accept"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def forged_png(path: Path, width: int, height: int) -> Path:
    """A real 64x64 PNG from Pillow whose IHDR then claims ``width`` x ``height``, with the
    chunk's CRC recomputed so that it is well formed."""
    Image.new("RGB", (64, 64), (180, 120, 100)).save(path)
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"IHDR"
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[8:33] = _chunk(b"IHDR", ihdr)
    path.write_bytes(bytes(data))
    return path


def flat_png(path: Path, width: int, height: int) -> Path:
    """A valid, fully decodable PNG of one grey, 1 bit per pixel, written row by row so that
    the test itself never holds the image: 20000x20000 is 400 megapixels in about 60 KB."""
    row = b"\x00" + b"\xff" * ((width + 7) // 8)  # filter type 0, then the packed pixels
    deflate = zlib.compressobj(9)
    idat = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat)
                     + _chunk(b"IEND", b""))
    return path


#: Runs the command as ``python -m device_agent`` does, and at exit writes its own peak
#: resident memory (VmHWM: this program's address space only) to the file named in argv[1].
_MEASURED = """
import atexit, re, runpy, sys
peak_file = sys.argv.pop(1)
def report():
    status = open("/proc/self/status").read()
    open(peak_file, "w").write(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1))
atexit.register(report)
sys.argv[0] = "device_agent"
runpy.run_module("device_agent", run_name="__main__", alter_sys=True)
"""


def assess(*args: str | Path, tmp_path: Path) -> tuple[int, list[dict], str, float]:
    """Run ``device-agent assess --json`` as a technician does: (exit status, JSON records,
    stderr, the command's own peak resident memory in MB). The peak is the program's own
    high-water mark: a child's rusage would carry over this (large) test process's memory
    through fork and exec."""
    out, err, peak = tmp_path / "assess.out", tmp_path / "assess.err", tmp_path / "peak.kb"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.run(
            [sys.executable, "-c", _MEASURED, str(peak), "assess", "--json", *map(str, args)],
            stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, timeout=300, check=False)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    return proc.returncode, records, err.read_text(), int(peak.read_text()) / 1024


def test_a_header_claiming_100000x100000_is_refused_and_the_batch_goes_on(tmp_path):
    forged = forged_png(tmp_path / "forged.png", 100_000, 100_000)
    code, records, stderr, _ = assess(forged, GOOD, tmp_path=tmp_path)
    assert "Traceback" not in stderr
    assert code == 2
    assert f"{forged}: refused, not decoded" in stderr
    assert "10000000000 pixels" in stderr  # Pillow's bomb guard names the size it saw
    assert [r["path"] for r in records] == [str(GOOD)]
    assert records[0]["verdict"] == "accept"
    assert set(records[0]) >= {"path", "verdict", "reasons", "scores"}


def test_a_valid_20000x20000_png_is_refused_without_decoding_it(tmp_path):
    big = flat_png(tmp_path / "big.png", 20_000, 20_000)
    assert big.stat().st_size < 1_000_000
    code, records, stderr, peak_mb = assess(big, GOOD, tmp_path=tmp_path)
    assert code == 2
    # Over twice Pillow's own limit, Pillow's guard speaks first, naming the size it read.
    assert f"{big}: refused, not decoded: Image size (400000000 pixels) exceeds" in stderr
    assert [(r["path"], r["verdict"]) for r in records] == [(str(GOOD), "accept")]
    # Decoded, this image alone is 400 MB of grey and 1.2 GB as colour; the command's whole
    # footprint (Python, numpy, OpenCV, one small photograph) stays far below either.
    assert peak_mb < 350, peak_mb


def test_the_pixel_limit_is_an_option_and_its_default_fits_a_12_mp_sensor(tmp_path):
    assert DEFAULT_MAX_PIXELS >= 4056 * 3040  # the HQ camera's full sensor
    photo = tmp_path / "photo.png"
    Image.open(GOOD).save(photo)
    width, height = Image.open(GOOD).size
    code, records, stderr, _ = assess(photo, "--max-pixels", width * height - 1,
                                      tmp_path=tmp_path)
    assert code == 2
    assert records == []
    assert f"{photo}: refused, not decoded: {width}x{height} is " in stderr
    code, records, stderr, _ = assess(photo, "--max-pixels", width * height, tmp_path=tmp_path)
    assert code == 0, stderr
    assert [r["verdict"] for r in records] == ["accept"]


@pytest.mark.parametrize("value", ["0", "-5", "many"])
def test_a_nonsense_pixel_limit_is_refused(tmp_path, value):
    code, records, stderr, _ = assess(GOOD, "--max-pixels", value, tmp_path=tmp_path)
    assert code == 2
    assert records == []
    assert "--max-pixels" in stderr
    assert "Traceback" not in stderr


def test_pillow_flags_a_bomb_even_under_a_generous_limit(tmp_path):
    forged = forged_png(tmp_path / "forged.png", 100_000, 100_000)
    with pytest.raises(ImageError, match="decompression bomb"):
        image_size(forged, max_pixels=10**12)


def test_unreadable_files_are_named_and_the_others_assessed(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    truncated = tmp_path / "truncated.png"
    Image.open(GOOD).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    code, records, stderr, _ = assess(text, truncated, tmp_path / "absent.png", GOOD,
                                      tmp_path=tmp_path)
    assert code == 2
    assert f"{text}: not a readable image" in stderr
    assert f"{truncated}: not a readable image" in stderr
    assert f"{tmp_path / 'absent.png'}: no such file" in stderr
    assert [(r["path"], r["verdict"]) for r in records] == [(str(GOOD), "accept")]


def test_every_image_is_assessed_exit_0(tmp_path):
    code, records, stderr, _ = assess(GOOD, GOOD, tmp_path=tmp_path)
    assert code == 0, stderr
    assert [r["verdict"] for r in records] == ["accept", "accept"]


def test_calibrate_refuses_an_oversized_target_image_the_same_way(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(f'[device]\nid = "d1"\nstate_dir = "{tmp_path / "state"}"\n'
                      '[uplink]\ninsecure_dev_mode = true\n'
                      '[security]\ninsecure_dev_mode = true\n')
    white = flat_png(tmp_path / "white.png", 20_000, 20_000)
    result = subprocess.run(
        [sys.executable, "-m", "device_agent", "calibrate", "--config", str(config),
         "--white", str(white), "--chart", str(GOOD)], capture_output=True, text=True,
        timeout=120, check=False)
    assert result.returncode == 2
    assert f"{white}: refused, not decoded: Image size (400000000 pixels)" in result.stderr
    assert "Traceback" not in result.stderr


def test_our_limit_speaks_below_pillows_and_names_the_dimensions(tmp_path):
    # 9000x9000 = 81 MP: over the default limit, under Pillow's warning (89 MP).
    big = flat_png(tmp_path / "big.png", 9_000, 9_000)
    with pytest.raises(ImageError, match=r"big.png: refused, not decoded: 9000x9000 is 81.0 "
                                         r"megapixels, over the limit of 64 megapixels$"):
        load_image(big)


def test_load_image_decodes_what_passes_the_limit():
    image = load_image(GOOD)
    width, height = image_size(GOOD)
    assert image.shape == (height, width, 3)
