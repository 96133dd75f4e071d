"""Shared fixtures: the two built-in tiny CLIPs, random-init and loaded once per session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from d4c_core.models import BUILTIN_ARCHS, LoadedModel, ModelSpec, load_clip


@pytest.fixture(scope="session")
def tiny() -> dict[str, LoadedModel]:
    """``{"d4c-tiny-vit": LoadedModel, "d4c-tiny-rn": LoadedModel}`` (random init, eval, FP32).

    Shared: tests must not modify these models; wrap a ``copy.deepcopy`` instead.
    """
    return {arch: load_clip(ModelSpec(arch)) for arch in BUILTIN_ARCHS}
