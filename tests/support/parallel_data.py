"""Small synthetic classification data for the parallel-training tests."""

from __future__ import annotations

from typing import Any

import numpy as np


def teacher_dataset(
    samples: int = 512, features: int = 16, classes: int = 4, seed: int = 0
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Gaussian features labelled by a random linear teacher: learnable, so losses fall."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, features)).astype(np.float32)
    teacher = rng.normal(size=(features, classes)).astype(np.float32)
    return x, np.argmax(x @ teacher, axis=1).astype(np.int64)
