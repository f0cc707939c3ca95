"""Figures the stages write into their work directories (matplotlib, headless)."""
import os
from typing import Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def image_grid(images: np.ndarray, captions: Sequence[str], path: str, columns: int = 8) -> str:
  """Saves uint8 images [N, H, W, 3] in a grid with one caption each; returns the path."""
  n = len(images)
  rows = max(1, -(-n // columns))
  fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.6, rows * 1.9), squeeze=False)
  for ax in axes.ravel():
    ax.axis('off')
  for ax, image, caption in zip(axes.ravel(), images, captions):
    ax.imshow(image, interpolation='nearest')
    ax.set_title(caption, fontsize=6)
  fig.tight_layout()
  tmp = f'{path}.tmp-{os.getpid()}.png'
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, path)
  return path
