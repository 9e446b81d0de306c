"""Shared fixtures."""

from __future__ import annotations

import pytest

# Test modules of the rewrite passes: every pass they run checks its own output (``passes/checks.py``:
# onnx.checker, an ONNX Runtime run, the mask oracle for removal), as production does not, for speed.
PASS_TEST_MODULES = {"test_pass_framework", "test_removal_oracle", "test_tile_rows", "test_relu_activations",
                     "test_reconstruct"}


@pytest.fixture(autouse=True)
def check_passes(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """``ONNXPRUNE_CHECK_PASSES=1`` for the tests of the passes (the modules above)."""
    module = getattr(request, "module", None)
    if module is not None and module.__name__.rsplit(".", 1)[-1] in PASS_TEST_MODULES:
        monkeypatch.setenv("ONNXPRUNE_CHECK_PASSES", "1")
