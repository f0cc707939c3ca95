"""Figures the stages write into their work directories (matplotlib, headless)."""
import os
from typing import Dict, Sequence, Tuple

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
  return _save(fig, path)


def _save(fig, path: str) -> str:
  tmp = f'{path}.tmp-{os.getpid()}.png'
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, path)
  return path


def architecture_heatmap(weights: Dict[str, np.ndarray], row_labels: Sequence[str],
                         column_labels: Sequence[str], path: str, title: str = '') -> str:
  """One heat map per cell type of operation weights [edges, operations], values printed."""
  fig, axes = plt.subplots(1, len(weights), figsize=(6 * len(weights), 0.35 * len(row_labels) + 2),
                           squeeze=False)
  for ax, (name, w) in zip(axes[0], weights.items()):
    ax.imshow(w, cmap='viridis', vmin=0, vmax=max(float(w.max()), 1e-6), aspect='auto')
    ax.set_xticks(range(len(column_labels)), column_labels, rotation=45, ha='right', fontsize=7)
    ax.set_yticks(range(len(row_labels)), row_labels, fontsize=7)
    for (i, j), v in np.ndenumerate(w):
      ax.text(j, i, f'{v:.2f}', ha='center', va='center', fontsize=5, color='w')
    ax.set_title(f'{name} {title}'.strip(), fontsize=9)
  fig.tight_layout()
  return _save(fig, path)


def cell_diagram(gene: Sequence[Tuple[str, int]], path: str, title: str = '') -> str:
  """A DARTS cell: inputs c_{k-2}, c_{k-1}, nodes 0.., and output c_k; edges labelled by op.

  `gene` holds two (operation, input state) pairs per node, states 0 and 1
  being the cell inputs and 2 + i node i.
  """
  num_nodes = len(gene) // 2
  positions = {0: (0.0, 1.0), 1: (0.0, -1.0)}
  positions.update({2 + i: (1.5 + i, 0.9 * (-1) ** i) for i in range(num_nodes)})
  out = (num_nodes + 1.5, 0.0)
  names = {0: 'c_{k-2}', 1: 'c_{k-1}', **{2 + i: str(i) for i in range(num_nodes)}}
  fig, ax = plt.subplots(figsize=(2.2 * (num_nodes + 2), 4))
  arrow = dict(arrowstyle='->', color='0.3', shrinkA=14, shrinkB=14)
  for e, (op, j) in enumerate(gene):
    (x0, y0), (x1, y1) = positions[j], positions[2 + e // 2]
    ax.annotate('', (x1, y1), (x0, y0), arrowprops=dict(arrow, connectionstyle='arc3,rad=0.1'))
    # The label sits nearer the node the edge feeds, where the arrows fan in.
    ax.text(x0 + 0.65 * (x1 - x0), y0 + 0.65 * (y1 - y0), op, ha='center', va='center',
            fontsize=7, color='tab:blue',
            bbox=dict(boxstyle='round', fc='white', ec='none', alpha=0.85))
  for i in range(num_nodes):
    ax.annotate('', out, positions[2 + i], arrowprops=dict(arrow, color='0.7'))
  for state, (x, y) in positions.items():
    ax.text(x, y, names[state], ha='center', va='center', fontsize=9,
            bbox=dict(boxstyle='round', fc='lightyellow' if state > 1 else 'lightgreen'))
  ax.text(*out, 'c_k', ha='center', va='center', fontsize=9,
          bbox=dict(boxstyle='round', fc='lightblue'))
  ax.set_xlim(-0.6, num_nodes + 2.1)
  ax.set_ylim(-2, 2)
  ax.axis('off')
  ax.set_title(title)
  fig.tight_layout()
  return _save(fig, path)
