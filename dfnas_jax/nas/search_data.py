"""The data a search runs on: synthesized from the stage's teacher (or reused, or
configured), checked before any work, and split class by class into train and held-out."""
import os
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import ml_collections
import numpy as np

from dfnas_jax import teachers
from dfnas_jax.data import input_pipeline as ip
from dfnas_jax.synthesis import synthesize
from dfnas_jax.train import trainer


def synthetic_data(config, workdir: str) -> Tuple[str, Dict[str, Any], float]:
  """The dataset to search on: configured, or synthesized (and reused) under WORKDIR from
  the stage's teacher; with summary.json's entries for it (the teacher it was synthesized
  from), and the seconds its synthesis took (over every attempt, done now or reused)."""
  if config.dataset:
    return config.dataset, {'dataset': config.dataset, 'synthesized': False}, 0.0
  summary = synthesize.load_or_run(synthesis_config(config), os.path.join(workdir, 'synthesize'))
  return summary['dataset_dir'], {'dataset': summary['dataset_dir'], 'synthesized': True,
                                 'num_images': summary['num_images'],
                                 'teacher': config.teacher}, summary['wall_time_s']


def synthesis_config(config) -> ml_collections.ConfigDict:
  """`config.synthesis` inverting the stage's teacher (`config.teacher`, its checkpoint):
  the one teacher a stage synthesizes from and distils."""
  synthesis = ml_collections.ConfigDict(config.synthesis.to_dict())
  synthesis.teacher, synthesis.teacher_checkpoint = config.teacher, config.teacher_checkpoint
  return synthesis


def check_synthesis(synthesis, stored_logits: bool, augment: str, image_size: int,
                    per_class: Optional[int] = None) -> None:
  """Checks the data a stage will synthesize, before any work: the synthesis config,
  whether each class makes enough images to hold `per_class` of them out, and whether
  `stored_logits` (distillation from the dataset's logits) label the trained view."""
  s = synthesis
  synthesize.check_config(s)
  num_classes = teachers.get(s.teacher).num_classes
  made = s.images_per_round * s.num_rounds // num_classes
  if per_class is not None and s.method != 'gaussian_noise' and per_class >= made:
    raise ValueError(
        f'val_per_class={per_class} holds out all {made} images the synthesis makes of each '
        f'of the {num_classes} classes (synthesis.images_per_round={s.images_per_round}, '
        f'num_rounds={s.num_rounds}), leaving none to train on: lower val_per_class to at '
        f'most {made - 1} or synthesize more images.')
  if stored_logits:
    trainer.check_stored_view('the synthesized data', augment, image_size, *ip.synthetic_view(s))


def reused_datasets(config, synthetic: Sequence[str]) -> Dict[str, str]:
  """`config.synthetic_datasets` ('variant=DIR,...'): synthetic sets made once (by the
  synthesize stage, a search or another study) that a study reads instead of synthesizing
  them. Each must name one of `synthetic` and hold as many images as `config.synthesis`
  makes, as the variants it synthesizes and its real_same_count do; checked before work."""
  reused = {}
  for entry in filter(None, (e.strip() for e in config.synthetic_datasets.split(','))):
    variant, sep, directory = (part.strip() for part in entry.partition('='))
    if not sep or not directory or variant not in synthetic:
      raise ValueError(f'synthetic_datasets: {entry!r} must be VARIANT=DIR with VARIANT one '
                       f'of the synthetic variants {list(synthetic)}.')
    count = ip.get_source(directory, 'train').num_examples
    expected = config.synthesis.images_per_round * config.synthesis.num_rounds
    if count != expected:
      raise ValueError(
          f'synthetic_datasets: {directory} holds {count} images, but the study compares '
          f'sets of synthesis.images_per_round x num_rounds = {expected}: set those to make '
          f'{count} (e.g. --config.synthesis.images_per_round={count // 2} '
          '--config.synthesis.num_rounds=2).')
    reused[variant] = directory
  return reused


def check_search_data(config, loss: str, augment: str, image_size: int,
                      per_class: Optional[int] = None) -> None:
  """`check_synthesis` for a search that trains with `loss` on `augment`ed views; a
  configured dataset is checked when it is read."""
  if not config.dataset:
    check_synthesis(synthesis_config(config),
                    loss == 'distillation' and config.soft_labels == 'stored',
                    augment, image_size, per_class)


class SearchData(NamedTuple):
  """The searched dataset, cut into the search's two splits."""
  dataset: str
  info: Dict[str, Any]  # for summary.json, including how it was split
  train: ip.DataSource
  val: ip.DataSource
  seconds: float  # spent synthesizing the dataset, over every attempt


def load(config, workdir: str, per_class: Optional[int] = None,
         fraction: Optional[float] = None) -> SearchData:
  """The searched dataset (`synthetic_data`), split into (train, held-out) sources.

  Explicit `config.train_split`/`val_split` (real data) are used as given.
  Otherwise each class gives `per_class` random images (one-shot searches'
  validation, the reference's `val_per_class`), or a `fraction` of its images
  (DARTS's architecture half), to the held-out side; see `class_balanced_rows`.
  """
  if bool(config.train_split) != bool(config.val_split):
    raise ValueError('Set both train_split and val_split, or neither (then the searched '
                     'dataset is split class by class at random).')
  dataset, info, seconds = synthetic_data(config, workdir)
  source = lambda split: ip.get_source(dataset, split, config.data_dir, config.download)
  if config.train_split:
    info.update(search_train_split=config.train_split, search_val_split=config.val_split)
    return SearchData(dataset, info, source(config.train_split), source(config.val_split),
                      seconds)
  whole = source('train')
  feature = class_feature(whole)
  train_rows, val_rows = class_balanced_rows(ip.read_column(whole, feature), config.seed,
                                             per_class=per_class, fraction=fraction)
  info.update(search_train_split='train', search_val_split={
      'class_feature': feature, 'seed': config.seed, 'per_class': per_class,
      'fraction': fraction, 'rows': list(val_rows)})
  return SearchData(dataset, info, ip.subset(whole, train_rows), ip.subset(whole, val_rows),
                    seconds)


def class_feature(source: ip.DataSource) -> str:
  """The class an image is filed under: its synthesis target if it has one (as the
  reference files synthetic images), else its label."""
  return 'target_label' if 'target_label' in source.builder.info.features else 'label'


def class_balanced_rows(labels: Sequence[int], seed: int, per_class: Optional[int] = None,
                        fraction: Optional[float] = None) -> Tuple[List[int], List[int]]:
  """(kept, held-out) positions: per class, random images drawn by `seed`.

  Each class holds out `per_class` of its images (the reference holds out 8 of
  ImageNet's 10 per class), or `fraction` of them, and always keeps at least one:
  a class the data has few images of (noise, uncalibrated synthesis) is not emptied.
  Synthetic datasets are written round by round, so a random draw mixes every round into
  both sides.
  """
  if (per_class is None) == (fraction is None):
    raise ValueError('Give exactly one of per_class and fraction.')
  if (per_class is not None and per_class < 1) or (fraction is not None
                                                   and not 0 < fraction <= 0.5):
    raise ValueError(f'Hold out per_class >= 1 or fraction in (0, 0.5] images of each class; '
                     f'got per_class={per_class}, fraction={fraction}.')
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  held = []
  for c in np.unique(labels):
    rows = rng.permutation(np.flatnonzero(labels == c))
    count = per_class if per_class is not None else int(len(rows) * fraction)
    held += rows[:min(count, len(rows) - 1)].tolist()
  held_set = set(held)
  if not held:
    raise ValueError(f'No class of the {len(labels)} images has two images to split.')
  return [r for r in range(len(labels)) if r not in held_set], sorted(held)
