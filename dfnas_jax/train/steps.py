"""Losses, metrics and the pmap-ed train/eval steps shared by every trainer."""
import functools

import flax
import flax.jax_utils
import jax
import jax.numpy as jnp
import optax
from clu import metrics

AXIS = 'batch'


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def distillation_loss(student_logits, teacher_logits, temperature: float):
  """Soft cross-entropy -sum softmax(t/T) log_softmax(s/T), per example (reference form)."""
  targets = jax.nn.softmax(teacher_logits / temperature)
  return -jnp.sum(targets * jax.nn.log_softmax(student_logits / temperature), axis=-1)


def classification_loss(logits, batch, loss: str, label_smoothing: float, temperature: float):
  """Per-example loss: hard-label cross-entropy or distillation on `batch['logits']`."""
  if loss == 'cross_entropy':
    return cross_entropy(logits, batch['label'], label_smoothing)
  if loss == 'distillation':
    return distillation_loss(logits, batch['logits'], temperature)
  raise ValueError(f"loss must be 'cross_entropy' or 'distillation', got {loss!r}")


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  loss: metrics.Average.from_output('loss')
  accuracy: metrics.Accuracy
  learning_rate: metrics.LastValue.from_output('learning_rate')


@flax.struct.dataclass
class EvalMetrics(metrics.Collection):
  loss: metrics.Average.from_output('loss')
  accuracy: metrics.Accuracy


def model_inputs(batch):
  """Keyword arguments for the model beyond the images.

  A SPOS supernet's path `arch` or a DARTS network's architecture weights `alphas`.
  """
  inputs = {}
  if 'arch' in batch:
    inputs['architecture'] = batch['arch']
  if 'alphas' in batch:
    inputs['alphas'] = batch['alphas']
  return inputs


def with_teacher_targets(batch, teacher_apply, teacher_variables):
  """`batch` with the teacher's logits on its (augmented) images as soft labels."""
  teacher_logits = jax.lax.stop_gradient(
      teacher_apply(teacher_variables, batch['image'], train=False))
  return dict(batch, logits=teacher_logits, label=jnp.argmax(teacher_logits, -1))


def auxiliary_logits(intermediates):
  """Logits an auxiliary head sowed as `intermediates/aux_logits`, or None."""
  sown = intermediates.get('aux_logits')
  return sown[0] if sown else None


def train_step(state, batch, teacher_variables=None, *, learning_rate_fn,
               loss='cross_entropy', label_smoothing=0.0, temperature=1.0, teacher_apply=None,
               dropout_rng=None, aux_weight=0.0, after_update=None):
  """One SGD step on a device shard; gradients and BN statistics averaged over AXIS.

  With `teacher_apply`, the soft labels for distillation are the teacher's logits
  on this (augmented) batch instead of the stored `batch['logits']`. A batch with
  an `arch` trains that path of a supernet; `after_update(new_state, state, batch)`
  then applies the search method's rule to the update (SPOS:
  `layers.keep_unused_choices`). A model that sows `aux_logits` (DARTS networks'
  auxiliary head) adds `aux_weight` times their loss.
  """
  if teacher_apply is not None:
    batch = with_teacher_targets(batch, teacher_apply, teacher_variables)

  if dropout_rng is None:
    dropout_rng = jax.random.PRNGKey(0)
  rngs = {'dropout': jax.random.fold_in(jax.random.fold_in(dropout_rng, state.step),
                                        jax.lax.axis_index(AXIS))}

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, batch['image'],
        train=True, mutable=['batch_stats', 'intermediates'], rngs=rngs, **model_inputs(batch))
    value = classification_loss(logits, batch, loss, label_smoothing, temperature).mean()
    aux = auxiliary_logits(updates.get('intermediates', {}))
    if aux is not None and aux_weight:
      value += aux_weight * classification_loss(
          aux, batch, loss, label_smoothing, temperature).mean()
    return value, (logits, updates.get('batch_stats', {}))

  (value, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = jax.lax.pmean(grads, AXIS)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  if after_update is not None:  # a search method's own rule, e.g. SPOS's unused choices
    new_state = after_update(new_state, state, batch)
  step_metrics = TrainMetrics.gather_from_model_output(
      axis_name=AXIS, loss=value, logits=logits, labels=batch['label'],
      learning_rate=learning_rate_fn(state.step))
  return new_state, step_metrics


def eval_step(variables, batch, *, apply_fn):
  """Masked loss/accuracy on a padded eval batch (hard labels)."""
  logits = apply_fn(variables, batch['image'], train=False, **model_inputs(batch))
  return EvalMetrics.gather_from_model_output(
      axis_name=AXIS, loss=cross_entropy(logits, batch['label']), logits=logits,
      labels=batch['label'], mask=batch['mask'])


def replicate(tree, devices=None):
  """`tree` on every local device (or on `devices`), laid out as pmap-ed steps return it.

  flax's `replicate` gives a different sharding than a pmap output, which made
  the second step compile the whole train step again (10 s to minutes on CPU).
  """
  return _pmap_identity(flax.jax_utils.replicate(tree, devices))


_pmap_identity = jax.pmap(lambda tree: tree, axis_name=AXIS)


def pmap_train_step(**kwargs):
  """pmap-ed train_step(state, batch[, replicated teacher variables])."""
  return jax.pmap(functools.partial(train_step, **kwargs), axis_name=AXIS, donate_argnums=(0,))


def pmap_eval_step(apply_fn):
  return jax.pmap(functools.partial(eval_step, apply_fn=apply_fn), axis_name=AXIS)


def pmap_batch_stats_step(model):
  """pmap-ed (variables, batch) -> the BatchNorm statistics of this batch alone.

  `model` needs a `bn_momentum` field: at momentum 0 the updated running
  statistics are exactly the (cross-replica) batch statistics.
  """
  calibrating = model.clone(bn_momentum=0.0)

  def batch_stats(variables, batch):
    _, updates = calibrating.apply(
        variables, batch['image'], train=True, mutable=['batch_stats'],
        rngs={'dropout': jax.random.PRNGKey(0)}, **model_inputs(batch))
    return updates['batch_stats']

  return jax.pmap(batch_stats, axis_name=AXIS)


def mean_batch_stats(p_batch_stats, variables, batches):
  """BatchNorm statistics for (replicated) `variables`: the mean over `batches` of
  each batch's statistics (SPOS's per-path recalibration, SWA's BN update)."""
  total, count = None, 0
  for batch in batches:
    stats = p_batch_stats(variables, batch)
    total = stats if total is None else jax.tree_util.tree_map(jnp.add, total, stats)
    count += 1
  if not count:
    raise ValueError('Recomputing BatchNorm statistics needs at least one batch.')
  return jax.tree_util.tree_map(lambda s: s / count, total)
