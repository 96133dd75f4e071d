"""Calibration data: image sources (one registry, one entry point), prompts, contact sheets."""

from d4c_core.calibration.contact_sheet import save_contact_sheet
from d4c_core.calibration.prompts import DEFAULT_TEMPLATES, GENERIC_NAMES, calibration_prompts
from d4c_core.calibration.sources import (
    SOURCES,
    CalibrationSource,
    make_calibration,
    make_text_calibration,
)
from d4c_core.calibration.towers import check_method

__all__ = [
    "DEFAULT_TEMPLATES",
    "GENERIC_NAMES",
    "SOURCES",
    "CalibrationSource",
    "calibration_prompts",
    "check_method",
    "make_calibration",
    "make_text_calibration",
    "save_contact_sheet",
]
