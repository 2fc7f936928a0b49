"""Borrow Rate & Locate Fee Pricing Engine."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("borrow-rate-engine")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
