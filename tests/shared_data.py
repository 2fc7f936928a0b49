"""Where the real data files of DESIGN §5 live: `shared/data`, a sibling of the repository root.

Computed from this file's location, so the tests find the files wherever the checkout sits; the files are
used from there and never copied into the repository.
"""

from __future__ import annotations

import pathlib

SHARED_DATA: pathlib.Path = pathlib.Path(__file__).resolve().parent.parent.parent / "shared" / "data"

__all__ = ["SHARED_DATA"]
