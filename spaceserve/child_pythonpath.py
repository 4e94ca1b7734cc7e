"""The PYTHONPATH a child process needs to import this very spaceserve, whatever its working directory: this
package's root ahead of the caller's own entries. Every process spaceserve starts (engine core, encoder process,
SM probes, Ray actors, a sweep's measurements) takes it."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


def child_pythonpath(existing: str | None) -> str:
    return os.pathsep.join(filter(None, [PACKAGE_ROOT, existing]))
