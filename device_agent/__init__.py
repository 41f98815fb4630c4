"""Capture agent for a Raspberry Pi dermatoscope."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("device-agent")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
