"""Warnings that point at the user's line, not at fastds's internals."""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

_PACKAGE = str(Path(__file__).resolve().parent) + os.sep  # the separator: not a sibling "fastds_x/"


def warn_caller(message, category=UserWarning):
    """``warnings.warn`` attributed to the first frame outside fastds: its internals reach a
    warning at depths that differ by entry point (``sample``, a rollout, the protocol), so a
    fixed ``stacklevel`` would name a fastds line, and the default filter would then show the
    warning once per process instead of once per line of the user's that asked for it."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)
