"""Training-free (zero-cost) estimators: one score per network at initialization.

Each estimator reads a network at initialization, one minibatch of images and the teacher's
soft labels of it, and returns one score; higher should mean more accurate after training.

- `naswot` (Mellor et al., ICML 2021): c_i, the binary code of image i over every ReLU
  (1 where the ReLU's input is positive); K_ij = the units where c_i and c_j agree
  (c c^T + (1 - c)(1 - c)^T); the score is log|det K|.
- `jacob_cov` (Mellor et al., arXiv:2006.04647 v1, as Abdelfattah et al. score it): J_i =
  d sum(logits) / d x_i, the gradient with respect to the network's normalized input; the
  eigenvalues v of the correlation matrix of the J_i give -sum(log(v + k) + 1 / (v + k)),
  k = 1e-5.
- `grad_norm`, `snip` (Abdelfattah et al., ICLR 2021): over the convolution and dense
  kernels W, sum_layers ||dL/dW||_2 and sum |W * dL/dW|, L the cross-entropy against the
  teacher's soft labels (the papers: against the true labels).
- `synflow` (Tanaka et al., NeurIPS 2020; Abdelfattah et al.'s version for NAS): |params|,
  no BatchNorm (identity), one all-ones input, R = sum(logits); sum |W * dR/dW| over the
  kernels, returned as its log (at the benchmark's size it overflows float32).
- `zico` (Li et al., ICLR 2023): the batch split into `num_groups` groups, g_b each one's
  loss gradient; sum_layers log(sum_W mean_b|g_b| / std_b(g_b)) over the entries with
  std > 0 (the paper: separate minibatches, the true labels).
- `teacher_agreement` (ours): the mean cosine between the groups' gradients of the
  distillation loss: whether the images pull the weights the same way towards the teacher.
- `teacher_cka` (ours): the centred alignment of the ReLU-code kernel K with the teacher's
  soft-label kernel P P^T: whether the untrained network already tells apart the images the
  teacher tells apart.
- `params`, `flops`: `nb201.cost` (no network run).

`measures` computes the data estimators from one forward pass (every ReLU's code kernel
recorded on the way) and at most 1 + num_groups backward passes of it: the input gradient
of sum(logits) (jacob_cov) and one parameter gradient per group (zico, teacher_agreement).
The groups' losses are read off the one full-batch forward pass (BatchNorm statistics over
the whole batch), so the batch's loss gradient (grad_norm, snip) is exactly the mean of the
groups' and costs no pass of its own. Asked for fewer estimators (`estimators`), it runs
only the passes they read: naswot and teacher_cka the forward pass alone, jacob_cov one
backward pass. (The backward passes batched into one `jax.vmap` over their cotangents do
the same work and ran 5-39% slower on XLA:CPU: docs/zero_shot.md.) `synflow` is its own
pass. Both take the NB201 supernet's cell as a traced array (`arch`), so
`jax.jit(functools.partial(measures, model))` compiles once for every cell, and equal a
stand-alone network's scores when its variables are the supernet's
(`stand_alone_variables`). BatchNorm uses batch statistics in `measures`.

The ReLUs are found by name, as NB201's modules have them: the input of a module named
`conv` (`ReLUConvBN`) is a ReLU's output and `last_bn` is followed by one.
"""
import functools
from typing import Any, Callable, Dict, List, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from dfnas_jax.models import nb201

DATA_ESTIMATORS = ('naswot', 'jacob_cov', 'grad_norm', 'snip', 'zico', 'teacher_agreement',
                   'teacher_cka')
NO_DATA_ESTIMATORS = ('synflow', 'params', 'flops')
ESTIMATORS = DATA_ESTIMATORS + NO_DATA_ESTIMATORS
# What each data estimator reads besides the logits: the ReLU codes of the forward pass,
# the input gradient of sum(logits), or the groups' loss gradients.
CODE_ESTIMATORS = ('naswot', 'teacher_cka')
GROUP_ESTIMATORS = ('grad_norm', 'snip', 'zico', 'teacher_agreement')
JACOB_COV_K = 1e-5


# --- Closed forms, on what a pass through the network gives -----------------------------

def kernels(tree) -> List[jax.Array]:
  """The convolution and dense kernels of a params-like tree: the layers scored."""
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return [x for path, x in leaves if getattr(path[-1], 'key', None) == 'kernel']


def code_kernel(pre_activations) -> jax.Array:
  """c c^T + (1 - c)(1 - c)^T of one ReLU's input [B, ...], c = 1 where positive:
  (s s^T + n) / 2 with s = +-1 and n units."""
  s = jnp.where(pre_activations > 0, 1., -1.).reshape(pre_activations.shape[0], -1)
  return (s @ s.T + s.shape[1]) / 2


def naswot_score(kernel) -> jax.Array:
  """log|det K| of the code kernel, K scaled to a unit diagonal first (float32: its
  entries count up to ~1e6 units)."""
  units = jnp.mean(jnp.diag(kernel))
  logdet = jnp.linalg.slogdet(kernel / jnp.where(units > 0, units, 1.))[1]
  return jnp.where(units > 0, logdet + kernel.shape[0] * jnp.log(units), -jnp.inf)


def jacob_cov_score(jacobians, k: float = JACOB_COV_K) -> jax.Array:
  """-sum(log(v + k) + 1 / (v + k)), v the eigenvalues of corrcoef(J) [B, D]; NaN if some
  J_i is constant (the network ignores its input). Eigenvalues are clipped at 0, which
  float32 rounding can cross."""
  v = jnp.maximum(jnp.linalg.eigvalsh(jnp.corrcoef(jacobians.reshape(jacobians.shape[0], -1))),
                  0.)
  return -jnp.sum(jnp.log(v + k) + 1 / (v + k))


def snip_score(params, grads) -> jax.Array:
  return sum(jnp.sum(jnp.abs(w * g)) for w, g in zip(kernels(params), kernels(grads)))


def grad_norm_score(grads) -> jax.Array:
  return sum(jnp.linalg.norm(g.ravel()) for g in kernels(grads))


def zico_score(group_grads: Sequence[Any]) -> jax.Array:
  """sum over layers of log(sum mean|g| / std(g)), over the entries whose gradient varies
  between the groups; layers where none does add nothing."""
  total = 0.
  for layer in zip(*[kernels(g) for g in group_grads]):
    g = jnp.stack(layer)
    std = jnp.std(g, axis=0)  # numpy's ddof=0, as the paper's code
    ratio = jnp.where(std > 0, jnp.mean(jnp.abs(g), axis=0) / jnp.where(std > 0, std, 1.), 0.)
    layer_sum = jnp.sum(ratio)
    total = total + jnp.where(layer_sum > 0, jnp.log(jnp.where(layer_sum > 0, layer_sum, 1.)), 0.)
  return total


def agreement_score(group_grads: Sequence[Any]) -> jax.Array:
  """The mean cosine similarity of the groups' kernel gradients over all pairs."""
  flat = [jnp.concatenate([g.ravel() for g in kernels(t)]) for t in group_grads]
  cosines = [jnp.dot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b))
             for i, a in enumerate(flat) for b in flat[i + 1:]]
  return sum(cosines) / len(cosines)


def cka_score(kernel_a, kernel_b) -> jax.Array:
  """<HAH, HBH>_F / (||HAH|| ||HBH||), H the centring matrix."""
  def centred(k):
    k = k - jnp.mean(k, axis=0, keepdims=True)
    return k - jnp.mean(k, axis=1, keepdims=True)
  a, b = centred(kernel_a), centred(kernel_b)
  return jnp.sum(a * b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b))


def soft_cross_entropy_grad(logits, soft_labels):
  """d/dlogits of -sum_c p_c log softmax(z)_c, per example (not averaged)."""
  return jax.nn.softmax(logits) - soft_labels


# --- What a pass records, by intercepting the network's modules -------------------------

class _Recorder:
  """Collects the ReLU-code kernel (`codes`) or rescales every cell's output (`rescale`,
  for synflow) as the network runs.

  The supernet runs each edge's op in a `nn.switch` branch, out of which a traced value
  can only leave as the branch's output: each `ChoiceEdge` is run here by a switch whose
  branches also return the code kernel of their own ReLUs.
  """

  def __init__(self, codes: bool = False, rescale: bool = False):
    self.codes, self.rescale = codes, rescale
    self.terms: List[List[jax.Array]] = [[]]  # one list per switch branch being traced
    self.log_scales: List[jax.Array] = []

  def kernel(self, batch: int) -> jax.Array:
    return sum(self.terms[0]) if self.terms[0] else jnp.zeros((batch, batch))

  def _choice_edge(self, edge, x, choice, train=False):
    def branch(mdl, y, c):
      self.terms.append([])
      out = mdl.choices[c](y, train)
      terms = self.terms.pop()
      return out, sum(terms) if terms else jnp.zeros((y.shape[0],) * 2, jnp.float32)
    branches = [functools.partial(branch, c=c) for c in range(len(nb201.OPS))]
    y, kernel = nn.switch(choice, branches, edge, x)
    self.terms[-1].append(kernel)
    return y

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != '__call__':
      return next_fun(*args, **kwargs)
    if self.codes and isinstance(module, nb201.ChoiceEdge):
      return self._choice_edge(module, *args, **kwargs)
    if self.codes and module.name == 'conv':  # its input is the ReLU's output
      self.terms[-1].append(code_kernel(args[0]))
    out = next_fun(*args, **kwargs)
    if self.codes and module.name == 'last_bn':  # the final ReLU's input
      self.terms[-1].append(code_kernel(out))
    if self.rescale and isinstance(module, (nb201.Cell, nb201.ResidualReduction)):
      # Every path of the network runs through each cell's output: dividing there by a
      # constant divides R and all of dR/dW by it, so the flow is kept in float32 range
      # and the constants' logs are added back.
      scale = jax.lax.stop_gradient(jnp.mean(jnp.abs(out)))
      scale = jnp.where(scale > 0, scale, 1.)
      self.log_scales.append(jnp.log(scale))
      out = out / scale
    return out


def _input_std(model, channels: int) -> jax.Array:
  """d/d(normalized input) = d/d(images) * std: the papers feed normalized images."""
  std = getattr(model, 'std', None)
  return jnp.ones((channels,)) if std is None else jnp.asarray(std, jnp.float32)


# --- Estimators on a network --------------------------------------------------------------

def measures(model: nn.Module, variables, images, soft_labels, arch=None,
             num_groups: int = 2,
             estimators: Sequence[str] = DATA_ESTIMATORS) -> Dict[str, jax.Array]:
  """The data estimators `estimators` (default every one, DATA_ESTIMATORS) of `model` at
  `variables` on one batch.

  Args:
    model: called as model.apply(variables, images, arch, train=True): an `NB201Net`
      (supernet with `arch`, or stand-alone), or any module with that signature.
    variables: {'params', ...}; BatchNorm runs on the batch's statistics.
    images: [B, H, W, C] in [0, 1] (the network normalizes them).
    soft_labels: [B, classes], the teacher's probabilities.
    arch: the supernet's cell, NUM_EDGES op indices (traced); None for a stand-alone net.
    num_groups: the batch's groups for zico and teacher_agreement (B divisible by it).
    estimators: which to compute; only the passes they read run.
  """
  names = check_data_estimators(estimators)
  batch = images.shape[0]
  groups = bool(set(names) & set(GROUP_ESTIMATORS))
  if groups:
    check_groups(num_groups, batch)
  params = variables['params']
  others = {k: v for k, v in variables.items() if k != 'params'}

  def forward(params, images):
    recorder = _Recorder(codes=bool(set(names) & set(CODE_ESTIMATORS)))
    with nn.intercept_methods(recorder):
      logits, _ = model.apply({'params': params, **others}, images, arch, train=True,
                              mutable=['batch_stats'])
    return logits, recorder.kernel(batch)

  if groups:
    logits, backward, code = jax.vjp(forward, params, images, has_aux=True)
    input_gradient = lambda ct: backward(ct)[1]
  elif 'jacob_cov' in names:  # no parameter gradient: the input's alone
    logits, backward, code = jax.vjp(lambda x: forward(params, x), images, has_aux=True)
    input_gradient = lambda ct: backward(ct)[0]
  else:
    logits, code = forward(params, images)
  if groups:
    per_example = soft_cross_entropy_grad(logits, soft_labels)
    size = batch // num_groups
    group = jnp.arange(batch) // size
    # The group losses are means over their images: the batch's loss is their mean.
    group_grads = [backward(jnp.where((group == b)[:, None], per_example / size, 0.))[0]
                   for b in range(num_groups)]
    grads = jax.tree_util.tree_map(lambda *g: sum(g) / num_groups, *group_grads)
  scores = {
      'naswot': lambda: naswot_score(code),
      'jacob_cov': lambda: jacob_cov_score(input_gradient(jnp.ones_like(logits))
                                           * _input_std(model, images.shape[-1])),
      'grad_norm': lambda: grad_norm_score(grads),
      'snip': lambda: snip_score(params, grads),
      'zico': lambda: zico_score(group_grads),
      'teacher_agreement': lambda: agreement_score(group_grads),
      'teacher_cka': lambda: cka_score(code, soft_labels @ soft_labels.T),
  }
  return {name: scores[name]() for name in names}


def parse_estimators(spec: str, field: str = 'estimators') -> List[str]:
  """The estimators a config field names, 'a,b,...': each one of ESTIMATORS, none twice."""
  names = [n.strip() for n in spec.split(',') if n.strip()]
  if not names or len(set(names)) != len(names) or not set(names) <= set(ESTIMATORS):
    raise ValueError(f'{field}={spec!r}: one or more of {ESTIMATORS}, comma-separated, none '
                     'twice.')
  return names


def check_data_estimators(estimators: Sequence[str]) -> Tuple[str, ...]:
  names = tuple(estimators)
  unknown = [n for n in names if n not in DATA_ESTIMATORS]
  if unknown or not names or len(set(names)) < len(names):
    raise ValueError(f'estimators={names}: each must be one of {DATA_ESTIMATORS}, at least '
                     'one, none twice.')
  return names


def check_groups(num_groups: int, batch: int) -> None:
  if num_groups < 2 or batch % num_groups:
    raise ValueError(f'num_groups={num_groups} must be >= 2 and divide the batch ({batch}).')


def synflow(model: nn.Module, variables, arch=None, image_shape=(32, 32, 3),
            rescale: bool = True, epsilon: float = 1e-5) -> jax.Array:
  """log sum |W * dR/dW|: |params| (biases zero), every BatchNorm the identity (inference
  mode, mean 0, variance 1 - epsilon), one image the network normalizes to all ones,
  R = sum(logits). `rescale=False` computes the flow directly (small networks only)."""
  def transform(path, x):
    name = getattr(path[-1], 'key', None)
    if name == 'bias':  # adds no path to the flow, and would make it non-homogeneous
      return jnp.zeros_like(x)
    if name == 'mean':
      return jnp.zeros_like(x)
    if name == 'var':
      return jnp.full_like(x, 1 - epsilon)
    return jnp.abs(x)
  variables = jax.tree_util.tree_map_with_path(transform, variables)
  params = variables['params']
  others = {k: v for k, v in variables.items() if k != 'params'}
  mean = getattr(model, 'mean', None)
  image = jnp.ones((1,) + tuple(image_shape))
  if mean is not None:
    image = image * _input_std(model, image_shape[-1]) + jnp.asarray(mean, jnp.float32)

  def total(params):
    recorder = _Recorder(rescale=rescale)
    with nn.intercept_methods(recorder):
      logits = model.apply({'params': params, **others}, image, arch, train=False)
    return jnp.sum(logits), sum(recorder.log_scales)

  grads, log_scale = jax.grad(total, has_aux=True)(params)
  return jnp.log(snip_score(params, grads)) + log_scale


def params_and_flops(ops: Sequence[int], num_classes: int = 10,
                     channels: int = nb201.BENCHMARK_CHANNELS,
                     cells_per_stage: int = nb201.BENCHMARK_CELLS) -> Dict[str, float]:
  """The stand-alone network's parameters and multiply-adds (`nb201.cost`)."""
  macs, params = nb201.cost(ops, num_classes, channels, cells_per_stage)
  return {'params': float(params), 'flops': float(macs)}


def estimator(name: str) -> Callable:
  """`name` alone as fn(model, variables, images, soft_labels, arch=None) -> score."""
  if name not in DATA_ESTIMATORS + ('synflow',):
    raise ValueError(f'{name!r} is not a network estimator; known: '
                     f'{DATA_ESTIMATORS + ("synflow",)} (params, flops: params_and_flops).')
  if name == 'synflow':
    return lambda model, variables, images, soft_labels, arch=None: synflow(
        model, variables, arch, images.shape[1:])
  return lambda model, variables, images, soft_labels, arch=None: measures(
      model, variables, images, soft_labels, arch, estimators=(name,))[name]


# --- The supernet as every cell's network --------------------------------------------------

def supernet(num_classes: int = 10, channels: int = nb201.BENCHMARK_CHANNELS,
             cells_per_stage: int = nb201.BENCHMARK_CELLS) -> nb201.NB201Net:
  """The NB201 supernet scored outside any `pmap` (its BNs reduce over the batch alone)."""
  return nb201.NB201Net(num_classes, channels, cells_per_stage, axis_name=None)


def stand_alone_variables(variables, ops: Sequence[int]):
  """The variables of the stand-alone network of cell `ops` with the supernet's weights:
  each edge's chosen op's convolution and BatchNorm statistics, BN scale 1 and bias 0 (the
  supernet's cells' BNs are not affine; at initialization the two are the same)."""
  ops = nb201.check(ops)
  out = {}
  for collection, tree in variables.items():
    new = {}
    for name, value in tree.items():
      if not name.startswith('cell'):
        new[name] = value
        continue
      cell = {}
      for e, op in enumerate(ops):
        if nb201.OPS[op] not in nb201.KERNELS:
          continue
        chosen = dict(value[f'layer{e}'][f'choices_{op}'])
        if collection == 'params':
          width = chosen['conv']['kernel'].shape[-1]
          chosen['bn'] = {'scale': jnp.ones((width,)), 'bias': jnp.zeros((width,))}
        cell[f'layer{e}'] = chosen
      if cell:
        new[name] = cell
    out[collection] = new
  return out


def scorer(model: nn.Module, num_groups: int = 2, image_shape=(32, 32, 3),
           estimators: Sequence[str] = DATA_ESTIMATORS):
  """(measures, synflow) of `model`'s cells, each jitted once: fn(variables, arch, images,
  soft_labels) -> {estimator: score} for `estimators`, and fn(variables, arch) -> log
  synflow."""
  estimators = check_data_estimators(estimators)
  data = jax.jit(lambda variables, arch, images, soft_labels: measures(
      model, variables, images, soft_labels, arch, num_groups, estimators))
  flow = jax.jit(lambda variables, arch: synflow(model, variables, arch, image_shape))
  return data, flow


def rankable(scores) -> np.ndarray:
  """Scores as float64 with NaN (an undefined score: a network that ignores its input)
  ranked last, as -inf."""
  scores = np.asarray(scores, np.float64)
  return np.where(np.isnan(scores), -np.inf, scores)


def init_supernet(model: nn.Module, seed: int, image_shape=(32, 32, 3)) -> Dict[str, Any]:
  """One random initialization shared by every cell."""
  return model.init(jax.random.PRNGKey(seed), jnp.zeros((1,) + tuple(image_shape)),
                    jnp.zeros((nb201.NUM_EDGES,), jnp.int32))


def mean_rank(columns: Dict[str, Sequence[float]]) -> np.ndarray:
  """The mean over estimators of each cell's rank by that estimator (1 = lowest score; ties
  share their mean rank; an undefined score ranks last): higher is better, as a score."""
  ranks = [stats.rankdata(rankable(v)) for v in columns.values()]
  return np.mean(ranks, axis=0)
