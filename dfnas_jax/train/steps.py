"""Losses, metrics and the pmap-ed train/eval steps shared by every trainer."""
import functools

import flax
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


def train_step(state, batch, teacher_variables=None, *, learning_rate_fn,
               loss='cross_entropy', label_smoothing=0.0, temperature=1.0, teacher_apply=None):
  """One SGD step on a device shard; gradients and BN statistics averaged over AXIS.

  With `teacher_apply`, the soft labels for distillation are the teacher's logits
  on this (augmented) batch instead of the stored `batch['logits']`.
  """
  if teacher_apply is not None:
    teacher_logits = teacher_apply(teacher_variables, batch['image'], train=False)
    batch = dict(batch, logits=jax.lax.stop_gradient(teacher_logits),
                 label=jnp.argmax(teacher_logits, -1))

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, batch['image'],
        train=True, mutable=['batch_stats'])
    per_example = classification_loss(logits, batch, loss, label_smoothing, temperature)
    return per_example.mean(), (logits, updates['batch_stats'])

  (value, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = jax.lax.pmean(grads, AXIS)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  step_metrics = TrainMetrics.gather_from_model_output(
      axis_name=AXIS, loss=value, logits=logits, labels=batch['label'],
      learning_rate=learning_rate_fn(state.step))
  return new_state, step_metrics


def eval_step(variables, batch, *, apply_fn):
  """Masked loss/accuracy on a padded eval batch (hard labels)."""
  logits = apply_fn(variables, batch['image'], train=False)
  return EvalMetrics.gather_from_model_output(
      axis_name=AXIS, loss=cross_entropy(logits, batch['label']), logits=logits,
      labels=batch['label'], mask=batch['mask'])


def pmap_train_step(**kwargs):
  """pmap-ed train_step(state, batch[, replicated teacher variables])."""
  return jax.pmap(functools.partial(train_step, **kwargs), axis_name=AXIS, donate_argnums=(0,))


def pmap_eval_step(apply_fn):
  return jax.pmap(functools.partial(eval_step, apply_fn=apply_fn), axis_name=AXIS)
