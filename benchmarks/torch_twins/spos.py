"""compare_torch.py's row `spos_supernet`: one SPOS supernet step as configs/spos.py trains it
(`steps.pmap_train_step`, the path an input), and `TorchSupernet`, the supernet in PyTorch.
`SupernetBench` also runs the other one-shot space, NAS-Bench-201 (nb201.py).
"""
import copy

import flax.jax_utils
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn as tnn

from dfnas_jax import models, teachers
from dfnas_jax.configs import spos as spos_config
from dfnas_jax.models import layers
from dfnas_jax.models import spos as spos_lib
from dfnas_jax.teachers import convert
from dfnas_jax.train import state as state_lib
from dfnas_jax.train import steps as steps_lib

from . import parity as tp


class TorchChoiceBlock(tnn.Module):
  """models.spos.ChoiceBlock, its convolutions and BatchNorms numbered as in Flax."""

  def __init__(self, cin: int, cout: int, stride: int, choice: int, affine: bool):
    super().__init__()
    kernel = spos_lib.KERNELS[choice] if choice < len(spos_lib.KERNELS) else 3
    self.stride, self.proj, self.main = stride, [], []  # (index, relu) of conv{i} + bn{i}

    def add(ops, c_in, c_out, k=1, s=1, depthwise=False, relu=True):
      i = len(self.proj) + len(self.main)
      setattr(self, f'conv{i}', tnn.Conv2d(c_in, c_out, k, s, (k - 1) // 2, bias=False,
                                           groups=c_in if depthwise else 1))
      setattr(self, f'bn{i}', tnn.BatchNorm2d(c_out, affine=affine))
      ops.append((i, relu))

    if stride == 1:
      proj_channels, main_in = cin - cin // 2, cin // 2  # x[:, 0::2], x[:, 1::2]
    else:
      proj_channels = main_in = cin
      add(self.proj, cin, cin, kernel, stride, depthwise=True, relu=False)
      add(self.proj, cin, cin)
    mid, main_out = cout // 2, cout - proj_channels
    if choice < len(spos_lib.KERNELS):
      add(self.main, main_in, mid)
      add(self.main, mid, mid, kernel, stride, depthwise=True, relu=False)
      add(self.main, mid, main_out)
    else:
      add(self.main, main_in, main_in, 3, stride, depthwise=True, relu=False)
      add(self.main, main_in, mid)
      add(self.main, mid, mid, 3, depthwise=True, relu=False)
      add(self.main, mid, mid)
      add(self.main, mid, mid, 3, depthwise=True, relu=False)
      add(self.main, mid, main_out)

  def _run(self, ops, x):
    for i, relu in ops:
      x = getattr(self, f'bn{i}')(getattr(self, f'conv{i}')(x))
      x = F.relu(x) if relu else x
    return x

  def forward(self, x):
    if self.stride == 1:
      proj, x = x[:, 0::2], x[:, 1::2]
    else:
      proj = self._run(self.proj, x)
    return torch.cat([proj, self._run(self.main, x)], 1)


class TorchChoiceLayer(tnn.Module):

  def __init__(self, cin, cout, stride, affine):
    super().__init__()
    self.choices = tnn.ModuleList([TorchChoiceBlock(cin, cout, stride, c, affine)
                                   for c in range(spos_lib.NUM_CHOICES)])


class TorchSupernet(tnn.Module):
  """models.spos.SPOSNet as a supernet: every choice of every layer, non-affine BatchNorms;
  `forward(images, path)` runs one path (NCHW images in [0, 1])."""

  def __init__(self, space: spos_lib.SearchSpace, num_classes: int, dropout: float):
    super().__init__()
    self.register_buffer('mean', torch.tensor(space.mean).view(1, 3, 1, 1), persistent=False)
    self.register_buffer('std', torch.tensor(space.std).view(1, 3, 1, 1), persistent=False)
    self.stem_conv = tnn.Conv2d(3, space.stem_width, 3, space.stem_stride, 1, bias=False)
    self.stem_bn = tnn.BatchNorm2d(space.stem_width, affine=False)
    for i, (cin, cout, stride, _) in enumerate(space.layers()):
      setattr(self, f'layer{i}', TorchChoiceLayer(cin, cout, stride, affine=False))
    self.last_conv = tnn.Conv2d(space.stage_widths[-1], space.last_width, 1, bias=False)
    self.last_bn = tnn.BatchNorm2d(space.last_width, affine=False)
    self.fc = tnn.Linear(space.last_width, num_classes, bias=False)
    self.dropout = dropout

  def forward(self, images, path, dropout_mask=None):
    x = F.relu(self.stem_bn(self.stem_conv((images - self.mean) / self.std)))
    for i, choice in enumerate(path):
      x = getattr(self, f'layer{i}').choices[choice](x)
    x = F.relu(self.last_bn(self.last_conv(x))).mean((2, 3))
    if dropout_mask is None:
      x = F.dropout(x, self.dropout, self.training)
    else:  # a given mask (the check: JAX's), applied as flax's Dropout does
      x = torch.where(dropout_mask, x / (1.0 - self.dropout), torch.zeros_like(x))
    return self.fc(x)



def band_paths(space: spos_lib.SearchSpace, num_classes: int, flops_min: float,
               flops_max: float, rng: np.random.Generator, count: int, max_tries: int = 10000):
  """`count` uniform paths with multiply-adds in [flops_min, flops_max] MFLOPs (<= 0:
  unbounded): `nas.spos.PathSampler`'s 'uniform' mode (that module imports TensorFlow)."""
  paths = []
  for _ in range(max_tries):
    path = tuple(int(c) for c in rng.integers(spos_lib.NUM_CHOICES, size=space.num_layers))
    mflops = spos_lib.cost(space, path, num_classes)[0] / 1e6
    if mflops >= flops_min and (flops_max <= 0 or mflops <= flops_max):
      paths.append(path)
      if len(paths) == count:
        return paths
  raise ValueError(f'Fewer than {count} paths in [{flops_min}, {flops_max}] MFLOPs in '
                   f'{max_tries} draws.')


class SupernetBench:
  """`steps.pmap_train_step` as `nas/spos.py` runs it (via trainer.fit), and its torch twin.

  On the SPOS spaces; a subclass runs another one-shot space through the same machinery
  by overriding `preset` (of configs/spos.py), `search_space`, `draw_paths`, `check_path`
  and `torch_supernet`.
  """
  name = 'spos_supernet'
  preset = ''
  draws_paths = True  # run_row: `timers(count)` draws one path per timed pair

  def search_space(self, space: str):
    """What `draw_paths` and `torch_supernet` need of the space named `space`."""
    if space not in spos_lib.SPACES:
      raise ValueError(f'space={space!r}: this row runs the SPOS spaces {sorted(spos_lib.SPACES)}')
    return spos_lib.SPACES[space]

  def draw_paths(self, count: int, rng: np.random.Generator):
    return band_paths(self.space, self.classes, *self.band, rng, count)

  def check_path(self, seed: int):
    return self.draw_paths(1, np.random.default_rng(seed))[0]

  def torch_supernet(self) -> tnn.Module:
    return TorchSupernet(self.space, self.classes, self.model.dropout)

  def __init__(self, batch_size: int = 0, space: str = '', config=None):
    config = config or spos_config.get_config(self.preset)
    s = self.train_config = config.supernet
    space = space or config.space
    self.space = self.search_space(space)
    if s.warmup_epochs:
      raise ValueError('warmup_epochs > 0 needs the data set size; the benchmark has none.')
    if s.loss != 'distillation' or config.soft_labels != 'teacher':
      raise ValueError('This row times distillation from the teacher computed in the step.')
    self.batch = batch_size or s.batch_size
    self.teacher_module, self.teacher_variables, spec = teachers.load(config.teacher)
    if spec.image_size != s.image_size:
      raise ValueError('The torch teacher here does not resize inputs (teachers.AtInputSize).')
    self.classes, self.temperature = spec.num_classes, s.temperature
    teacher = teachers.AtInputSize(self.teacher_module, spec.image_size)  # retrain.py's
    self.model = models.build_model(space, spec.num_classes, jnp.float32, dropout=config.dropout)
    # trainer.fit's optimizer: warm-up int(warmup_epochs * steps_per_epoch) = 0 steps.
    lr_fn = state_lib.learning_rate_schedule(s.learning_rate, s.num_train_steps, 0,
                                             s.lr_schedule)
    tx = state_lib.sgd(lr_fn, s.momentum, s.weight_decay, s.nesterov, s.grad_clip)
    self.state0 = jax.device_get(state_lib.create_train_state(
        self.model, jax.random.PRNGKey(s.seed), s.image_size, tx))
    self.dropout_rng = jax.random.PRNGKey(s.seed + 1)
    self.p_step = steps_lib.pmap_train_step(
        learning_rate_fn=lr_fn, loss=s.loss, label_smoothing=s.label_smoothing,
        temperature=s.temperature, teacher_apply=teacher.apply, dropout_rng=self.dropout_rng,
        aux_weight=s.get('aux_weight', 0.0), after_update=layers.keep_unused_choices)
    self.devices = jax.local_devices()[:1]
    self.r_teacher = steps_lib.replicate(self.teacher_variables, self.devices)
    rng = np.random.default_rng(s.seed)
    self.images = rng.random((self.batch, s.image_size, s.image_size, 3), np.float32)
    self.r_images = steps_lib.replicate(self.images, self.devices)
    self.band = (config.flops_min, config.flops_max) if space == config.space else (0.0, 0.0)
    self.paths = lambda count, seed: self.draw_paths(count, np.random.default_rng(seed))
    self.parity_path = self.check_path(s.seed)
    self.lrs = [float(v) for v in jax.vmap(lr_fn)(jnp.arange(s.num_train_steps + 1))]
    self.config = (f'{space}, batch {self.batch}, {s.image_size} px, distillation T='
                   f'{s.temperature:g} from {spec.name}, SGD lr {s.learning_rate:g} momentum '
                   f'{s.momentum:g} nesterov={s.nesterov} wd {s.weight_decay:g}, dropout '
                   f'{config.dropout:g}; check path {"".join(map(str, self.parity_path))}')

    self.torch_teacher = tp.TorchCifarResNet(self.teacher_module).eval().requires_grad_(False)
    tp.load_flax_variables(self.torch_teacher, self.teacher_variables)
    self.torch_model = self.torch_supernet().train()
    tp.load_flax_variables(self.torch_model, {'params': self.state0.params,
                                              'batch_stats': self.state0.batch_stats})
    self.torch_images = tp.nchw(self.images)
    self._mask_fn = None

  def _batch(self, path):
    return {'image': self.r_images, 'arch': np.asarray(path, np.int32)[None]}

  def torch_optimizer(self, model):
    s = self.train_config
    named = list(model.named_parameters())
    groups = [{'params': [p for _, p in named if p.ndim > 1], 'weight_decay': s.weight_decay},
              {'params': [p for _, p in named if p.ndim <= 1], 'weight_decay': 0.0}]
    # state_lib.kernels_only: weight decay on kernels only.
    return torch.optim.SGD([g for g in groups if g['params']], lr=self.lrs[0],
                           momentum=s.momentum, nesterov=s.nesterov)

  def torch_step(self, model, opt, path, step: int, dropout_mask=None):
    """One training step of `model` on one path; returns (loss, accuracy) as tensors."""
    with torch.no_grad():
      teacher_logits = self.torch_teacher(self.torch_images)
    logits = model(self.torch_images, path, dropout_mask)
    loss = tp.distillation(logits, teacher_logits, self.temperature)
    opt.zero_grad(set_to_none=True)  # choices off the path get no gradient: SGD skips them
    loss.backward()
    if self.train_config.grad_clip > 0:
      tnn.utils.clip_grad_norm_(model.parameters(), self.train_config.grad_clip)
    for group in opt.param_groups:
      group['lr'] = self.lrs[min(step, len(self.lrs) - 1)]
    opt.step()
    # The JAX step's metrics: accuracy against the teacher's argmax.
    accuracy = (logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean()
    return loss.detach(), accuracy

  def jax_dropout_mask(self, path, step: int = 0):
    """The dropout mask the JAX train step draws at `step`: one pmap-ed forward with the
    step's rngs, where an interceptor passes ones through flax's Dropout."""
    if self._mask_fn is None:
      def mask_fn(variables, images, arch, step):
        rngs = {'dropout': jax.random.fold_in(jax.random.fold_in(self.dropout_rng, step),
                                              jax.lax.axis_index(steps_lib.AXIS))}
        masks = []

        def interceptor(next_fun, args, kwargs, context):
          if isinstance(context.module, nn.Dropout) and context.method_name == '__call__':
            kept = next_fun(jnp.ones_like(args[0]), *args[1:], **kwargs)
            masks.append(kept != 0)
            return kept * args[0]
          return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
          self.model.apply(variables, images, train=True, rngs=rngs, architecture=arch,
                           mutable=['batch_stats', 'intermediates'])
        return masks[0]
      self._mask_fn = jax.pmap(mask_fn, axis_name=steps_lib.AXIS, in_axes=(0, 0, 0, None))
    variables = steps_lib.replicate({'params': self.state0.params,
                                     'batch_stats': self.state0.batch_stats}, self.devices)
    batch = self._batch(path)
    return np.array(self._mask_fn(variables, batch['image'], batch['arch'], step))[0]

  def check(self):
    """Teacher logits, then one step on `parity_path` from the same weights (and JAX's
    dropout mask): loss, accuracy and the update of every parameter."""
    path = self.parity_path
    result = {'logits': tp.check_teacher_logits(self.teacher_module, self.teacher_variables,
                                                self.torch_teacher, self.images)}
    saved = copy.deepcopy(self.torch_model.state_dict())
    try:
      # Without dropout the model has no Dropout module to take a mask from.
      mask = tp.from_numpy(self.jax_dropout_mask(path)) if self.model.dropout else None
      rstate = steps_lib.replicate(self.state0, self.devices)
      rstate, metrics = self.p_step(rstate, self._batch(path), self.r_teacher)
      m = flax.jax_utils.unreplicate(metrics).compute()
      loss, accuracy = self.torch_step(self.torch_model, self.torch_optimizer(self.torch_model),
                                       path, 0, mask)
      result['losses'] = [(float(m['loss']), float(loss))]
      result['accuracy'] = (float(m['accuracy']), float(accuracy))
      result['loss'] = tp.check_losses(self.name, 0, {'loss': float(m['loss'])},
                                       {'loss': float(loss)})
      new = teachers.flatten_variables(
          {'params': jax.device_get(flax.jax_utils.unreplicate(rstate.params))})
      old = teachers.flatten_variables({'params': self.state0.params})
      torch_params = dict(self.torch_model.named_parameters())
      pairs = {}
      for key, value in new.items():  # every parameter: off the path both must stay put
        name = convert.torch_key(tuple(key.split('/')))
        pairs[key] = (tp.torch_layout(value) - tp.torch_layout(old[key]),
                      tp.host(torch_params[name] - saved[name]))
      result['updates'] = tp.check_updates(self.name, pairs, f'{{}} (path {path})',
                                           {k: tp.torch_layout(v) for k, v in old.items()})
    finally:
      self.torch_model.load_state_dict(saved)
    return result

  def timers(self, count: int):
    """(jax_call(i), torch_call(i)) on the same path per i (`count` paths, drawn in the band),
    from the initial weights and fresh optimizer states (torch: a copy; `check` still sees
    the initial weights); and the paths."""
    paths = self.paths(count, self.train_config.seed + 1)
    return tp.path_timers(self, paths, lambda i: self._batch(paths[i]))

  def describe_check(self, r) -> str:
    (a, b), = r['losses']
    return (f'path {"".join(map(str, self.parity_path))}: teacher logits rel max diff '
            f'{r["logits"]:.2e} (tol {tp.LOGITS_TOL:g}); loss JAX {a:.6f}, torch {b:.6f}, rel diff '
            f'{r["loss"]:.2e} (tol {tp.LOSS_RTOL:g}); accuracy JAX {r["accuracy"][0]:.4f}, torch '
            f'{r["accuracy"][1]:.4f}; ' + tp.describe_updates(r['updates'], 'parameter updates'))

