"""The pmap-ed inversion update: noise canvases optimized against a frozen teacher.

Each device holds its own shard of canvases (per-device batch) and runs whole
chunks of steps as one `lax.fori_loop` dispatch with donated buffers; the host
only looks at the loss terms between chunks. Randomness (initial noise, window
offsets, flips) comes from one PRNG key per image, so it does not depend on the
device layout, the batch an image sits in or the host. The BN-statistics and
TV-l2 terms couple the images of a batch: with `loss_batch='global'` they (and
the gradient) are the whole batch's on any number of devices, so the result does
not depend on the device count (up to rounding); with 'device', each device's shard
is its own batch.

Canvases live in the teacher's normalized input space (as in the reference:
N(0, 1) initialization, reference learning rates), clipped after every step to
the normalized image of [0, 1].
"""
import dataclasses
import functools
from typing import Callable, Optional, Sequence, Tuple

import flax.jax_utils
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dfnas_jax.synthesis import losses

AXIS = 'batch'
LOSS_TERMS = ('main', 'bn', 'tv_l2', 'tv_l1', 'l2')
LOSS_BATCHES = ('global', 'device')


@dataclasses.dataclass(frozen=True)
class Settings:
  """Static settings of one synthesis run (hashable: part of the compiled step).

  Made from a synthesis config by `settings_from_config`: the defaults and what each
  field means are in configs/synthesize.py, and nowhere else.
  """
  canvas: int                 # side of the optimized canvas, full resolution
  window: int                 # side of the region the teacher sees, full resolution
  regional_update: bool       # False: canvas == window, random roll by `jitter` instead
  jitter: int
  flip: bool
  lr: float
  beta1: float
  beta2: float
  eps: float
  warmup_steps: int
  weights: Tuple[Tuple[str, float], ...]  # (loss term, weight) for each of LOSS_TERMS
  first_bn_multiplier: float
  loss_batch: str             # batch-coupled terms over the whole batch | each device's shard

  def __post_init__(self):
    if self.regional_update and self.canvas < self.window:
      raise ValueError(f'canvas ({self.canvas}) must be at least window ({self.window}).')
    if not self.regional_update and self.canvas != self.window:
      raise ValueError('Without regional update the canvas must equal the window '
                       f'(got canvas={self.canvas}, window={self.window}).')
    unknown = set(dict(self.weights)) - set(LOSS_TERMS)
    if unknown:
      raise ValueError(f'Unknown loss terms {sorted(unknown)}; known: {LOSS_TERMS}')
    if self.loss_batch not in LOSS_BATCHES:
      raise ValueError(f'loss_batch must be one of {LOSS_BATCHES}, got {self.loss_batch!r}')


def settings_from_config(config) -> Settings:
  """The Settings of a synthesis config (configs/synthesize.py)."""
  canvas = config.canvas if config.regional_update else config.window
  return Settings(
      canvas=canvas, window=config.window, regional_update=config.regional_update,
      jitter=config.jitter, flip=config.flip, lr=config.lr, beta1=config.beta1,
      beta2=config.beta2, eps=config.eps, warmup_steps=config.warmup_steps,
      weights=(('main', config.main_weight), ('bn', config.bn_weight),
               ('tv_l2', config.tv_l2_weight), ('tv_l1', config.tv_l1_weight),
               ('l2', config.l2_weight)),
      first_bn_multiplier=config.first_bn_multiplier, loss_batch=config.loss_batch)


def image_keys(seed: int, round_index: int, image_indices: np.ndarray) -> jax.Array:
  """One PRNG key per image, from (seed, round, global image index)."""
  base = jax.random.fold_in(jax.random.PRNGKey(seed), round_index)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(image_indices, jnp.uint32))


def _pool(x, factor: int):
  if factor == 1:
    return x
  b, h, w, c = x.shape
  return x.reshape(b, h // factor, factor, w // factor, factor, c).mean((2, 4))


def sample_views(keys, step, factor: int, s: Settings):
  """Per-image window offsets (or jitter shifts) and flip flags for one step."""
  def one(key):
    key = jax.random.fold_in(jax.random.fold_in(key, factor), step)
    k_off, k_flip = jax.random.split(key)
    if s.regional_update:
      offsets = jax.random.randint(k_off, (2,), 0, (s.canvas - s.window) // factor + 1)
    else:
      offsets = jax.random.randint(k_off, (2,), -(s.jitter // factor), s.jitter // factor + 1)
    flip = jax.random.bernoulli(k_flip) if s.flip else jnp.array(False)
    return offsets, flip
  return jax.vmap(one)(keys)


def _selection(starts, flips, size: int, length: int, wrap: bool):
  """One-hot [batch, size, length] matrices picking `size` consecutive rows from
  `starts` (cyclically when `wrap`), in reverse order where `flips`."""
  index = starts[:, None] + jnp.arange(size)[None, :]
  index = jnp.mod(index, length) if wrap else index
  index = jnp.where(flips[:, None], index[:, ::-1], index)
  return jax.nn.one_hot(index, length, dtype=jnp.float32)


def view(canvas, offsets, flips, factor: int, s: Settings):
  """What the teacher sees: the (pooled) canvas, cut to the window, flipped per image.

  Cutting is a product with one-hot selection matrices rather than a per-image
  dynamic slice: XLA:CPU lowers batched dynamic slices to gather/scatter, which
  made the update 5x slower; the products are exact and cheap on every backend.
  """
  x = _pool(canvas, factor)
  size, length = s.window // factor, x.shape[1]
  # Regional update: window at `offsets`; otherwise a cyclic roll of the whole canvas.
  starts = offsets if s.regional_update else -offsets
  rows = _selection(starts[:, 0], jnp.zeros_like(flips), size, length, not s.regional_update)
  cols = _selection(starts[:, 1], flips, size, length, not s.regional_update)
  return jnp.einsum('bhH,bHWc,bwW->bhwc', rows, x, cols, precision=jax.lax.Precision.HIGHEST)


def centre_window(canvas, s: Settings):
  start = (s.canvas - s.window) // 2
  return canvas[:, start:start + s.window, start:start + s.window]


class Inverter:
  """Synthesizes one device-sharded batch of canvases toward given target distributions."""

  def __init__(self, apply_fn: Callable, variables, mean: Sequence[float],
               std: Sequence[float], settings: Settings, stages: Sequence[Tuple[int, int]],
               chunk_steps: int = 50, loop_on_device: Optional[bool] = None):
    for factor, _ in stages:
      if settings.canvas % factor or settings.window % factor:
        raise ValueError(f'canvas {settings.canvas} and window {settings.window} must be '
                         f'divisible by the resolution factor {factor}.')
    self.apply_fn = apply_fn
    self.variables = flax.jax_utils.replicate(variables)
    self.mean = jnp.asarray(mean, jnp.float32)
    self.std = jnp.asarray(std, jnp.float32)
    self.settings = settings
    self.stages = tuple(stages)
    self.chunk_steps = chunk_steps
    self.loop_on_device = (jax.default_backend() != 'cpu' if loop_on_device is None
                           else loop_on_device)

  # --- per-device functions (run under pmap) ---

  def loss_terms(self, canvas, targets, offsets, flips, variables, factor: int,
                 axis_name: Optional[str] = None):
    """(weighted total, terms); BN statistics and TV-l2 across `axis_name`'s devices if given."""
    s = self.settings
    x = view(canvas, offsets, flips, factor, s)
    weights = dict(s.weights)
    if weights.get('bn', 0.0):
      logits, stats = losses.apply_with_bn_statistics(self.apply_fn, variables,
                                                      x * self.std + self.mean, axis_name)
      bn = losses.bn_statistics_loss(stats, s.first_bn_multiplier)
    else:
      logits, bn = self.apply_fn(variables, x * self.std + self.mean, train=False), 0.0
    tv_l1, tv_l2 = losses.total_variation(x, axis_name)
    terms = {'main': losses.soft_cross_entropy(logits, targets), 'bn': jnp.asarray(bn),
             'tv_l2': tv_l2, 'tv_l1': tv_l1, 'l2': losses.image_l2(x)}
    total = sum(weights.get(k, 0.0) * v for k, v in terms.items())
    return total, terms

  def schedule(self, lr: float, num_steps: int) -> optax.Schedule:
    warmup = min(self.settings.warmup_steps, max(num_steps - 1, 0))
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup),
         optax.cosine_decay_schedule(lr, max(num_steps - warmup, 1))], [warmup])

  def optimizer(self, num_steps: int) -> optax.GradientTransformation:
    s = self.settings
    return optax.adam(self.schedule(s.lr, num_steps), b1=s.beta1, b2=s.beta2, eps=s.eps)

  # What is optimized: here the canvases themselves; a subclass may optimize what makes
  # them (synthesis/generator.py: a generator and its latents).

  def canvas_of(self, params):
    """The canvases (normalized input space) that `params` make."""
    return params

  def per_image(self, params):
    """The part of `params` with one entry per image (placed as the batch is)."""
    return params

  def bounds(self):
    """The normalized image of [0, 1]: where canvases must lie."""
    return -self.mean / self.std, (1.0 - self.mean) / self.std

  def project(self, params):
    return jnp.clip(params, *self.bounds())

  def reduce_gradient(self, grad, axis_name: Optional[str]):
    if axis_name:
      # pmap's gradient is that of the devices' summed losses: N copies of each whole-batch
      # term and N whole-batch means. Divided by N it is the one-batch gradient on any
      # number of devices (Adam's eps sees its scale).
      grad = jax.tree_util.tree_map(lambda g: g / jax.lax.psum(1, axis_name), grad)
    return grad

  def _step(self, params, opt_state, targets, keys, step, variables, bad_step, bad_terms, *,
            factor, stage_steps):
    """One Adam step on `params`; tracks the first step whose loss is not finite."""
    tx = self.optimizer(stage_steps)
    offsets, flips = sample_views(keys, step, factor, self.settings)
    axis_name = AXIS if self.settings.loss_batch == 'global' else None
    objective = lambda p: self.loss_terms(self.canvas_of(p), targets, offsets, flips, variables,
                                          factor, axis_name)
    (_, terms), grad = jax.value_and_grad(objective, has_aux=True)(params)
    grad = self.reduce_gradient(grad, axis_name)
    updates, opt_state = tx.update(grad, opt_state, params)
    params = self.project(optax.apply_updates(params, updates))
    # Keep the terms of the first non-finite step: later steps are all NaN.
    first_bad = (bad_step < 0) & ~jnp.all(jnp.stack([jnp.isfinite(v) for v in terms.values()]))
    bad_step = jnp.where(first_bad, step, bad_step)
    bad_terms = jax.tree_util.tree_map(lambda new, old: jnp.where(first_bad, new, old),
                                       terms, bad_terms)
    return params, opt_state, terms, bad_step, bad_terms

  def _run_chunk(self, params, opt_state, targets, keys, first_step, variables, bad_step,
                 bad_terms, *, factor, num_steps, stage_steps):
    def body(i, carry):
      return self._step(carry[0], carry[1], targets, keys, first_step + i, variables,
                        carry[3], carry[4], factor=factor, stage_steps=stage_steps)
    return jax.lax.fori_loop(0, num_steps, body,
                             (params, opt_state, bad_terms, bad_step, bad_terms))

  def _final(self, params, variables):
    """uint8 canvases and the teacher's logits on their centre windows."""
    pixels = self.canvas_of(params) * self.std + self.mean
    logits = self.apply_fn(variables, centre_window(pixels, self.settings), train=False)
    return jnp.round(jnp.clip(pixels, 0.0, 1.0) * 255).astype(jnp.uint8), logits

  def _init(self, keys):
    shape = (self.settings.canvas, self.settings.canvas, 3)
    noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0x5EED), shape))(keys)
    return jnp.clip(noise, *self.bounds())

  # --- host side ---

  @functools.lru_cache(maxsize=None)
  def chunk_fn(self, factor: int, num_steps: int, stage_steps: int):
    """pmap-ed (params, opt_state, targets, keys, first_step, variables, bad_step,
    bad_terms) -> (params, opt_state, last terms, bad_step, bad_terms) after
    `num_steps` steps: a device-side loop, or one step when num_steps is 0."""
    if num_steps:
      fn = functools.partial(self._run_chunk, factor=factor, num_steps=num_steps,
                             stage_steps=stage_steps)
    else:
      fn = functools.partial(self._step, factor=factor, stage_steps=stage_steps)
    return jax.pmap(fn, axis_name=AXIS, in_axes=(0, 0, 0, 0, None, 0, 0, 0),
                    donate_argnums=(0, 1))

  def advance(self, carry, targets, keys, factor: int, first_step: int, num_steps: int,
              stage_steps: int):
    """`num_steps` steps from `first_step`, with no host sync in between.

    On accelerators the steps run as one `lax.fori_loop` dispatch. XLA:CPU runs
    convolutions inside while-loop bodies about 7x slower than outside (measured:
    2.0 vs 0.30 s per ResNet-20 step at batch 128), so there each step is its own
    asynchronous dispatch with donated buffers.
    """
    params, opt_state, _, bad_step, bad_terms = carry
    if self.loop_on_device:
      return self.chunk_fn(factor, num_steps, stage_steps)(
          params, opt_state, targets, keys, first_step, self.variables, bad_step, bad_terms)
    step = self.chunk_fn(factor, 0, stage_steps)
    for i in range(num_steps):
      carry = step(carry[0], carry[1], targets, keys, first_step + i, self.variables,
                   carry[3], carry[4])
    return carry

  @functools.lru_cache(maxsize=None)
  def init_optimizer_fn(self, stage_steps: int):
    return jax.pmap(self.optimizer(stage_steps).init, axis_name=AXIS)

  @functools.cached_property
  def init_canvas_fn(self):
    return jax.pmap(self._init, axis_name=AXIS)

  @functools.cached_property
  def final_fn(self):
    return jax.pmap(self._final, axis_name=AXIS)

  def synthesize(self, targets: np.ndarray, keys: jax.Array, on_chunk=None,
                 name: str = 'batch'):
    """Canvases for `targets` [devices, per_device, classes] with per-image `keys`.

    `on_chunk(steps_done, terms)` is called between chunks with host floats of
    the last step's loss terms (averaged over devices). A non-finite loss raises
    FloatingPointError naming `name`, the step and the offending terms. Returns
    (uint8 canvases, logits), both [devices, per_device, ...] numpy arrays.
    """
    params = self.optimize(self.init_canvas_fn(keys), targets, keys, on_chunk, name)
    return self.finish(params)

  def optimize(self, params, targets: np.ndarray, keys: jax.Array, on_chunk=None,
               name: str = 'batch', stages: Optional[Sequence[Tuple[int, int]]] = None):
    """`params` (device-sharded) after the resolution `stages` (default the Inverter's),
    each with a fresh optimizer; see `synthesize`."""
    placed = self.per_image(params)
    n = placed.shape[0]
    # Every input placed as the step's outputs are (one shard per device): an input
    # placed otherwise would compile the step a second time.
    shard = lambda x: jax.device_put(x, placed.sharding)
    targets, keys = shard(np.asarray(targets, np.float32)), shard(keys)
    no_terms = {k: shard(np.zeros((n,), np.float32)) for k in LOSS_TERMS}
    bad_step = shard(np.full((n,), -1, np.int32))
    done = 0
    for factor, stage_steps in stages or self.stages:
      carry = (params, self.init_optimizer_fn(stage_steps)(params), no_terms, bad_step, no_terms)
      for first in range(0, stage_steps, self.chunk_steps):
        num_steps = min(self.chunk_steps, stage_steps - first)
        carry = self.advance(carry, targets, keys, factor, first, num_steps, stage_steps)
        done += num_steps
        params, _, terms, bad_step, bad_terms = carry
        bad_host, bad_terms = jax.device_get((bad_step, bad_terms))
        for device in np.flatnonzero(bad_host >= 0)[:1]:
          values = {k: float(v[device]) for k, v in bad_terms.items()}
          raise FloatingPointError(
              f'Non-finite loss in {name} (device {device}) at step {bad_host[device]} of the '
              f'{factor}x-downsampled stage: terms '
              f'{sorted(k for k, v in values.items() if not np.isfinite(v))} are not finite '
              f'({values}). Check the teacher weights or lower the learning rate.')
        if on_chunk is not None:
          on_chunk(done, {k: float(np.mean(v)) for k, v in jax.device_get(terms).items()})
    return params

  def finish(self, params):
    """(uint8 canvases, the teacher's logits on their centre windows) of `params`, as
    [devices, per_device, ...] numpy arrays."""
    images, logits = self.final_fn(params, self.variables)
    return np.asarray(images), np.asarray(logits)
