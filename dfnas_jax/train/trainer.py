"""Supervised and distillation training (`fit`), shared by the teacher and retrain stages."""
import os
from typing import Any, Callable, Dict, Optional, Tuple

import flax.jax_utils
import flax.linen as nn
import jax
import ml_collections
from absl import logging

from dfnas_jax.data import input_pipeline as ip
from dfnas_jax.train import checkpointing, loop, steps
from dfnas_jax.train import state as state_lib


def evaluate(variables, source: ip.DataSource, batch_size: int, image_size: int,
             augment: str, apply_fn=None, p_eval_step=None) -> Dict[str, float]:
  """Loss and accuracy of replicated `variables` over a whole split (padding masked out)."""
  return evaluate_batches(variables, ip.eval_batches(source, batch_size, image_size, augment),
                          p_eval_step or steps.pmap_eval_step(apply_fn))


def evaluate_batches(variables, batches, p_eval_step) -> Dict[str, float]:
  """Loss and accuracy of replicated `variables` over padded, masked eval batches."""
  total = None
  for batch in batches:
    m = flax.jax_utils.unreplicate(p_eval_step(variables, batch))
    total = m if total is None else total.merge(m)
  return {k: float(v) for k, v in total.compute().items()}


LOSSES = ('cross_entropy', 'distillation')


def check_config(config) -> None:
  """The fields `fit` reads, checked before any data or weights are read."""
  if config.loss not in LOSSES:
    raise ValueError(f'loss must be one of {LOSSES}, got {config.loss!r}')
  if config.augment not in ip.AUGMENTATIONS:
    raise ValueError(f'augment must be one of {ip.AUGMENTATIONS}, got {config.augment!r}')
  if config.lr_schedule not in state_lib.LR_SCHEDULES:
    raise ValueError(f'lr_schedule must be one of {state_lib.LR_SCHEDULES}, '
                     f'got {config.lr_schedule!r}')
  if config.batch_size < 1 or config.image_size < 1:
    raise ValueError(f'batch_size and image_size must be positive, got {config.batch_size} '
                     f'and {config.image_size}')
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise ValueError('Set num_train_steps or num_epochs to a positive number; got '
                     f'{config.num_train_steps} and {config.num_epochs}.')


def require_soft_labels(loss: str, teacher, source: ip.DataSource, augment: str,
                        image_size: int) -> None:
  """Distillation without a teacher reads the dataset's stored `logits`, which must
  label the view it trains on."""
  if loss != 'distillation' or teacher:
    return
  if not source.has_logits:
    raise ValueError(f'Distillation needs soft labels: dataset {source.builder.name!r} has no '
                     "`logits` feature, so configure a teacher to compute them "
                     "(soft_labels='teacher').")
  view = ip.stored_logits_view(source)
  if view:
    check_stored_view(f'dataset {source.builder.name!r}', augment, image_size, *view)


def check_stored_view(data: str, augment: str, image_size: int, side: int, window: int) -> None:
  """One error when the stored logits of `data` do not label the trained view."""
  problem = ip.stored_logits_mismatch(augment, image_size, side, window)
  if problem:
    raise ValueError(f"soft_labels='stored' cannot teach {data}: {problem}. Use "
                     "soft_labels='teacher' (the teacher's logits on each trained view).")


def schedule_steps(config, source: ip.DataSource, fields: str = '') -> Tuple[int, int, int]:
  """(steps per epoch, total steps, warm-up steps) of `config`'s schedule on `source`:
  num_train_steps, else num_epochs, and warmup_epochs, in epochs of `source` at
  batch_size. A warm-up as long as the whole schedule fails here, naming the data and
  the config fields (`fields` + name)."""
  per_epoch = ip.steps_per_epoch(source, config.batch_size)
  total = config.num_train_steps if config.num_train_steps > 0 else int(
      config.num_epochs * per_epoch)
  warmup = int(config.warmup_epochs * per_epoch)
  if total <= warmup:
    length = (f'{fields}num_train_steps={config.num_train_steps}' if config.num_train_steps > 0
              else f'{fields}num_epochs={config.num_epochs}, {total} steps')
    raise ValueError(
        f'{fields}warmup_epochs={config.warmup_epochs} is {warmup} steps on '
        f'{source.builder.name!r} {source.split!r} ({source.num_examples} examples, '
        f'{per_epoch} steps per epoch at batch {config.batch_size}), not fewer than the whole '
        f'schedule ({length}): lower {fields}warmup_epochs.')
  return per_epoch, total, warmup


def fit(config: ml_collections.ConfigDict, workdir: str, model: nn.Module,
        train_source: ip.DataSource, eval_source: Optional[ip.DataSource],
        teacher: Optional[Tuple[nn.Module, Any]] = None,
        add_to_batch: Optional[Callable[[int, ip.Batch], ip.Batch]] = None,
        initial_variables: Optional[Dict[str, Any]] = None,
        after_update: Optional[Callable[[Any, Any, ip.Batch], Any]] = None) -> Dict[str, Any]:
  """Trains `model` from scratch (or resumes from `workdir/checkpoints`); returns results.

  `initial_variables` ({'params', 'batch_stats'}) replace the random
  initialization, to fine-tune; a checkpoint in `workdir` still wins.

  `teacher` = (module, variables) recomputes distillation targets on every
  augmented batch; without it, distillation uses the dataset's stored logits.
  `add_to_batch(step, batch)` can add inputs, e.g. the path a supernet trains, and
  `after_update(new_state, state, batch)` adjusts each step's update (steps.train_step).

  Uses config: seed, batch_size, num_epochs | num_train_steps, learning_rate,
  warmup_epochs, lr_schedule, momentum, nesterov, grad_clip, weight_decay, loss,
  label_smoothing, temperature, image_size, augment, log_every_steps,
  eval_every_steps, checkpoint_every_steps, keep_checkpoints.
  """
  check_config(config)
  require_soft_labels(config.loss, teacher, train_source, config.augment, config.image_size)
  steps_per_epoch, num_steps, warmup_steps = schedule_steps(config, train_source)
  lr_fn = state_lib.learning_rate_schedule(config.learning_rate, num_steps, warmup_steps,
                                           config.lr_schedule)
  tx = state_lib.sgd(lr_fn, config.momentum, config.weight_decay, config.nesterov,
                     config.grad_clip)
  state = state_lib.create_train_state(model, jax.random.PRNGKey(config.seed),
                                       config.image_size, tx, initial_variables)
  mngr = checkpointing.manager(os.path.join(workdir, 'checkpoints'),
                               config.keep_checkpoints, config.checkpoint_every_steps)
  state = checkpointing.restore_latest(mngr, state) or state
  start_step = int(state.step)
  if start_step:
    logging.info('Resuming from step %d of %d.', start_step, num_steps)
  train_loop = loop.Loop(workdir, start_step, num_steps)

  p_train_step = steps.pmap_train_step(
      learning_rate_fn=lr_fn, loss=config.loss, label_smoothing=config.label_smoothing,
      temperature=config.temperature, teacher_apply=teacher and teacher[0].apply,
      dropout_rng=jax.random.PRNGKey(config.seed + 1),
      aux_weight=config.get('aux_weight', 0.0), after_update=after_update)
  extra_args = (steps.replicate(teacher[1]),) if teacher else ()
  p_eval_step = steps.pmap_eval_step(model.apply)
  batches = flax.jax_utils.prefetch_to_device(
      ip.train_batches(train_source, config.batch_size, config.image_size, config.augment,
                       config.seed, start_step=start_step), 2)

  def train_step(rstate, step):
    batch = next(batches)
    if add_to_batch is not None:
      batch = add_to_batch(step, batch)
    rstate, m = p_train_step(rstate, batch, *extra_args)
    return rstate, {'train_': m}

  eval_results = {}

  def evaluate_now(step, rstate):
    if eval_source is not None and (step % config.eval_every_steps == 0 or step == num_steps):
      with train_loop.report.timed('eval'):
        eval_results.update(evaluate(rstate.variables, eval_source, config.batch_size,
                                     config.image_size, config.augment, p_eval_step=p_eval_step))
      train_loop.writer.write_scalars(step, {f'eval_{k}': v for k, v in eval_results.items()})

  def save(step, rstate, at_boundary):
    checkpointing.save(mngr, step, jax.device_get(flax.jax_utils.unreplicate(rstate)),
                       force=at_boundary)

  rstate = train_loop.run(steps.replicate(state), train_step, name='train',
                        log_every_steps=config.log_every_steps,
                        checkpoint_every_steps=config.checkpoint_every_steps, save=save,
                        after_step=evaluate_now)
  mngr.wait_until_finished()

  final = jax.device_get(flax.jax_utils.unreplicate(rstate))
  if eval_source is not None and not eval_results:  # Resumed after the last step.
    eval_results = evaluate(rstate.variables, eval_source, config.batch_size,
                            config.image_size, config.augment, p_eval_step=p_eval_step)
  return {'state': final, 'num_train_steps': num_steps, 'steps_per_epoch': steps_per_epoch,
          'eval': eval_results, 'wall_time_s': train_loop.stopwatch.seconds()}
