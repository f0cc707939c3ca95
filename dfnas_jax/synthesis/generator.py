"""Generator mode of the synthesis (`method='generator'`): canvases made by a small
convolutional generator that is carried from batch to batch.

Each batch starts from the carried generator and fresh latents (one per image, from the
image's key), optimizes both for the resolution stages' steps against the same loss as
the per-image inversion (classification toward the targets, BatchNorm statistics, TV,
l2; random windows of the canvas, low then full resolution), writes what the adapted
generator makes, and moves the carried generator toward the adapted one by `meta_step`
(Reptile; 1 keeps the adapted one). The reuse is Fast-Datafree's (Fang et al., AAAI
2022): later batches start from a generator that already makes plausible images, so
they need far fewer steps than inverting noise. The first batch, from random weights,
runs `first_batch_factor` times the steps.

The carried generator is saved after every batch (before the batch's shard), so a killed
run resumes from the one the last written shard left, and makes the same bytes.
"""
import dataclasses
import functools
import os
from typing import Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dfnas_jax import workdir as wd
from dfnas_jax.synthesis import inversion


@dataclasses.dataclass(frozen=True)
class GeneratorSettings:
  """Made from a synthesis config's `generator` block (configs/synthesize.py)."""
  latent_dim: int
  channels: int
  lr: float            # Adam on the generator's weights
  latent_lr: float     # Adam on the latents
  meta_step: float
  first_batch_factor: int


def settings_from_config(config) -> GeneratorSettings:
  g = config.generator
  return GeneratorSettings(latent_dim=g.latent_dim, channels=g.channels, lr=g.lr,
                           latent_lr=g.latent_lr, meta_step=g.meta_step,
                           first_batch_factor=g.first_batch_factor)


def inversion_settings(config) -> inversion.Settings:
  """The inversion's Settings with the generator's own warm-up steps."""
  return dataclasses.replace(inversion.settings_from_config(config),
                             warmup_steps=config.generator.warmup_steps)


def check_config(config) -> None:
  g = config.generator
  canvas = inversion.settings_from_config(config).canvas
  if canvas % 4:
    raise ValueError(f'The generator upsamples twice by 2: the canvas ({canvas}) must be a '
                     'multiple of 4.')
  if g.latent_dim < 1 or g.channels < 8 or g.channels % 8:
    raise ValueError(f'generator.latent_dim must be positive and generator.channels a '
                     f'positive multiple of 8, got {g.latent_dim} and {g.channels}.')
  if not 0.0 < g.meta_step <= 1.0:
    raise ValueError(f'generator.meta_step must be in (0, 1], got {g.meta_step}.')
  if g.first_batch_factor < 1:
    raise ValueError(f'generator.first_batch_factor must be >= 1, got {g.first_batch_factor}.')


class Generator(nn.Module):
  """latents [B, latent_dim] -> canvases [B, canvas, canvas, 3] in [low, high]."""
  canvas: int
  channels: int

  @nn.compact
  def __call__(self, z, low, high):
    side, wide = self.canvas // 4, 2 * self.channels
    x = nn.Dense(wide * side * side)(z).reshape(-1, side, side, wide)
    for features in (wide, self.channels):
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
      x = nn.Conv(features, (3, 3))(x)
      # Per-image normalization: an image does not depend on the others in its batch,
      # nor on how the batch is split over devices.
      x = nn.GroupNorm(num_groups=8)(x)
      x = nn.leaky_relu(x, 0.2)
    x = nn.Conv(3, (3, 3))(x)
    return low + (high - low) * nn.sigmoid(x)


class GeneratorInverter(inversion.Inverter):
  """An Inverter whose parameters are {'generator': weights (replicated), 'latent':
  [per_device, latent_dim]} and whose canvases are the generator's output."""

  def __init__(self, *args, generator_settings: GeneratorSettings, **kwargs):
    super().__init__(*args, **kwargs)
    self.g = generator_settings
    self.generator = Generator(self.settings.canvas, self.g.channels)

  def canvas_of(self, params):
    return self.generator.apply({'params': params['generator']}, params['latent'],
                                *self.bounds())

  def per_image(self, params):
    return params['latent']

  def project(self, params):
    return params  # the generator's output is bounded by construction

  def reduce_gradient(self, grad, axis_name: Optional[str]):
    grad = super().reduce_gradient(grad, axis_name)
    # The generator is shared: its gradient is every device's images' (with 'device',
    # the mean of the shards' losses).
    reduce = jax.lax.psum if axis_name else jax.lax.pmean
    return dict(grad, generator=reduce(grad['generator'], inversion.AXIS))

  def optimizer(self, num_steps: int) -> optax.GradientTransformation:
    s = self.settings
    adam = lambda lr: optax.adam(self.schedule(lr, num_steps), b1=s.beta1, b2=s.beta2,
                                 eps=s.eps)
    labels = lambda params: {
        'generator': jax.tree_util.tree_map(lambda _: 'generator', params['generator']),
        'latent': 'latent'}
    return optax.multi_transform({'generator': adam(self.g.lr), 'latent': adam(self.g.latent_lr)},
                                 labels)

  def init_weights(self, seed: int):
    """The generator's random initial weights (host numpy), the same on every host."""
    z = jnp.zeros((1, self.g.latent_dim), jnp.float32)
    params = self.generator.init(jax.random.PRNGKey(seed), z, *self.bounds())['params']
    return jax.device_get(params)

  def latents(self, keys):
    """Each image's initial latent, from its key."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0x5EED),
                                                (self.g.latent_dim,)))(keys)

  @functools.cached_property
  def latents_fn(self):
    return jax.pmap(self.latents, axis_name=inversion.AXIS)

  def adapt(self, weights, targets: np.ndarray, keys: jax.Array, first: bool, on_chunk=None,
            name: str = 'batch'):
    """(uint8 canvases, logits, the carried weights after this batch) for one
    device-sharded batch, starting from the carried `weights` (host numpy)."""
    latent = self.latents_fn(keys)
    params = {'generator': flax.jax_utils.replicate(weights), 'latent': latent}
    stages = [(f, steps * (self.g.first_batch_factor if first else 1)) for f, steps in self.stages]
    params = self.optimize(params, targets, keys, on_chunk, name, stages)
    images, logits = self.finish(params)
    adapted = jax.device_get(flax.jax_utils.unreplicate(params['generator']))
    carried = jax.tree_util.tree_map(
        lambda old, new: (old + self.g.meta_step * (new - old)).astype(np.float32),
        weights, adapted)
    return images, logits, carried


def state_path(workdir: str, shard: int) -> str:
  return os.path.join(workdir, 'generator', f'after_shard_{shard:05d}.msgpack')


def save(workdir: str, shard: int, weights) -> None:
  """The carried generator after `shard`, written whole (temporary name, then renamed)."""
  path = state_path(workdir, shard)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  wd.atomic_write_bytes(path, flax.serialization.msgpack_serialize(
      jax.tree_util.tree_map(np.asarray, weights)))


def load(workdir: str, shard: int, like):
  """The carried generator saved after `shard`, checked against the structure of `like`."""
  path = state_path(workdir, shard)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'{path} is missing: shard {shard} of the synthetic dataset was written without the '
        'generator it left, so the next shards cannot be made as an uninterrupted run '
        'makes them. Delete the shards after the last one with a saved generator, or the '
        'whole work directory, and rerun.')
  with open(path, 'rb') as f:
    return flax.serialization.from_bytes(like, f.read())
