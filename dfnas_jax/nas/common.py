"""What every NAS stage shares: the data it searches on and the final retraining."""
import os
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import flax
import flax.jax_utils
import jax
import numpy as np
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from dfnas_jax import teachers
from dfnas_jax import workdir as wd
from dfnas_jax.data import input_pipeline as ip
from dfnas_jax.synthesis import synthesize
from dfnas_jax.train import checkpointing, loop, retrain
from dfnas_jax.train import state as state_lib
from dfnas_jax.train import steps, trainer


class SubnetEvaluator:
  """Scores a path of a one-shot supernet without recompiling per path (SPOS, ProxylessNAS).

  BatchNorm statistics are recomputed for the path as the average of the batch
  statistics of `calibration` batches, then accuracy is measured on the held-out
  batches. The reference resets the running statistics and sets momentum=None,
  which makes them this same average, except that PyTorch averages each batch's
  unbiased variance (n / (n - 1) times the biased one averaged here: 0.2% at 512
  values per channel).
  """

  def __init__(self, model, variables, calibration, held_out):
    self.rvariables = steps.replicate(variables)
    self.calibration, self.held_out = calibration, held_out
    self.p_batch_stats = steps.pmap_batch_stats_step(model)
    self.p_eval = steps.pmap_eval_step(model.apply)

  def set_variables(self, replicated_variables) -> None:
    """Scores the supernet with these (already replicated) variables from now on."""
    self.rvariables = replicated_variables

  def __call__(self, arch: Sequence[int]) -> float:
    n_dev = jax.local_device_count()
    arch = np.tile(np.asarray(arch, np.int32), (n_dev, 1))
    calibration = (dict(batch, arch=arch) for batch in self.calibration)
    stats = steps.mean_batch_stats(self.p_batch_stats, self.rvariables, calibration)
    variables = {'params': self.rvariables['params'], 'batch_stats': stats}
    held_out = (dict(batch, arch=arch) for batch in self.held_out)
    return trainer.evaluate_batches(variables, held_out, self.p_eval)['accuracy']


class SearchState(flax.struct.PyTreeNode):
  """A differentiable search's network weights (with BN statistics and SGD state),
  architecture logits and their optimizer state."""
  weights: state_lib.TrainState
  alphas: Any
  arch_opt_state: Any


def restore_search(workdir: str, config, state: SearchState,
                   num_steps: int) -> Tuple[ocp.CheckpointManager, SearchState, int, List[Dict]]:
  """(checkpoint manager, state, start step, history) of a search in `workdir`.

  Resumes from the latest checkpoint. Per-epoch history entries logged after it
  are dropped, since those epochs are redone.
  """
  mngr = checkpointing.manager(os.path.join(workdir, 'checkpoints'), config.keep_checkpoints,
                               config.checkpoint_every_steps)
  restored = checkpointing.restore_latest(mngr, state)
  if restored is None:
    return mngr, state, 0, []
  start_step = int(restored.weights.step)
  logging.info('Resuming the search from step %d of %d.', start_step, num_steps)
  history_path = os.path.join(workdir, 'history.json')
  history = wd.read_json(history_path) if os.path.exists(history_path) else []
  return mngr, restored, start_step, [h for h in history if h['step'] <= start_step]


def save_search(mngr: ocp.CheckpointManager, workdir: str, step: int, rstate: SearchState,
                history: List[Dict], epoch_end: bool) -> None:
  """Checkpoints replicated `rstate`; at an epoch's end first the history that ends it."""
  if jax.process_index() == 0 and epoch_end:
    wd.write_json(os.path.join(workdir, 'history.json'), history)
  checkpointing.save(mngr, step, jax.device_get(flax.jax_utils.unreplicate(rstate)),
                     force=epoch_end)


def run_search(search_loop: loop.Loop, state: SearchState, step_fn: loop.StepFn, *, config,
               mngr: ocp.CheckpointManager, workdir: str, history: List[Dict],
               steps_per_epoch: int, on_epoch_end) -> SearchState:
  """A search's steps (DARTS, ProxylessNAS) from `state`: logged and checkpointed as
  `config` says and at every epoch's end, where `on_epoch_end(step, epoch, rstate,
  scalars)` records the epoch (in `history`, saved with its checkpoint). Returns the
  final state on the host."""
  def log(step, rstate, scalars, at_epoch_end):
    if at_epoch_end:
      on_epoch_end(step, -(-step // steps_per_epoch), rstate, scalars)

  rstate = search_loop.run(
      steps.replicate(state), step_fn, name='search', log_every_steps=config.log_every_steps,
      checkpoint_every_steps=config.checkpoint_every_steps,
      save=lambda step, rstate, at_epoch_end: save_search(mngr, workdir, step, rstate, history,
                                                          at_epoch_end),
      boundary=lambda step: step % steps_per_epoch == 0, on_log=log)
  mngr.wait_until_finished()
  return jax.device_get(flax.jax_utils.unreplicate(rstate))


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
  if per_class is not None and s.method == 'inversion' and per_class >= made:
    raise ValueError(
        f'val_per_class={per_class} holds out all {made} images the synthesis makes of each '
        f'of the {num_classes} classes (synthesis.images_per_round={s.images_per_round}, '
        f'num_rounds={s.num_rounds}), leaving none to train on: lower val_per_class to at '
        f'most {made - 1} or synthesize more images.')
  if stored_logits:
    trainer.check_stored_view('the synthesized data', augment, image_size, *ip.synthetic_view(s))


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


def search_data(config, workdir: str, per_class: Optional[int] = None,
                fraction: Optional[float] = None) -> SearchData:
  """`synthetic_data`, split into (train, held-out) sources.

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
  a class the data has few images of (noise, uncalibrated synthesis) is not emptied. Synthetic datasets are written round
  by round, so a random draw mixes every round into both sides.
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


RETRAIN_DATA = ('synthetic', 'real')


def retrain_data(config) -> List[str]:
  """config.retrain_data as a list: 'synthetic', 'real' or both, in the given order."""
  names = [n.strip() for n in config.retrain_data.split(',') if n.strip()]
  if not names or len(set(names)) != len(names) or not set(names) <= set(RETRAIN_DATA):
    raise ValueError(f'retrain_data must be one or both of {RETRAIN_DATA} (comma-separated), '
                     f'got {config.retrain_data!r}')
  return names


def check_real_data(config) -> None:
  """Resolves the real data a search ends with (its evaluation split, a real retraining
  split and the retraining schedule on it) before any work, so a missing or misnamed
  dataset, or a warm-up longer than the schedule on it, fails first."""
  if config.eval_dataset:
    ip.get_source(config.eval_dataset, config.eval_split, config.eval_data_dir, config.download)
  if 'real' in retrain_data(config):
    source = ip.get_source(config.real_dataset, config.real_train_split, config.real_data_dir,
                           config.download)
    trainer.schedule_steps(config.retrain, source, fields='retrain.')


def retrain_configs(config, architecture: str, dataset: str,
                    loss: str) -> Dict[str, ml_collections.ConfigDict]:
  """The retrain stage's config for each of `config.retrain_data`: `config.retrain` with
  the stage's teacher, evaluation data and training data.

  'synthetic' is all searched data (the whole synthetic `dataset`, or both configured
  real splits) with the search's `loss`; 'real' is the real training split with hard
  labels and label smoothing.
  """
  configs = {}
  for name in retrain_data(config):
    rc = ml_collections.ConfigDict(config.retrain.to_dict())
    rc.stage, rc.architecture, rc.download = 'retrain', architecture, config.download
    rc.teacher, rc.teacher_checkpoint = config.teacher, config.teacher_checkpoint
    rc.eval_dataset, rc.eval_data_dir, rc.eval_split = (config.eval_dataset,
                                                        config.eval_data_dir, config.eval_split)
    if name == 'synthetic':
      rc.dataset, rc.data_dir = dataset, config.data_dir
      rc.train_split = (f'{config.train_split}+{config.val_split}' if config.train_split
                        else 'train')
      rc.soft_labels, rc.loss = config.soft_labels, loss
    else:
      rc.dataset, rc.data_dir, rc.train_split = (config.real_dataset, config.real_data_dir,
                                                 config.real_train_split)
      rc.loss, rc.label_smoothing, rc.augment = ('cross_entropy', config.real_label_smoothing,
                                                 config.real_augment)
      rc.soft_labels = 'teacher'  # hard labels: no soft labels are read (and none stored)
    configs[name] = rc
  return configs


def retrain_architecture(config, architecture: str, data: SearchData, loss: str,
                         workdir: str) -> Dict[str, Dict[str, Any]]:
  """Trains the found `architecture` from scratch on each of `config.retrain_data`
  (`retrain_configs`), in `workdir` (synthetic) and `workdir`_real; {name: summary}."""
  return {name: retrain.run(rc, workdir if name == 'synthetic' else f'{workdir}_real')
          for name, rc in retrain_configs(config, architecture, data.dataset, loss).items()}


def wall_times(phases: Dict[str, float],
               finals: Dict[str, Dict[str, Any]]) -> Dict[str, float]:
  """summary.json's `wall_time_s`: seconds per phase, `retrain_s` from the retrained
  `finals`, and their sum; each phase counts the work it kept over every attempt."""
  times = dict(phases, retrain_s=sum(f['wall_time_s'] for f in finals.values()))
  times = {k: round(v, 1) for k, v in times.items()}
  return dict(times, total_s=round(sum(times.values()), 1))


def final_results(config, finals: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
  """summary.json's entries for the retrained architecture: the first of
  `config.retrain_data` as `final_accuracy`, every one under `final_by_train_data`."""
  first = finals[retrain_data(config)[0]]
  return {'final_accuracy': first['eval_accuracy'],
          'final_train_data': retrain_data(config)[0],
          'final_by_train_data': {name: {'accuracy': f['eval_accuracy'],
                                         'train_data': f"{f['train_data']} {f['train_split']}",
                                         'loss': f['loss'], 'model_dir': f['model_dir']}
                                  for name, f in finals.items()},
          'final_eval_data': (f'{config.eval_dataset} {config.eval_split}'
                              if config.eval_dataset else None),
          'retrain_model_dir': first['model_dir']}
