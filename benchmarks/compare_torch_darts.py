"""The DARTS search step for benchmarks/compare_torch.py: the row `darts_second_order`.

  darts_second_order  one step of `python -m dfnas_jax.main --config=configs/darts.py`
                      (`nas.bilevel.search_step`, built as `nas.darts.search` builds it):
                      the search network (C=8, 3 cells, 16 px, batch 16), the teacher's
                      logits computed in the step on the train and the val batch (each
                      resized to the teacher's 32 px), distillation at the config's
                      temperature. First the architecture step on the val batch: the
                      hypergradient of the validation loss after a virtual weight step
                      (`mode`: 'exact' differentiates through it, the config's default;
                      'finite_difference' is the reference's approximation), Adam with L2
                      weight decay on the logits. Then the weight step on the train batch
                      with the updated logits: SGD momentum 0.9, weight decay on kernels,
                      the gradient clipped at norm 5, the cosine learning rate.

The torch twin (benchmarks/torch_darts.py) runs the reference's second-order step
(quark0/darts cnn/architect.py, `_backward_step_unrolled`): the virtual step w' = w - lr
(momentum * buffer + grad + weight_decay * w), the validation loss at w' and its gradients,
the Hessian-vector product by finite differences at w +- R dw', R = r / ||dw'||, the
logits' gradient minus lr times it, torch.optim.Adam; then the weight step
(torch.optim.SGD, clip_grad_norm_). Where the reference and the JAX step differ, the twin
does what the JAX step does: weight decay on kernels only (also in the virtual step),
distillation from the teacher instead of labels, 'none' skipped in the mixed edges, and the
architecture step's forward passes leave the BatchNorms' running statistics alone.

Parity: JAX's 'finite_difference' step is the twin's arithmetic, so in that mode the check
requires the losses, the logits' hypergradient and update, Adam's moments and every weight
update to agree. In 'exact' mode the hypergradient is another estimator: the check reports
how far it is from the twin's finite difference (at the default config ~1e-1 in L2; Adam's
first step moves each logit by about lr times its gradient's sign, so the few logits whose
gradient is near zero move in opposite directions) and still requires the losses and the
weight update to agree, the twin's weight step fed JAX's updated logits (as the other rows
feed torch JAX's draws).

Imports nothing that imports TensorFlow: the step and its optimizers are the search's own
(`nas.bilevel`); the learning-rate schedule's length, which `nas.darts.search` takes from
the synthetic set's size, is computed here from the config (`search_steps`).
"""
import copy
import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # before JAX starts: both sides on the CPU

import flax.jax_utils
import jax
import numpy as np
import optax
import torch
import torch_darts  # benchmarks/
import torch_parity as tp  # benchmarks/
from torch import nn as tnn

from dfnas_jax import teachers
from dfnas_jax.configs import darts as darts_config
from dfnas_jax.models import darts as space
from dfnas_jax.nas import bilevel
from dfnas_jax.teachers import convert
from dfnas_jax.train import state as state_lib
from dfnas_jax.train import steps

MODES = ('exact', 'finite_difference')


def search_steps(config, num_classes: int) -> int:
  """The search's weight steps on the config's synthetic set (`nas.darts.search`): per
  class, its share of images_per_round x num_rounds (balanced) less the half
  `search_data.load` holds out (rounded down), in whole batches, num_epochs times. Label
  calibration files later rounds by the teacher's labels, which may move the split by an
  image or two: the schedule's length only shapes the learning rate after the first step."""
  if config.dataset or config.train_split:
    raise ValueError('The benchmark sizes the learning-rate schedule from the synthetic set; '
                     'the config searches on another data set.')
  s = config.synthesis
  made = s.images_per_round * s.num_rounds
  per_class = [made // num_classes + (c < made % num_classes) for c in range(num_classes)]
  kept = made - sum(int(n * 0.5) for n in per_class)
  return config.num_epochs * (kept // config.batch_size)


class DartsSecondOrderBench:
  """`nas.bilevel.search_step` as the `darts` stage pmaps it, and its torch twin."""
  name = 'darts_second_order'

  def __init__(self, batch_size: int = 0, mode: str = 'exact', config=None):
    config = copy.deepcopy(config or darts_config.get_config())
    if mode not in MODES:
      raise ValueError(f'mode={mode!r}: this row runs the second-order modes {MODES}.')
    config.mode = mode
    if config.space != 'darts':
      raise ValueError(f"space={config.space!r}: this row runs the DARTS cell space 'darts'.")
    if config.loss != 'distillation' or config.soft_labels != 'teacher':
      raise ValueError('This row times distillation from the teacher computed in the step.')
    if config.compute_dtype != 'float32':
      raise ValueError('The torch twin computes in float32.')
    self.search_config, self.mode = config, mode
    self.batch = batch_size or config.batch_size
    self.teacher_module, self.teacher_variables, spec = teachers.load(
        config.teacher, config.teacher_checkpoint or None)
    self.teacher = teachers.AtInputSize(self.teacher_module, spec.image_size)  # retrain.py's
    self.classes, self.temperature = spec.num_classes, config.temperature
    # nas.darts.search's state and step.
    self.model = space.DARTSSearchNet(spec.num_classes, config.init_channels, config.layers)
    num_steps = search_steps(config, spec.num_classes)
    tx, self.lr_fn = bilevel.weight_optimizer(config, num_steps)
    self.arch_tx = bilevel.arch_optimizer(config)
    weight_rng, alpha_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    alphas = space.initial_alphas(alpha_rng)
    self.state0 = jax.device_get(state_lib.SearchState(
        weights=state_lib.create_train_state(self.model, weight_rng, config.image_size, tx),
        alphas=alphas, arch_opt_state=self.arch_tx.init(alphas)))
    self.p_step = bilevel.pmap_config_search_step(config, self.arch_tx, self.lr_fn,
                                                  self.teacher.apply)
    self.devices = jax.local_devices()[:1]
    self.r_teacher = steps.replicate(self.teacher_variables, self.devices)
    size = config.image_size
    rng = np.random.default_rng(config.seed)
    self.train_images, self.val_images = rng.random((2, self.batch, size, size, 3), np.float32)
    self.r_batches = tuple({'image': steps.replicate(x, self.devices)}
                           for x in (self.train_images, self.val_images))
    self.lrs = np.asarray(jax.vmap(self.lr_fn)(np.arange(num_steps + 1))).tolist()
    self.config = (f'darts C={config.init_channels}, {config.layers} cells, batch {self.batch}, '
                   f'{size} px, {mode} hypergradient (torch: finite difference, r '
                   f'{config.finite_difference_radius:g}), distillation T={config.temperature:g} '
                   f'from {spec.name} at {spec.image_size} px; SGD lr {self.lrs[0]:g} momentum '
                   f'{config.momentum:g} wd {config.weight_decay:g} (kernels) clip '
                   f'{config.grad_clip:g}; Adam lr {config.arch_learning_rate:g} betas '
                   f'({config.arch_b1:g}, {config.arch_b2:g}) wd {config.arch_weight_decay:g}')

    torch_teacher = tp.TorchCifarResNet(self.teacher_module).eval().requires_grad_(False)
    tp.load_flax_variables(torch_teacher, self.teacher_variables)
    self.torch_teacher = torch_darts.TorchAtInputSize(torch_teacher, spec.image_size)
    self.torch_model = torch_darts.TorchDARTSSearchNet(self.model).train()
    torch_darts.load_search_variables(self.torch_model, {
        'params': self.state0.weights.params, 'batch_stats': self.state0.weights.batch_stats})
    # The JAX step's decay mask (state_lib.kernels_only) is on the stacked edges' arrays:
    # carried to each edge's tensors, it names the torch tensors to decay.
    mask = jax.tree_util.tree_map(lambda p, m: np.full(p.shape, m), self.state0.weights.params,
                                  state_lib.kernels_only(self.state0.weights.params))
    self.decayed = {self.torch_name(k) for k, m in self.flat_params(mask).items() if m.all()}
    self.torch_train, self.torch_val = tp.nchw(self.train_images), tp.nchw(self.val_images)

  @staticmethod
  def flat_params(params):
    """{'params/...': array} of a parameter tree, the scanned edges unstacked."""
    return teachers.flatten_variables({'params': torch_darts.unstack_edges(params)})

  @staticmethod
  def torch_name(key: str) -> str:
    return convert.torch_key(tuple(key.split('/')))

  # --- The torch side ---

  def torch_state(self):
    """(model, weight optimizer, logits {'normal', 'reduce'}, logit optimizer): a copy of
    the initial weights, the initial logits, fresh optimizers."""
    c = self.search_config
    model = copy.deepcopy(self.torch_model)
    named = list(model.named_parameters())
    groups = [{'params': [p for n, p in named if n in self.decayed],
               'weight_decay': c.weight_decay},
              {'params': [p for n, p in named if n not in self.decayed], 'weight_decay': 0.0}]
    weight_opt = torch.optim.SGD([g for g in groups if g['params']], lr=self.lrs[0],
                                 momentum=c.momentum)
    alphas = {t: tnn.Parameter(torch.from_numpy(np.array(self.state0.alphas[t], np.float32)))
              for t in space.CELL_TYPES}
    arch_opt = torch.optim.Adam(list(alphas.values()), lr=c.arch_learning_rate,
                                betas=(c.arch_b1, c.arch_b2), eps=1e-8,
                                weight_decay=c.arch_weight_decay)
    return model, weight_opt, alphas, arch_opt

  def torch_step(self, model, weight_opt, alphas, arch_opt, step: int, weight_step_logits=None):
    """One search step; returns (validation loss, train loss, accuracy) as tensors.
    The logits' hypergradient is left in their `.grad`. The weight step runs with the
    updated logits, or with `weight_step_logits` where given (the check in 'exact' mode:
    JAX's)."""
    c = self.search_config
    lr = self.lrs[min(step, len(self.lrs) - 1)]
    with torch.no_grad():
      train_targets = self.torch_teacher(self.torch_train)
      val_targets = self.torch_teacher(self.torch_val)
    names = [n for n, _ in model.named_parameters()]
    weights = [p for _, p in model.named_parameters()]
    logits = list(alphas.values())

    def loss(ws, images, targets, a=alphas):
      out = torch.func.functional_call(model, dict(zip(names, ws)), (images, a))
      return tp.distillation(out, targets, self.temperature)

    # The architecture step (cnn/architect.py `_backward_step_unrolled`).
    model.update_batch_stats(False)
    grads = torch.autograd.grad(loss(weights, self.torch_train, train_targets), weights)
    with torch.no_grad():
      unrolled = []
      for name, p, g in zip(names, weights, grads):
        buffer = weight_opt.state.get(p, {}).get('momentum_buffer')
        step_dir = g + (c.weight_decay * p if name in self.decayed else 0.0)
        if buffer is not None:
          step_dir = step_dir + c.momentum * buffer
        unrolled.append((p - lr * step_dir).requires_grad_(True))
    val_loss = loss(unrolled, self.torch_val, val_targets)
    val_grads = torch.autograd.grad(val_loss, logits + unrolled)
    d_logits, d_weights = val_grads[:len(logits)], val_grads[len(logits):]
    with torch.no_grad():
      radius = c.finite_difference_radius / torch.cat([d.flatten() for d in d_weights]).norm()

    def train_logit_grads(sign):
      with torch.no_grad():
        moved = [p + sign * radius * d for p, d in zip(weights, d_weights)]
      return torch.autograd.grad(loss(moved, self.torch_train, train_targets), logits)
    plus, minus = train_logit_grads(1.0), train_logit_grads(-1.0)
    for a, g, gp, gm in zip(logits, d_logits, plus, minus):
      a.grad = g - lr * (gp - gm) / (2 * radius)
    arch_opt.step()
    model.update_batch_stats(True)

    # The weight step with the updated logits.
    if weight_step_logits is None:
      weight_step_logits = {t: a.detach() for t, a in alphas.items()}
    out = model(self.torch_train, weight_step_logits)
    train_loss = tp.distillation(out, train_targets, self.temperature)
    weight_opt.zero_grad(set_to_none=True)
    train_loss.backward()
    tnn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
    for group in weight_opt.param_groups:
      group['lr'] = lr
    weight_opt.step()
    accuracy = (out.argmax(-1) == train_targets.argmax(-1)).float().mean()
    return val_loss.detach(), train_loss.detach(), accuracy

  # --- The row ---

  def check(self):
    """Teacher logits on the resized val batch, then one search step from the same weights
    and logits: the two losses, the logits' hypergradient and update and Adam's moments
    (in 'exact' mode reported only), the update of every weight tensor."""
    result = {'logits': tp.check_teacher_logits(self.teacher, self.teacher_variables,
                                                self.torch_teacher, self.val_images)}
    rstate = steps.replicate(self.state0, self.devices)
    rstate, train_m, arch_m = self.p_step(rstate, *self.r_batches, self.r_teacher)
    train_m = flax.jax_utils.unreplicate(train_m).compute()
    arch_m = flax.jax_utils.unreplicate(arch_m).compute()
    new = jax.device_get(flax.jax_utils.unreplicate(rstate))
    model, weight_opt, alphas, arch_opt = self.torch_state()
    # 'exact': the two sides' logits move apart (another estimator, and Adam's first step
    # is about lr times the gradient's sign); the weight step then runs JAX's on both.
    jax_logits = None if self.mode == 'finite_difference' else {
        t: torch.from_numpy(np.array(new.alphas[t], np.float32)) for t in space.CELL_TYPES}
    val_loss, train_loss, accuracy = self.torch_step(model, weight_opt, alphas, arch_opt, 0,
                                                     jax_logits)
    jax_terms = {'val_loss': float(arch_m['val_loss']), 'train_loss': float(train_m['loss'])}
    torch_terms = {'val_loss': float(val_loss), 'train_loss': float(train_loss)}
    result['terms'] = {k: (jax_terms[k], torch_terms[k]) for k in jax_terms}
    result['losses'] = [(jax_terms['train_loss'], torch_terms['train_loss'])]
    result['loss'] = tp.check_losses(self.name, 0, jax_terms, torch_terms)
    result['accuracy'] = (float(train_m['accuracy']), float(accuracy))

    # The logits: Adam's first moment is (1 - b1) (hypergradient + decay * logits).
    c = self.search_config
    mu = optax.tree_utils.tree_get(new.arch_opt_state, 'mu')
    nu = optax.tree_utils.tree_get(new.arch_opt_state, 'nu')
    compared = {}
    for t in space.CELL_TYPES:
      old = np.asarray(self.state0.alphas[t], np.float64)
      state = arch_opt.state[alphas[t]]
      compared[f'{t} hypergradient'] = (
          np.asarray(mu[t], np.float64) / (1 - c.arch_b1) - c.arch_weight_decay * old,
          alphas[t].grad.double().numpy())
      compared[f'{t} logit update'] = (np.asarray(new.alphas[t], np.float64) - old,
                                       alphas[t].detach().double().numpy() - old)
      compared[f'{t} Adam nu'] = (nu[t], state['exp_avg_sq'].numpy())
    result['arch'] = {}
    result['opposite'] = sum(int((np.sign(compared[f'{t} logit update'][0])
                                  != np.sign(compared[f'{t} logit update'][1])).sum())
                             for t in space.CELL_TYPES)
    result['num_logits'] = sum(np.size(self.state0.alphas[t]) for t in space.CELL_TYPES)
    for what, (a, b) in compared.items():
      if self.mode == 'finite_difference':
        result['arch'][what] = tp.check_update(self.name, what, a, b)
      else:  # another estimator: how far it is, not a check
        diff, norm = np.linalg.norm(np.subtract(a, b)), np.linalg.norm(a)
        result['arch'][what] = (float(diff / norm) if norm else float(diff),
                                float(np.abs(np.subtract(a, b)).max() / np.abs(a).max()))

    # Every weight tensor, each scanned edge's on its own.
    new_params = self.flat_params(new.weights.params)
    old_params = self.flat_params(self.state0.weights.params)
    torch_params = dict(model.named_parameters())
    originals = dict(self.torch_model.named_parameters())
    worst, worst_key, worst_max = (0.0, 0.0), None, 0.0
    for key, value in new_params.items():
      name = self.torch_name(key)
      rel = tp.check_update(self.name, f'{key} ({self.mode})',
                            tp.torch_layout(value) - tp.torch_layout(old_params[key]),
                            (torch_params[name] - originals[name]).detach().numpy())
      worst_max = max(worst_max, rel[1])
      if rel[0] >= worst[0]:
        worst, worst_key = rel, key
    result.update(update=worst, update_worst=worst_key, update_max=worst_max,
                  tensors=len(new_params))
    return result

  def timers(self):
    """(jax_call(i), torch_call(i)): search steps from the initial state and fresh
    optimizer states on both sides (torch: a copy; `check` still sees the initial one)."""
    state = {'jax': steps.replicate(self.state0, self.devices)}
    torch_state = self.torch_state()

    def jax_call(i):
      state['jax'] = jax.block_until_ready(
          self.p_step(state['jax'], *self.r_batches, self.r_teacher))[0]

    def torch_call(i):
      self.torch_step(*torch_state, i)

    return jax_call, torch_call

  def describe_check(self, r) -> str:
    terms = '; '.join(f'{k} JAX {a:.6f}, torch {b:.6f}' for k, (a, b) in r['terms'].items())
    arch = ', '.join(f'{k} {rel:.2e} (max |diff| / max {rel_max:.2e})'
                     for k, (rel, rel_max) in r['arch'].items())
    arch = (f'logits, rel L2 diff (tol {tp.UPDATE_RTOL:g}): {arch}'
            if self.mode == 'finite_difference' else
            f'logits, JAX exact vs torch finite difference (not checked): {arch}')
    arch += f'; {r["opposite"]} of {r["num_logits"]} logits moved in opposite directions'
    if self.mode == 'exact':
      arch += " (the weight step ran JAX's updated logits on both sides)"
    return (f'{self.mode}: teacher logits (val batch, resized) rel max diff {r["logits"]:.2e} '
            f'(tol {tp.LOGITS_TOL:g}); {terms}; worst rel diff {r["loss"]:.2e} (tol '
            f'{tp.LOSS_RTOL:g}); accuracy JAX {r["accuracy"][0]:.4f}, torch '
            f'{r["accuracy"][1]:.4f}; {arch}; weight updates ({r["tensors"]} tensors, each '
            f'edge its own): worst rel L2 diff {r["update"][0]:.2e} at {r["update_worst"]} (tol '
            f'{tp.UPDATE_RTOL:g}), worst max |diff| / max |update| {r["update_max"]:.2e}')
