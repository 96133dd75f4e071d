"""Puts the repository root on ``sys.path``, so ``python bench/x.py`` can import the test
support package (``tests.support``: throwaway databases, private servers) without it shipping
in a production package. Import it (``import _paths``) before importing ``tests``."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
