"""The installed package's version, read once from its metadata."""

from __future__ import annotations

from importlib.metadata import version

VERSION: str = version("kowalski")
