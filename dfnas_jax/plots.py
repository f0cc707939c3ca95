"""Figures the stages write into their work directories (matplotlib, headless)."""
import glob
import os
from typing import Dict, Optional, Sequence, Tuple

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


def rank_scatter(panels: Dict[str, Tuple[np.ndarray, np.ndarray, str]], xlabel: str,
                 ylabel: str, path: str, labels: Sequence[str] = ()) -> str:
  """One scatter panel per entry {title: (x, y, caption)}; points numbered by `labels`."""
  fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.3), squeeze=False)
  for ax, (title, (x, y, caption)) in zip(axes[0], panels.items()):
    ax.scatter(x, y, s=18)
    for label, xi, yi in zip(labels, x, y):
      ax.annotate(label, (xi, yi), fontsize=6, xytext=(2, 2), textcoords='offset points')
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.text(0.03, 0.97, caption, transform=ax.transAxes, va='top', fontsize=7)
  fig.tight_layout()
  return _save(fig, path)


# --- Reading a work directory back (the notebooks in colab/) ---------------------------------


def read_scalars(logdir: str) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
  """{tag: (steps, values)} of the scalars a clu metric writer logged to `logdir`.

  Reads the TensorBoard event files directly in `logdir` (not its subfolders),
  oldest first, so where a resumed run logged a step again its last value wins.
  Returns {} when there are none.
  """
  import tensorflow as tf  # only here: the stages import this module too
  from tensorflow.core.util import event_pb2
  values: Dict[str, Dict[int, float]] = {}
  for path in sorted(glob.glob(os.path.join(logdir, 'events.out.tfevents.*'))):
    for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
      event = event_pb2.Event.FromString(record)
      for v in event.summary.value:
        if v.HasField('tensor'):
          value = tf.make_ndarray(v.tensor)
          if value.size != 1 or not np.issubdtype(value.dtype, np.number):
            continue  # text or non-scalar summaries
          value = float(value.reshape(()))
        elif v.HasField('simple_value'):
          value = float(v.simple_value)
        else:
          continue
        values.setdefault(v.tag, {})[int(event.step)] = value
  return {tag: (np.array(sorted(d), dtype=np.int64), np.array([d[s] for s in sorted(d)]))
          for tag, d in sorted(values.items())}


def curves(panels: Dict[str, Dict[str, Tuple[Sequence[float], Sequence[float]]]], path: str,
           xlabel: str = 'step', log_y: Sequence[str] = (),
           reference: Optional[Dict[str, Tuple[float, str]]] = None, columns: int = 3) -> str:
  """Line plots, one panel per entry {title: {label: (x, y)}}, saved to `path`.

  Panels named in `log_y` get a logarithmic y axis; `reference` {title: (y, label)}
  adds a dashed horizontal line (a target) to that panel. Empty panels are skipped.
  """
  panels = {t: lines for t, lines in panels.items() if any(len(x) for x, _ in lines.values())}
  if not panels:
    panels = {'(nothing logged)': {}}
  columns = min(columns, len(panels))
  rows = -(-len(panels) // columns)
  fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
  for ax in axes.ravel()[len(panels):]:
    ax.axis('off')
  for ax, (title, lines) in zip(axes.ravel(), panels.items()):
    for label, (x, y) in lines.items():
      ax.plot(x, y, marker='.' if len(x) <= 30 else None, label=label)
    if reference and title in reference:
      value, label = reference[title]
      ax.axhline(value, color='0.4', linestyle='--', label=label)
    if title in log_y:
      ax.set_yscale('log')
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.tick_params(labelsize=7)
    if len(lines) > 1 or (reference and title in reference):
      ax.legend(fontsize=7)
  fig.tight_layout()
  return _save(fig, path)


def error_bar_lines(lines: Dict[str, Tuple[Sequence[float], Sequence[float], Sequence[float]]],
                    path: str, xlabel: str, ylabel: str, log_x: bool = False) -> str:
  """One line per entry {label: (x, y, error)} with error bars, saved to `path`."""
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for label, (x, y, error) in lines.items():
    ax.errorbar(x, y, yerr=error, marker='o', capsize=3, label=label)
  if log_x:
    ax.set_xscale('log', base=2)
  ax.set_xlabel(xlabel, fontsize=8)
  ax.set_ylabel(ylabel, fontsize=8)
  ax.tick_params(labelsize=7)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  return _save(fig, path)


def soft_label_rounds(probs: np.ndarray, class_names: Sequence[str], path: str,
                      first_targets: Optional[Sequence[int]] = None) -> str:
  """Recursive label calibration, one row per image slot, one column per round.

  `probs` [rounds, slots, classes]: the teacher's softmax on the image made for
  that slot in that round, which is the target of the slot's next round. Bars of
  the round-0 target class (`first_targets`) are drawn in orange.
  """
  num_rounds, num_slots, num_classes = probs.shape
  fig, axes = plt.subplots(num_slots, num_rounds,
                           figsize=(max(2.6 * num_rounds, 4), 1.5 * num_slots + 0.6),
                           squeeze=False, sharey=True)
  for k in range(num_slots):
    for r in range(num_rounds):
      ax = axes[k, r]
      colors = ['tab:blue'] * num_classes
      if first_targets is not None:
        colors[int(first_targets[k])] = 'tab:orange'
      ax.bar(range(num_classes), probs[r, k], color=colors)
      ax.set_ylim(0, 1)
      ax.tick_params(labelsize=6)
      ax.set_xticks(range(num_classes),
                    class_names if num_classes <= 20 else [''] * num_classes,
                    rotation=90, fontsize=5)
      if k == 0:
        ax.set_title(f'round {r}' + (' (target of round 1)' if r == 0 and num_rounds > 1
                                      else ''), fontsize=8)
      if r == 0:
        ax.set_ylabel(f'image {k}', fontsize=7)
  fig.suptitle('teacher softmax per round (orange: the round-0 target class)', fontsize=9)
  fig.tight_layout()
  return _save(fig, path)


def candidate_scatter(x: Sequence[float], y: Sequence[float], path: str, xlabel: str,
                      ylabel: str, best: Optional[int] = None, title: str = '') -> str:
  """Every scored candidate as a point (e.g. FLOPs against held-out accuracy);
  the candidate at index `best` is marked with a red star."""
  fig, ax = plt.subplots(figsize=(5, 3.6))
  ax.scatter(x, y, s=14, alpha=0.7)
  if best is not None:
    ax.scatter([x[best]], [y[best]], s=120, marker='*', color='tab:red', label='best')
    ax.legend(fontsize=7)
  ax.set_xlabel(xlabel, fontsize=8)
  ax.set_ylabel(ylabel, fontsize=8)
  ax.set_title(title, fontsize=9)
  ax.tick_params(labelsize=7)
  fig.tight_layout()
  return _save(fig, path)


def rank_agreement(statistics: Dict[str, Dict[str, Dict]], path: str, title: str = '') -> str:
  """Per data variant, one bar per version: Kendall's tau with its bootstrap 95% interval,
  and the regret of the variant's top-1 pick in accuracy points.

  `statistics` {version: {variant: {'kendall_tau', 'kendall_tau_ci95', 'regret', ...}}}
  is the consistency study's (results.json). A tau that is undefined (a constant
  ranking) gets no bar but the label 'n/a'; versions without variants are skipped.
  """
  versions = [v for v, per_variant in statistics.items() if per_variant]
  variants = list(dict.fromkeys(name for v in versions for name in statistics[v]))
  x = np.arange(len(variants))
  width = min(0.35, 0.8 / max(1, len(versions)))
  fig, (tau_ax, regret_ax) = plt.subplots(1, 2, figsize=(2 * max(4.0, 1.1 * len(variants) + 1.5),
                                                          3.6))
  for j, version in enumerate(versions):
    color = f'C{j}'
    at = x + width * (j - (len(versions) - 1) / 2)
    found = [statistics[version].get(name) for name in variants]
    tau = np.array([s['kendall_tau'] if s else np.nan for s in found], float)
    low, high = np.array([s['kendall_tau_ci95'] if s else [np.nan, np.nan] for s in found],
                         float).T
    regret = np.array([100 * s['regret'] if s else np.nan for s in found], float)
    tau_ax.bar(at, np.nan_to_num(tau), width, color=color, label=version)
    tau_ax.vlines(at, low, high, color='0.15', linewidth=1)
    tau_ax.scatter(np.concatenate([at, at]), np.concatenate([low, high]), marker='_',
                   color='0.15', s=30, linewidths=1)
    for xi, t in zip(at, tau):
      tau_ax.annotate('n/a' if not np.isfinite(t) else f'{t:+.2f}', (xi, 0), fontsize=6,
                      ha='center', va='bottom' if not np.isfinite(t) or t < 0 else 'top',
                      xytext=(0, 2 if not np.isfinite(t) or t < 0 else -2),
                      textcoords='offset points')
    regret_ax.bar(at, np.nan_to_num(regret), width, color=color, label=version)
    for xi, r in zip(at, regret):
      if np.isfinite(r):
        regret_ax.annotate(f'{r:.1f}', (xi, r), fontsize=6, ha='center', va='bottom',
                           xytext=(0, 1), textcoords='offset points')
  tau_ax.axhline(0, color='0.4', linewidth=0.8)
  tau_ax.set_ylim(-1.05, 1.05)
  tau_ax.set_ylabel("Kendall's tau with the real ranking", fontsize=8)
  tau_ax.set_title('rank agreement (bars: tau; lines: 95% interval)', fontsize=9)
  regret_ax.set_ylim(bottom=0)
  regret_ax.set_ylabel('regret (accuracy points)', fontsize=8)
  regret_ax.set_title('best real accuracy minus that of the top-1 pick', fontsize=9)
  for ax in (tau_ax, regret_ax):
    ax.set_xticks(x, variants, rotation=20, fontsize=7)
    ax.tick_params(labelsize=7)
    if len(versions) > 1:
      ax.legend(fontsize=7)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return _save(fig, path)
