"""Stage `spos`: data-free Single Path One-Shot NAS, end to end.

  synthesize (or reuse)  ->  split: supernet-train / search-validation
  -> supernet training (one uniformly sampled path per step, distillation)
  -> evolutionary search (BN recalibration + held-out accuracy per candidate)
  -> retrain the best architecture from scratch -> evaluate on real data

Each phase has its own directory under WORKDIR and resumes from it: the synthetic
shards, the supernet's orbax checkpoints, the search's per-generation state and
the retrain checkpoints. A rerun after a kill continues where it stopped.
"""
import os
import time
from typing import Callable, NamedTuple, Tuple

import jax
import ml_collections
import numpy as np
from absl import logging

from dfnas_jax import models
from dfnas_jax import workdir as wd
from dfnas_jax.data import input_pipeline as ip
from dfnas_jax.data import nasbench201
from dfnas_jax.evaluation import retrain
from dfnas_jax.models import nb201
from dfnas_jax.models import spos as spos_lib
from dfnas_jax.nas import common, evolution
from dfnas_jax.train import trainer

Arch = evolution.Arch


class OneShotSpace(NamedTuple):
  """What the SPOS search needs of a search space: an architecture is one choice
  in [0, num_choices) per layer (NAS-Bench-201: per edge of its cell)."""
  name: str  # the supernet's name for `models.build_model`
  num_layers: int
  num_choices: int
  choice_names: Tuple[str, ...]
  image_size: int
  cost: Callable[[Arch, int], Tuple[int, int]]  # (multiply-adds, parameters) for num_classes
  architecture_name: Callable[[Arch], str]


def one_shot_space(name: str) -> OneShotSpace:
  """A SPOS space (`models.spos.SPACES`) or a NAS-Bench-201 network ('nb201[-CxN]')."""
  if nb201.is_name(name):
    channels, cells, ops = nb201.parse_name(name)
    if ops is not None:
      raise ValueError(f'space={name!r} names one cell; the search space is {name.split(":")[0]!r}.')
    return OneShotSpace(name, nb201.NUM_EDGES, len(nb201.OPS), nb201.OPS, 32,
                        lambda a, classes: nb201.cost(a, classes, channels, cells),
                        lambda a: nb201.architecture_name(a, channels, cells))
  if name not in spos_lib.SPACES:
    raise ValueError(f'space={name!r}: expected one of {sorted(spos_lib.SPACES)} or a '
                     "NAS-Bench-201 network 'nb201' / 'nb201-<C>x<N>'.")
  space = spos_lib.SPACES[name]
  return OneShotSpace(name, space.num_layers, spos_lib.NUM_CHOICES, spos_lib.CHOICES,
                      space.image_size, lambda a, classes: spos_lib.cost(space, a, classes),
                      lambda a: spos_lib.architecture_name(name, a))


class PathSampler:
  """Uniform paths, redrawn until their FLOPs fall in [flops_min, flops_max] (MFLOPs)."""

  def __init__(self, space: OneShotSpace, num_classes: int, flops_min: float,
               flops_max: float, max_tries: int = 10000):
    self.space, self.num_classes = space, num_classes
    self.flops_min, self.flops_max, self.max_tries = flops_min, flops_max, max_tries

  def mflops(self, arch: Arch) -> float:
    return self.space.cost(arch, self.num_classes)[0] / 1e6

  def valid(self, arch: Arch) -> bool:
    f = self.mflops(arch)
    return f >= self.flops_min and (self.flops_max <= 0 or f <= self.flops_max)

  def __call__(self, rng: np.random.Generator) -> Arch:
    for _ in range(self.max_tries):
      arch = tuple(int(c) for c in rng.integers(self.space.num_choices,
                                                size=self.space.num_layers))
      if self.valid(arch):
        return arch
    uniform = [self.mflops((c,) * self.space.num_layers) for c in range(self.space.num_choices)]
    raise ValueError(f'No path in {self.max_tries} uniform draws has FLOPs in '
                     f'[{self.flops_min}, {self.flops_max}] M; widen the band (paths using one '
                     f'choice everywhere cost {", ".join(f"{u:.2f}" for u in uniform)} M).')


def train_supernet(config, workdir: str, model, train_source: ip.DataSource,
                   sampler: PathSampler, teacher):
  """trainer.fit with `config.supernet`, one path from `sampler` per step.

  The path of step s depends only on (config.seed, s), on every host, so a
  resumed run trains the same paths.
  """
  n_dev = jax.local_device_count()

  def add_path(step, batch):
    arch = sampler(np.random.default_rng([config.seed, step]))
    return dict(batch, arch=np.tile(np.asarray(arch, np.int32), (n_dev, 1)))

  return trainer.fit(config.supernet, workdir, model, train_source, None, teacher,
                     add_to_batch=add_path)


def subnet_evaluator(config, model, variables, train_source: ip.DataSource,
                     val_source: ip.DataSource) -> common.SubnetEvaluator:
  """Scores paths of the trained supernet: `config.calibration_batches` augmented
  training batches recalibrate BatchNorm, `val_source` measures accuracy."""
  s = config.supernet
  batches = ip.train_batches(train_source, config.calibration_batch_size, s.image_size,
                             s.augment, config.seed + 1)
  calibration = [next(batches) for _ in range(config.calibration_batches)]
  held_out = list(ip.eval_batches(val_source, config.calibration_batch_size, s.image_size,
                                  s.augment))
  return common.SubnetEvaluator(model, variables, calibration, held_out)


def run(config: ml_collections.ConfigDict, workdir: str):
  start = time.time()
  dtype = models.compute_dtype(config.compute_dtype)  # a bad name fails before synthesis
  table = nasbench201.load(config.benchmark_table) if config.benchmark_table else None
  space = one_shot_space(config.space)
  if space.image_size != config.supernet.image_size:
    raise ValueError(f'Space {config.space!r} is for {space.image_size} px inputs but '
                     f'supernet.image_size is {config.supernet.image_size}.')
  if table is not None and space.choice_names != nb201.OPS:
    raise ValueError(f'benchmark_table is a NAS-Bench-201 table, but space={config.space!r} '
                     "is not a NAS-Bench-201 space ('nb201' or 'nb201-<C>x<N>').")
  data = common.search_data(config, workdir, per_class=config.val_per_class)
  phase_times = {'data_s': data.seconds}
  train_source, val_source = data.train, data.val
  num_classes = train_source.num_classes
  sampler = PathSampler(space, num_classes, config.flops_min, config.flops_max)

  teacher = retrain.distillation_teacher(config.supernet.loss, config)

  # Supernet.
  t = time.time()
  model = models.build_model(config.space, num_classes, dtype, dropout=config.dropout)
  supernet = train_supernet(config, os.path.join(workdir, 'supernet'), model, train_source,
                            sampler, teacher)
  phase_times['supernet_s'] = time.time() - t

  # Search.
  t = time.time()
  evaluator = subnet_evaluator(config, model, supernet['state'].variables, train_source,
                               val_source)

  def searchable(arch):  # the reference searches under a FLOPs limit, not the band
    return config.search_flops_max <= 0 or sampler.mflops(arch) <= config.search_flops_max

  search = evolution.EvolutionarySearch(
      evolution.EvolutionSettings(**config.search.to_dict()), space.num_layers,
      space.num_choices, valid=searchable, score=evaluator, sample=sampler,
      seed=config.seed, state_path=os.path.join(workdir, 'search', 'state.json'))
  best, best_accuracy = search.run()
  phase_times['search_s'] = time.time() - t
  best_name = space.architecture_name(best)
  flops, params = space.cost(best, num_classes)
  logging.info('Best architecture %s: %.2f MFLOPs, %d params, search accuracy %.4f',
               best_name, flops / 1e6, params, best_accuracy)

  # Retrain from scratch on the same data, evaluate on real data if configured.
  t = time.time()
  final = common.retrain_architecture(config, best_name, data, config.supernet.loss,
                                      os.path.join(workdir, 'retrain'))
  phase_times['retrain_s'] = time.time() - t

  summary = {
      'stage': 'spos', 'space': config.space, 'best_architecture': best_name,
      'best_choices': list(best), 'best_choice_names': [space.choice_names[c] for c in best],
      'flops_m': flops / 1e6, 'params': params,
      'search_val_accuracy': best_accuracy, **data.info,
      **common.final_results(config, final),
      **(table.summary_entry(best) if table is not None else {}),
      'search_history': search.history,
      'wall_time_s': {k: round(v, 1) for k, v in phase_times.items()},
  }
  summary['wall_time_s']['total_s'] = round(time.time() - start, 1)
  wd.write_summary(workdir, summary)
  return summary

