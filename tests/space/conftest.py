"""The Space's helper modules live in space/hqspace (a Space repo's layout): make them importable."""
from __future__ import annotations

import sys
from pathlib import Path

SPACE_DIR = Path(__file__).resolve().parents[2] / "space"
if str(SPACE_DIR) not in sys.path:
    sys.path.insert(0, str(SPACE_DIR))
