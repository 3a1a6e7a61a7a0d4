"""Fixtures of the inference tests; the helpers live in inference_support.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from inference_support import save_zoo_model


@pytest.fixture(scope="session")
def mlp_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A zoo MLP (8 features, 3 classes) as a job saves it, and its torch module."""
    path = tmp_path_factory.mktemp("models") / "mlp.safetensors"
    return path, save_zoo_model(path)
