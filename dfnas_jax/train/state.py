"""TrainState with BatchNorm statistics, its initialization and the SGD optimizer."""
from typing import Any, Dict, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state


class TrainState(train_state.TrainState):
  batch_stats: Any = None

  @property
  def variables(self):
    return {'params': self.params, 'batch_stats': self.batch_stats}


def init_variables(model: nn.Module, rng: jax.Array, image_size: int):
  """Initial {'params', 'batch_stats'} of `model` for square RGB inputs."""
  dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  variables = jax.jit(lambda r: model.init(r, dummy, train=False))(rng)
  return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}


LR_SCHEDULES = ('cosine', 'linear')


def learning_rate_schedule(base_lr: float, total_steps: int, warmup_steps: int,
                           kind: str = 'cosine') -> optax.Schedule:
  """Linear warm-up, then cosine (or linear) decay to zero."""
  if total_steps <= warmup_steps:
    raise ValueError(f'total steps ({total_steps}) must exceed warm-up steps ({warmup_steps}).')
  decay_steps = total_steps - warmup_steps
  if kind == 'cosine':
    decay = optax.cosine_decay_schedule(base_lr, decay_steps)
  elif kind == 'linear':
    decay = optax.linear_schedule(base_lr, 0.0, decay_steps)
  else:
    raise ValueError(f'lr schedule must be one of {LR_SCHEDULES}, got {kind!r}')
  warmup = optax.linear_schedule(0.0, base_lr, warmup_steps)
  return optax.join_schedules([warmup, decay], [warmup_steps])


def kernels_only(params):
  """Weight-decay mask: tensors with more than one dimension (no BN scales or biases)."""
  return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def sgd(learning_rate: optax.Schedule, momentum: float, weight_decay: float,
        nesterov: bool = True, grad_clip: float = 0.0) -> optax.GradientTransformation:
  """SGD with weight decay on kernels, after clipping the gradient's global norm at
  `grad_clip` (> 0)."""
  tx = optax.chain(optax.add_decayed_weights(weight_decay, mask=kernels_only),
                   optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov))
  return optax.chain(optax.clip_by_global_norm(grad_clip), tx) if grad_clip > 0 else tx


def create_train_state(model: nn.Module, rng: jax.Array, image_size: int,
                       tx: optax.GradientTransformation,
                       variables: Optional[Dict[str, Any]] = None) -> TrainState:
  """A fresh state; `variables` ({'params', 'batch_stats'}) replace the random init."""
  if variables is None:
    variables = init_variables(model, rng, image_size)
  return TrainState.create(apply_fn=model.apply, params=variables['params'],
                           batch_stats=variables['batch_stats'], tx=tx)


class SearchState(flax.struct.PyTreeNode):
  """A differentiable search's network weights (with BN statistics and SGD state),
  architecture logits and their optimizer state."""
  weights: TrainState
  alphas: Any
  arch_opt_state: Any
