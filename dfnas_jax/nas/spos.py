"""Stage `spos`: data-free Single Path One-Shot NAS, end to end.

  synthesize (or reuse)  ->  split: supernet-train / search-validation
  -> supernet training (one path per step, FLOPs bins drawn uniformly, distillation)
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
from dfnas_jax.models import layers, nb201
from dfnas_jax.models import spos as spos_lib
from dfnas_jax.nas import evolution, retraining, search_data, subnets
from dfnas_jax.train import retrain, trainer

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
      raise ValueError(f'space={name!r} names one cell; '
                       f'the search space is {name.split(":")[0]!r}.')
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


PATH_SAMPLING = ('flops_uniform', 'uniform')
FLOPS_BINS = 7  # the reference cuts its 290-360 MFLOPs band into 10 MFLOPs bins
MAX_HALF_PATHS = 2 ** 22  # 'flops_uniform' keeps num_bins + 3 int64 arrays of up to this size


class PathSampler:
  """Paths whose FLOPs lie in [flops_min, flops_max] (MFLOPs; <= 0: unbounded).

  'flops_uniform', the reference's supernet training: the band is cut into
  `num_bins` equal bins, a bin holding at least one path is drawn uniformly, then
  a path uniformly among the bin's, so cheap and costly paths train about as often
  as the far more numerous mid-FLOPs ones. 'uniform': uniform paths, redrawn until
  they fall in the band.
  """

  def __init__(self, space: OneShotSpace, num_classes: int, flops_min: float,
               flops_max: float, mode: str = 'flops_uniform', num_bins: int = FLOPS_BINS,
               max_tries: int = 10000):
    if mode not in PATH_SAMPLING:
      raise ValueError(f'path_sampling={mode!r}: expected one of {PATH_SAMPLING}.')
    self.space, self.num_classes, self.mode = space, num_classes, mode
    self.flops_min, self.flops_max, self.max_tries = flops_min, flops_max, max_tries
    if mode == 'flops_uniform':
      self._count_bins(num_bins)

  def mflops(self, arch: Arch) -> float:
    return self.space.cost(arch, self.num_classes)[0] / 1e6

  def valid(self, arch: Arch) -> bool:
    f = self.mflops(arch)
    return f >= self.flops_min and (self.flops_max <= 0 or f <= self.flops_max)

  def _no_path(self, where: str) -> ValueError:
    uniform = [self.mflops((c,) * self.space.num_layers) for c in range(self.space.num_choices)]
    return ValueError(f'No path {where} has FLOPs in [{self.flops_min}, {self.flops_max}] M; '
                      'widen the band (paths using one choice everywhere cost '
                      f'{", ".join(f"{u:.2f}" for u in uniform)} M).')

  def _count_bins(self, num_bins: int):
    """Counts the paths of every bin exactly, by meeting in the middle.

    A path's multiply-adds are a constant plus one term per layer (its choice's),
    so with every sum `a` of the first half's terms and the sorted sums `b` of the
    second half's, the paths of a bin that start with `a` are one contiguous run
    of `b`: a bin's count is two binary searches per `a`, and its u-th path is
    found by two more. The reference instead rejects uniform paths until one
    lands in the drawn bin (500 tries, then any path): exact too, but a draw takes
    about 1 / (the bin's share of all paths) tries (spos_imagenet's 290-300 M bin
    holds 1.1% of them) and an empty bin cannot be told from a rare one.
    """
    n, c = self.space.num_layers, self.space.num_choices
    self._half = n // 2
    if c ** (n - self._half) > MAX_HALF_PATHS:
      raise ValueError(f'{c}**{n - self._half} half paths are too many for '
                       "path_sampling='flops_uniform'; use 'uniform'.")
    macs = lambda arch: self.space.cost(tuple(arch), self.num_classes)[0]
    base = macs([0] * n)
    terms = np.zeros((n, c), np.int64)
    for i in range(n):
      for choice in range(1, c):
        terms[i, choice] = macs([0] * i + [choice] + [0] * (n - i - 1)) - base
    if any(macs([choice] * n) != base + terms[:, choice].sum() for choice in range(c)):
      raise ValueError(f"Space {self.space.name!r}: FLOPs are not a sum over layers, which "
                       "path_sampling='flops_uniform' needs; use 'uniform'.")

    def sums(rows):  # every combination, the first row's choice the most significant digit
      total = np.zeros(1, np.int64)
      for row in rows:
        total = (total[:, None] + row).ravel()
      return total

    self._a = base + sums(terms[:self._half])
    b = sums(terms[self._half:])
    self._b_order = np.argsort(b, kind='stable')
    self._b = b[self._b_order]
    lo = self.flops_min * 1e6 if self.flops_min > 0 else self._a.min() + self._b[0]
    hi = self.flops_max * 1e6 if self.flops_max > 0 else self._a.max() + self._b[-1]
    # Bin k holds the multiply-adds in [edges[k], edges[k + 1]), integers (so are the
    # sums; searches compare integers), the last bin up to hi included.
    self._edges = np.ceil(np.linspace(lo, hi, num_bins + 1)).astype(np.int64)
    self._edges[-1] = int(np.floor(hi)) + 1
    starts = [np.searchsorted(self._b, e - self._a) for e in self._edges]
    self._cumulative = [np.cumsum(s1 - s0) for s0, s1 in zip(starts, starts[1:])]
    self.bin_counts = [int(cum[-1]) for cum in self._cumulative]
    self._bins = [k for k, count in enumerate(self.bin_counts) if count > 0]  # < 0 if min > max
    if not self._bins:
      raise self._no_path('of the space')

  def bin_of(self, arch: Arch) -> int:
    """The 'flops_uniform' bin of a path of the band."""
    return int(np.searchsorted(self._edges, self.space.cost(arch, self.num_classes)[0],
                               'right')) - 1

  def __call__(self, rng: np.random.Generator) -> Arch:
    n, c = self.space.num_layers, self.space.num_choices
    if self.mode == 'flops_uniform':
      k = self._bins[rng.integers(len(self._bins))]
      cumulative = self._cumulative[k]
      u = int(rng.integers(cumulative[-1]))  # the u-th path of the bin, ordered by (a, b)
      i = int(np.searchsorted(cumulative, u, 'right'))
      start = np.searchsorted(self._b, self._edges[k] - self._a[i])
      j = self._b_order[start + u - (cumulative[i - 1] if i else 0)]
      digits = (np.unravel_index(i, (c,) * self._half)
                + np.unravel_index(j, (c,) * (n - self._half)))
      return tuple(int(d) for d in digits)
    for _ in range(self.max_tries):
      arch = tuple(int(x) for x in rng.integers(c, size=n))
      if self.valid(arch):
        return arch
    raise self._no_path(f'in {self.max_tries} uniform draws')


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
                     add_to_batch=add_path, after_update=layers.keep_unused_choices)


def subnet_evaluator(config, model, variables, train_source: ip.DataSource,
                     val_source: ip.DataSource) -> subnets.SubnetEvaluator:
  """Scores paths of the trained supernet: `config.calibration_batches` augmented
  training batches recalibrate BatchNorm, `val_source` measures accuracy."""
  s = config.supernet
  batches = ip.train_batches(train_source, config.calibration_batch_size, s.image_size,
                             s.augment, config.seed + 1)
  calibration = [next(batches) for _ in range(config.calibration_batches)]
  held_out = list(ip.eval_batches(val_source, config.calibration_batch_size, s.image_size,
                                  s.augment))
  return subnets.SubnetEvaluator(model, variables, calibration, held_out)


def check_config(config) -> None:
  models.compute_dtype(config.compute_dtype)
  space = one_shot_space(config.space)
  if config.path_sampling not in PATH_SAMPLING:
    raise ValueError(f'path_sampling={config.path_sampling!r}: expected one of {PATH_SAMPLING}.')
  if space.image_size != config.supernet.image_size:
    raise ValueError(f'Space {config.space!r} is for {space.image_size} px inputs but '
                     f'supernet.image_size is {config.supernet.image_size}.')
  if config.benchmark_table and space.choice_names != nb201.OPS:
    raise ValueError(f'benchmark_table is a NAS-Bench-201 table, but space={config.space!r} '
                     "is not a NAS-Bench-201 space ('nb201' or 'nb201-<C>x<N>').")
  retrain.check_soft_labels(config)
  trainer.check_config(config.supernet)
  s = config.supernet
  search_data.check_search_data(config, s.loss, s.augment, s.image_size,
                                per_class=config.val_per_class)
  retraining.retrain_data(config)


def run(config: ml_collections.ConfigDict, workdir: str):
  check_config(config)  # before the table, the synthesis and the supernet
  retraining.check_real_data(config)
  dtype = models.compute_dtype(config.compute_dtype)
  table = nasbench201.load(config.benchmark_table) if config.benchmark_table else None
  space = one_shot_space(config.space)
  data = search_data.load(config, workdir, per_class=config.val_per_class)
  phase_times = {'data_s': data.seconds}
  train_source, val_source = data.train, data.val
  num_classes = train_source.num_classes
  sampler = PathSampler(space, num_classes, config.flops_min, config.flops_max,
                        config.path_sampling)

  teacher = retrain.distillation_teacher(config.supernet.loss, config)

  # Supernet.
  model = models.build_model(config.space, num_classes, dtype, dropout=config.dropout)
  supernet = train_supernet(config, os.path.join(workdir, 'supernet'), model, train_source,
                            sampler, teacher)
  phase_times['supernet_s'] = supernet['wall_time_s']

  # Search.
  t = time.time()
  evaluator = subnet_evaluator(config, model, supernet['state'].variables, train_source,
                               val_source)
  setup_s = time.time() - t

  def searchable(arch):  # the reference searches under a FLOPs limit, not the band
    return config.search_flops_max <= 0 or sampler.mflops(arch) <= config.search_flops_max

  search = evolution.EvolutionarySearch(
      evolution.EvolutionSettings(**config.search.to_dict()), space.num_layers,
      space.num_choices, valid=searchable, score=evaluator,
      # The reference's search draws its random candidates uniformly, not by FLOPs bin.
      sample=PathSampler(space, num_classes, config.flops_min, config.flops_max, 'uniform'),
      seed=config.seed, state_path=os.path.join(workdir, 'search', 'state.json'))
  best, best_accuracy = search.run()
  # The evaluator's set-up here, and every generation's time (kept in the search's state).
  phase_times['search_s'] = setup_s + sum(h['seconds'] for h in search.history)
  best_name = space.architecture_name(best)
  flops, params = space.cost(best, num_classes)
  logging.info('Best architecture %s: %.2f MFLOPs, %d params, search accuracy %.4f',
               best_name, flops / 1e6, params, best_accuracy)

  # Retrain from scratch on the same data, evaluate on real data if configured.
  final = retraining.retrain_architecture(config, best_name, data, config.supernet.loss,
                                          os.path.join(workdir, 'retrain'))

  summary = {
      'stage': 'spos', 'space': config.space, 'best_architecture': best_name,
      'best_choices': list(best), 'best_choice_names': [space.choice_names[c] for c in best],
      'flops_m': flops / 1e6, 'params': params,
      'search_val_accuracy': best_accuracy, **data.info,
      **retraining.final_results(config, final),
      **(table.summary_entry(best) if table is not None else {}),
      'search_history': search.history,
      'wall_time_s': retraining.wall_times(phase_times, final),
  }
  wd.write_summary(workdir, summary)
  return summary

