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

import jax
import ml_collections
import numpy as np
from absl import logging

from dfnas_jax import models
from dfnas_jax import workdir as wd
from dfnas_jax.data import input_pipeline as ip
from dfnas_jax.evaluation import retrain
from dfnas_jax.models import spos as spos_lib
from dfnas_jax.nas import common, evolution
from dfnas_jax.train import trainer

Arch = evolution.Arch


class PathSampler:
  """Uniform paths, redrawn until their FLOPs fall in [flops_min, flops_max] (MFLOPs)."""

  def __init__(self, space: spos_lib.SearchSpace, num_classes: int, flops_min: float,
               flops_max: float, max_tries: int = 10000):
    self.space, self.num_classes = space, num_classes
    self.flops_min, self.flops_max, self.max_tries = flops_min, flops_max, max_tries

  def mflops(self, arch: Arch) -> float:
    return spos_lib.cost(self.space, arch, self.num_classes)[0] / 1e6

  def valid(self, arch: Arch) -> bool:
    f = self.mflops(arch)
    return f >= self.flops_min and (self.flops_max <= 0 or f <= self.flops_max)

  def __call__(self, rng: np.random.Generator) -> Arch:
    for _ in range(self.max_tries):
      arch = tuple(int(c) for c in rng.integers(spos_lib.NUM_CHOICES, size=self.space.num_layers))
      if self.valid(arch):
        return arch
    uniform = [self.mflops((c,) * self.space.num_layers) for c in range(spos_lib.NUM_CHOICES)]
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
  data = common.search_data(config, workdir, lambda _, classes: common.held_out_splits(
      config, classes))
  phase_times = {'data_s': data.seconds}
  train_source, val_source = data.train, data.val
  num_classes = train_source.num_classes
  space = spos_lib.SPACES[config.space]
  if space.image_size != config.supernet.image_size:
    raise ValueError(f'Space {config.space!r} is for {space.image_size} px inputs but '
                     f'supernet.image_size is {config.supernet.image_size}.')
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
      spos_lib.NUM_CHOICES, valid=searchable, score=evaluator, sample=sampler,
      seed=config.seed, state_path=os.path.join(workdir, 'search', 'state.json'))
  best, best_accuracy = search.run()
  phase_times['search_s'] = time.time() - t
  best_name = spos_lib.architecture_name(config.space, best)
  flops, params = spos_lib.cost(space, best, num_classes)
  logging.info('Best architecture %s: %.2f MFLOPs, %d params, search accuracy %.4f',
               best_name, flops / 1e6, params, best_accuracy)

  # Retrain from scratch on the same data, evaluate on real data if configured.
  t = time.time()
  final = common.retrain_architecture(config, best_name, data, config.supernet.loss,
                                      os.path.join(workdir, 'retrain'))
  phase_times['retrain_s'] = time.time() - t

  summary = {
      'stage': 'spos', 'space': config.space, 'best_architecture': best_name,
      'best_choices': list(best), 'best_choice_names': [spos_lib.CHOICES[c] for c in best],
      'flops_m': flops / 1e6, 'params': params,
      'search_val_accuracy': best_accuracy, 'search_val_split': data.val_split,
      'supernet_train_split': data.train_split, **data.info,
      **common.final_results(config, final),
      'search_history': search.history,
      'wall_time_s': {k: round(v, 1) for k, v in phase_times.items()},
  }
  summary['wall_time_s']['total_s'] = round(time.time() - start, 1)
  wd.write_summary(workdir, summary)
  return summary

