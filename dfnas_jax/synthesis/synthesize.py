"""Stage `synthesize`: invert a teacher into a TFDS dataset of images and soft labels.

Images are made in rounds (recursive label calibration). Round 0 aims at
balanced hard classes; round r starts from fresh noise and aims image k at
softmax of the logits the teacher gave image k of round r-1. The stored logits
(the soft label) are the teacher's logits on the finished image's centre window,
the view a student sees at evaluation time.

Work is done and saved one batch at a time (one TFRecord shard per batch), so a
killed run resumes at the first missing shard; with the same seed the dataset is
identical to that of an uninterrupted run.
"""
import hashlib
import json
import os
from typing import Optional

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from clu import periodic_actions
from jax.experimental import multihost_utils

from dfnas_jax import models, plots, teachers
from dfnas_jax import workdir as wd
from dfnas_jax.synthesis import generator as generator_lib
from dfnas_jax.synthesis import inversion
from dfnas_jax.synthesis.writer import ShardWriter
from dfnas_jax.train import loop

METHODS = ('inversion', 'generator', 'gaussian_noise')


def hard_targets(num_images: int, num_classes: int, seed: int) -> np.ndarray:
  """Balanced classes: consecutive blocks of `num_classes` images are permutations."""
  rng = np.random.default_rng(seed)
  blocks = -(-num_images // num_classes)
  return np.concatenate([rng.permutation(num_classes) for _ in range(blocks)])[:num_images]


def resolution_stages(config):
  """[(downsampling factor, steps)] of the method: low then full resolution, or full only."""
  if config.method == 'gaussian_noise':
    return []
  steps = config.generator if config.method == 'generator' else config
  if config.multi_resolution:
    return [(config.low_res_factor, steps.low_res_steps), (1, steps.full_res_steps)]
  return [(1, steps.low_res_steps + steps.full_res_steps)]


def check_config(config, num_local_devices: Optional[int] = None,
                 num_processes: Optional[int] = None) -> None:
  """Checks against this job's devices and processes unless told others."""
  num_local_devices = num_local_devices or jax.local_device_count()
  num_processes = num_processes or jax.process_count()
  teachers.get(config.teacher)  # a bad name or directory fails before any work
  if config.method not in METHODS:
    raise ValueError(f'method must be one of {METHODS}, got {config.method!r}')
  if config.batch_size < 1 or config.images_per_round < 1:
    raise ValueError(f'batch_size and images_per_round must be positive, got '
                     f'{config.batch_size} and {config.images_per_round}.')
  if config.batch_size % num_local_devices:
    raise ValueError(f'batch_size={config.batch_size} must be divisible by the number of '
                     f'local devices ({num_local_devices}).')
  if config.images_per_round % config.batch_size:
    raise ValueError(f'images_per_round={config.images_per_round} must be a multiple of '
                     f'batch_size={config.batch_size}.')
  if (config.images_per_round // config.batch_size) % num_processes:
    raise ValueError(f'The {config.images_per_round // config.batch_size} batches per round '
                     f'must divide evenly over {num_processes} processes.')
  if config.num_rounds < 1:
    raise ValueError(f'num_rounds must be >= 1, got {config.num_rounds}')
  if config.method == 'generator':
    generator_lib.check_config(config)


# Fields that change how a run is shown or split into dispatches, not the images.
_NOT_IN_FINGERPRINT = ('stage', 'output_dir', 'chunk_steps', 'preview_images')
# The per-image inversion's own fields, which generator mode does not read.
_INVERSION_ONLY = ('lr', 'low_res_steps', 'full_res_steps', 'warmup_steps')


def fingerprint(config) -> str:
  """A hash of every config field that determines the dataset: the generator's only in
  generator mode, the per-image inversion's own only outside it."""
  skip = _NOT_IN_FINGERPRINT + (_INVERSION_ONLY if config.method == 'generator'
                                else ('generator',))
  fields = {k: v for k, v in config.to_dict().items() if k not in skip}
  return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def output_dir(config, workdir: str) -> str:
  return os.path.abspath(config.output_dir or os.path.join(workdir, 'synthetic'))


def load_or_run(config: ml_collections.ConfigDict, workdir: str):
  """The summary of the dataset `config` synthesizes into `workdir`: reused when its
  summary exists there (after checking that it is this config's, complete, where this
  work directory says), else synthesized (resuming whatever shards exist)."""
  summary_path = os.path.join(workdir, 'summary.json')
  if not os.path.exists(summary_path):
    return run(config, workdir)
  summary = wd.read_json(summary_path)
  if summary.get('config_fingerprint') != fingerprint(config):
    raise ValueError(f'{workdir} holds a dataset synthesized with another config (fingerprint '
                     f'{summary.get("config_fingerprint")}, this config {fingerprint(config)}): '
                     'use another work directory, or delete that one to synthesize anew.')
  directory = output_dir(config, workdir)  # not the summary's path: work directories move
  try:
    num_examples = tfds.builder_from_directory(directory).info.splits['train'].num_examples
  except Exception as e:  # missing or unreadable metadata
    raise ValueError(f'{summary_path} describes a dataset in {directory}, but that is not a '
                     f'complete TFDS dataset ({e}).') from e
  if num_examples != summary['num_images']:
    raise ValueError(f'{directory} holds {num_examples} images, but {summary_path} describes '
                     f'{summary["num_images"]}.')
  logging.info('Reusing the synthetic dataset in %s.', directory)
  return dict(summary, dataset_dir=directory)


def softmax(logits: np.ndarray) -> np.ndarray:
  z = np.exp(logits - logits.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def run(config: ml_collections.ConfigDict, workdir: str):
  n_dev, n_proc = jax.local_device_count(), jax.process_count()
  check_config(config, n_dev, n_proc)
  module, variables, spec = teachers.load(config.teacher, config.teacher_checkpoint or None,
                                          dtype=models.compute_dtype(config.compute_dtype))
  batch = config.batch_size  # a host makes whole batches (shards) on its local devices
  batches_per_round = config.images_per_round // config.batch_size
  num_shards = config.num_rounds * batches_per_round
  settings = (generator_lib.inversion_settings(config) if config.method == 'generator'
              else inversion.settings_from_config(config))
  stages = resolution_stages(config)
  steps_per_batch = sum(steps for _, steps in stages)
  out_dir = output_dir(config, workdir)
  writer = ShardWriter(out_dir, num_shards, spec.num_classes, settings.canvas)
  if config.method == 'generator':
    inverter = generator_lib.GeneratorInverter(
        module.apply, variables, module.mean, module.std, settings, stages, config.chunk_steps,
        generator_settings=generator_lib.settings_from_config(config))
  else:
    inverter = inversion.Inverter(module.apply, variables, module.mean, module.std, settings,
                                  stages, config.chunk_steps)
  classes = hard_targets(config.images_per_round, spec.num_classes, config.seed)

  # Each host owns whole batch columns (all rounds of batch b), so the round r-1
  # logits that round r calibrates against are always its own.
  mine = [r * batches_per_round + b for r in range(config.num_rounds)
          for b in range(batches_per_round) if b % n_proc == jax.process_index()]
  todo = [s for s in mine if not writer.exists(s)]
  logging.info('Synthesis: %d of %d shards of %d images to do on this host (%d already done).',
               len(todo), len(mine), config.batch_size, len(mine) - len(todo))
  stopwatch = wd.Stopwatch(workdir, len(mine) - len(todo))
  weights = None
  if config.method == 'generator' and todo:  # this host's chain of generators, in shard order
    start = mine.index(todo[0])
    if todo != mine[start:]:
      raise ValueError(f'{out_dir}: generator mode makes shards in order, but the written '
                       f"ones are not the first of this host's ({sorted(set(mine) - set(todo))}).")
    weights = inverter.init_weights(config.seed)
    if start:
      weights = generator_lib.load(workdir, mine[start - 1], weights)
  # The steps each shard takes: the generator's first batch runs first_batch_factor times them.
  shard_steps = {s: steps_per_batch * (config.generator.first_batch_factor if weights is not None
                                       and s == mine[0] else 1) for s in todo}
  metric_writer = loop.make_writer(workdir)
  report = periodic_actions.ReportProgress(
      num_train_steps=max(sum(shard_steps.values()), 1), writer=metric_writer, every_secs=30)
  offset = 0

  for done_shards, shard in enumerate(todo):
    round_index, b = divmod(shard, batches_per_round)
    indices = np.arange(b * batch, (b + 1) * batch)
    if round_index > 0 and config.label_calibration:
      targets = softmax(writer.read(shard - batches_per_round)['logits'])
    else:
      targets = np.eye(spec.num_classes, dtype=np.float32)[classes[indices]]
    keys = inversion.image_keys(config.seed, round_index, indices)

    def on_chunk(steps_done, terms, offset=offset):
      report(offset + steps_done)
      metric_writer.write_scalars(offset + steps_done, {f'loss_{k}': v for k, v in terms.items()})

    sharded = (targets.reshape(n_dev, -1, spec.num_classes),
               keys.reshape(n_dev, -1, *keys.shape[1:]))
    name = f'round {round_index}, batch {b}'
    if weights is not None:
      images, logits, weights = inverter.adapt(weights, *sharded, shard == mine[0], on_chunk,
                                               name=name)
      generator_lib.save(workdir, shard, weights)  # before the shard: a resume needs both
    else:
      images, logits = inverter.synthesize(*sharded, on_chunk, name=name)
    images, logits = images.reshape(batch, *images.shape[2:]), logits.reshape(batch, -1)
    writer.write(shard, [
        {'image': images[i], 'logits': logits[i], 'label': int(logits[i].argmax()),
         'target_label': int(targets[i].argmax()), 'round': round_index}
        for i in range(batch)])
    logging.info('Synthesized round %d batch %d: %d/%d shards on this host.', round_index, b,
                 len(mine) - len(todo) + done_shards + 1, len(mine))
    stopwatch.mark(len(mine) - len(todo) + done_shards + 1)
    offset += shard_steps[shard]

  if n_proc > 1:
    multihost_utils.sync_global_devices('synthesis shards written')
  summary = None
  if jax.process_index() == 0:
    missing = [s for s in range(num_shards) if not writer.exists(s)]
    if missing:
      raise RuntimeError(f'Shards {missing} of {out_dir} are missing after all hosts finished.')
    writer.finalize(
        description=f'Images synthesized from teacher {spec.name} by dfnas_jax.',
        metadata={'teacher': spec.name, 'config': json.loads(config.to_json_best_effort())})
    summary = _summarize(config, workdir, writer, spec, num_shards, stopwatch.seconds())
  if n_proc > 1:  # the others go on to read the dataset: wait until it is complete
    multihost_utils.sync_global_devices('synthetic dataset finalized')
    if summary is None:
      summary = wd.read_json(os.path.join(workdir, 'summary.json'))
  return summary


def _summarize(config, workdir, writer, spec, num_shards, wall_time):
  records = [writer.read(s) for s in range(num_shards)]
  logits = np.concatenate([r['logits'] for r in records])
  target = np.concatenate([r['target_label'] for r in records])
  probs = softmax(logits)
  first = records[0]
  names = spec.class_names or [str(i) for i in range(spec.num_classes)]
  captions = []
  for p in softmax(first['logits'][:config.preview_images]):
    top = np.argsort(-p)[:2]
    captions.append('\n'.join(f'{names[c]} {p[c]:.2f}' for c in top))
  plots.image_grid(first['image'][:config.preview_images], captions,
                   os.path.join(workdir, 'preview.png'))
  summary = {
      'stage': 'synthesize', 'teacher': spec.name, 'method': config.method,
      'dataset_dir': writer.directory, 'config_fingerprint': fingerprint(config),
      'num_images': int(len(logits)),
      'num_rounds': config.num_rounds, 'image_size': int(first['image'].shape[1]),
      'label_calibration': config.label_calibration, 'regional_update': config.regional_update,
      'multi_resolution': config.multi_resolution,
      'teacher_agrees_with_target': float(np.mean(logits.argmax(-1) == target)),
      'mean_teacher_confidence': float(probs.max(-1).mean()),
      'class_histogram': np.bincount(logits.argmax(-1), minlength=spec.num_classes).tolist(),
      'wall_time_s': wall_time,
  }
  wd.write_summary(workdir, summary)
  return summary
