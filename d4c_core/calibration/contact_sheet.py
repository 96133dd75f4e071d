"""A PNG grid of calibration images, so a human can see what the model was calibrated on."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid

PADDING = 2


def denormalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Undo CLIP's per-channel normalization and clamp to the displayable [0, 1]."""
    m = torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (images.detach().float().cpu() * s + m).clamp(0.0, 1.0)


def save_contact_sheet(
    images: Tensor,
    path: Path,
    mean: Sequence[float] = OPENAI_DATASET_MEAN,
    std: Sequence[float] = OPENAI_DATASET_STD,
    cols: int = 16,
) -> Path:
    """Write ``images`` (N, 3, H, W, normalized) as one PNG, ``cols`` per row; return path.

    Size: ``min(cols, N) * (W + 2) + 2`` by ``ceil(N / cols) * (H + 2) + 2`` pixels (2 px
    black borders from ``make_grid``).
    """
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        raise ValueError(f"expected a non-empty (N, 3, H, W) batch, got {tuple(images.shape)}")
    if cols <= 0:
        raise ValueError(f"cols must be > 0, got {cols}")
    grid = make_grid(denormalize(images, mean, std), nrow=cols, padding=PADDING, pad_value=0.0)
    pixels = (grid * 255.0).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode="RGB").save(path, format="PNG")
    return path
