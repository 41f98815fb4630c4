"""The repository is cut along deployment lines: a device installs the agent and the wire
package, never the simulator, the clinic's gateway or their dependencies (pydicom)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import zipfile
from importlib.metadata import distribution
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOT_ON_A_DEVICE = ("sim", "clinic_gateway", "bench", "pydicom")

# Any import of a package a device does not install fails as if it were absent.
GUARD = textwrap.dedent(f"""
    import importlib.abc
    import sys

    class NotOnADevice(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in {NOT_ON_A_DEVICE!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, NotOnADevice())
""")


def test_the_device_wheel_holds_neither_the_simulator_nor_the_gateway(tmp_path: Path) -> None:
    # Built from a copy, so that the build's own folders never land in the checkout.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "*.egg-info", "__pycache__", ".*_cache", "demo-out"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
                            "-w", str(tmp_path / "wheels"), str(src)],
                           capture_output=True, text=True, timeout=600, check=False)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "wheels").glob("device_agent-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        requires = [line for line in archive.read(metadata).decode().splitlines()
                    if line.startswith("Requires-Dist:")]
    packages = {name.split("/")[0] for name in names}
    assert "device_agent" in packages
    assert not packages & {"sim", "clinic_gateway", "bench", "tests"}, sorted(packages)
    assert requires, "the device's dependencies are declared"
    assert [r for r in requires if r.split()[1] == "dermascope-wire"], requires
    assert not [r for r in requires if "pydicom" in r.lower()], requires


def test_the_gateway_and_the_wire_package_need_nothing_of_the_device(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    for folder in ("dermascope_wire", "clinic_gateway"):
        built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
                                "-w", str(wheels), str(ROOT / folder)],
                               capture_output=True, text=True, timeout=600, check=False)
        assert built.returncode == 0, built.stderr
    for wheel in wheels.glob("*.whl"):
        with zipfile.ZipFile(wheel) as archive:
            names = archive.namelist()
            (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
            requires = [line.split()[1] for line in archive.read(metadata).decode().splitlines()
                        if line.startswith("Requires-Dist:")]
        packages = {name.split("/")[0] for name in names if "dist-info" not in name}
        assert packages in ({"dermascope_wire"}, {"clinic_gateway"}), (wheel.name, packages)
        assert "device-agent" not in requires, (wheel.name, requires)
        assert not {"opencv-python-headless", "numpy", "gpiozero"} & set(requires), requires


def test_the_device_code_imports_neither_the_simulator_nor_the_gateway() -> None:
    code = GUARD + textwrap.dedent("""
        import pkgutil
        import importlib

        import device_agent
        import device_agent.agent
        import device_agent.camera.backends
        import device_agent.cli
        from device_agent.config import CameraConfig

        for info in pkgutil.walk_packages(device_agent.__path__, "device_agent."):
            if not info.name.endswith(".__main__"):  # that one runs the command line
                importlib.import_module(info.name)
        CameraConfig(backend="picamera2")  # the backend names, from the entry points
        bad = sorted(m for m in sys.modules if m.split(".")[0] in NOT_ON_A_DEVICE)
        sys.exit(f"imported: {bad}" if bad else 0)
    """).replace("NOT_ON_A_DEVICE", repr(NOT_ON_A_DEVICE))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=False, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_the_demo_without_the_simulator_says_what_to_install(tmp_path: Path) -> None:
    code = GUARD + textwrap.dedent(f"""
        from device_agent.cli import main

        sys.exit(main(["demo", "--out", {str(tmp_path / "demo")!r}, "--captures", "1"]))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=False, cwd=ROOT)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "device-agent demo: the demo needs the simulator" in result.stderr
    assert "make demo" in result.stderr


def test_the_device_registers_the_real_camera_and_the_simulator_its_own() -> None:
    def backends(dist: str) -> dict[str, str]:
        return {ep.name: ep.value for ep in distribution(dist).entry_points
                if ep.group == "device_agent.camera_backends"}

    assert backends("device-agent") == {
        "picamera2": "device_agent.camera.backends:open_picamera2"}
    assert backends("dermascope-sim") == {"sim": "sim.camera:open_backend"}
    assert "pydicom" not in " ".join(distribution("device-agent").requires or [])


def test_the_gateway_code_imports_nothing_of_the_device_or_the_simulator() -> None:
    guard = GUARD.replace(repr(NOT_ON_A_DEVICE), repr(("device_agent", "sim", "bench")))
    code = guard + textwrap.dedent("""
        import importlib
        import pkgutil

        import clinic_gateway

        for info in pkgutil.walk_packages(clinic_gateway.__path__, "clinic_gateway."):
            if not info.name.endswith(".__main__"):
                importlib.import_module(info.name)
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("device_agent", "sim"))
        sys.exit(f"imported: {bad}" if bad else 0)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=False, cwd=ROOT)
    assert result.returncode == 0, result.stderr
