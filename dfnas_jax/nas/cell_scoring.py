"""Scoring many NAS-Bench-201 cells with the zero-cost estimators (`zero_cost`): the
images they read and the resumable loop over the cells, with progress (the
`zero_cost_study` and `zero_shot` stages)."""
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import periodic_actions

from dfnas_jax import teachers
from dfnas_jax import workdir as wd
from dfnas_jax.data import input_pipeline as ip
from dfnas_jax.train import loop


def read_images(source: ip.DataSource, image_size: int, augment: str) -> np.ndarray:
  """Every image of `source` in its evaluation view ([N, H, W, 3] in [0, 1]): a synthetic
  canvas's centre window with augment='crop'."""
  images = []
  for batch in ip.eval_batches(source, 256, image_size, augment):
    keep = batch['mask'].reshape(-1) > 0
    images.append(batch['image'].reshape((-1,) + batch['image'].shape[2:])[keep])
  return np.concatenate(images)


def teacher_soft_labels(teacher: str, checkpoint: str = '') -> Callable[[np.ndarray], np.ndarray]:
  """softmax of the teacher's logits on images of any size (resized to its input size, as
  the stages label a student's view), loaded once."""
  module, variables, spec = teachers.load(teacher, checkpoint or None)
  resized = teachers.AtInputSize(module, spec.image_size)
  apply = jax.jit(lambda x: jax.nn.softmax(resized.apply(variables, x, train=False)))
  return lambda images: np.asarray(apply(jnp.asarray(images)))


def labelled_batches(images: np.ndarray, rows: np.ndarray, batch_size: int, num_batches: int,
                     soft_labels: Callable[[np.ndarray], np.ndarray]):
  """[(images, soft labels)] * num_batches: consecutive `batch_size` of `rows` of `images`,
  with `soft_labels` of them (`teacher_soft_labels`)."""
  batches = []
  for b in range(num_batches):
    x = images[rows[b * batch_size:(b + 1) * batch_size]]
    batches.append((jnp.asarray(x), jnp.asarray(soft_labels(x))))
  return batches


def score_cells(path: str, strings: Sequence[str], score: Callable[[int], Dict[str, Any]],
                workdir: str, header: Optional[Dict[str, Any]] = None,
                save_every: int = 20) -> List[Dict[str, Any]]:
  """[score(i) for every cell i], resumably: `path` holds {'benchmark_strings': the cells
  scored so far, 'cells': their records, **header}, saved every `save_every` cells and at
  the end; a rerun reads them back and continues after the last. A file of other cells (a
  prefix of other strings) or another `header` is an error. Progress: cells/s and the ETA
  (clu's ReportProgress, as steps, to WORKDIR's metrics and the log) and a log line at
  every save."""
  header = header or {}
  saved = (wd.read_json(path) if os.path.exists(path)
           else {'benchmark_strings': [], 'cells': [], **header})
  if (saved['benchmark_strings'] != list(strings[:len(saved['benchmark_strings'])])
      or any(saved.get(k) != v for k, v in header.items())):
    raise ValueError(f'{path} holds the scores of other cells or settings (another seed, '
                     'table, space or batch): use a new work directory.')
  done: List[Dict[str, Any]] = saved['cells']
  if done:
    logging.info('Read back the scores of %d of %d cells from %s.', len(done), len(strings),
                 path)
  report = periodic_actions.ReportProgress(num_train_steps=len(strings),
                                           writer=loop.make_writer(workdir), every_secs=30)
  start, first = time.time(), len(done)
  for i in range(len(done), len(strings)):
    done.append(score(i))
    report(i + 1)
    if (i + 1) % save_every == 0 or i + 1 == len(strings):
      if jax.process_index() == 0:
        wd.write_json(path, {**header, 'benchmark_strings': list(strings[:len(done)]),
                             'cells': done})
      rate = (time.time() - start) / (i + 1 - first)
      logging.info('Scored %d/%d cells (%.2f cells/s; ETA %.1f min at this run\'s pace).',
                   i + 1, len(strings), 1 / rate, rate * (len(strings) - i - 1) / 60)
  return done
