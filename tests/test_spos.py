"""SPOS: search space cost, supernet training semantics, candidate scoring, evolution, stage."""
import itertools
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from dfnas_jax import models, teachers
from dfnas_jax.configs import spos as spos_config
from dfnas_jax.models import layers, spos
from dfnas_jax.nas import evolution, subnets
from dfnas_jax.nas import spos as spos_stage
from dfnas_jax.train import state as state_lib
from tests import model_counts, notebooks
from tests.supernet_steps import counting_path_step, leaf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = spos.SPACES['spos_tiny']


def test_block_cost_matches_hand_computation():
  # Stride-1 ShuffleNet 3x3 block, 8 -> 16 channels at 32x32: the even half (4 channels)
  # passes through; main branch 1x1 4->8, depthwise 3x3 on 8, 1x1 8->12.
  macs = (4 * 8 + 8 * 9 + 8 * 12) * 32 * 32
  params = (4 * 8 + 8 * 9 + 8 * 12) + 2 * (8 + 8 + 12)  # weights + affine BN
  assert spos._block_cost(8, 16, 1, 32, 0, affine=True) == (macs, params) == (204800, 256)


def test_pointwise_conv_is_a_1x1_convolution():
  """The same parameters (name, shape, initial values) and outputs and gradients."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 5, 6))
  mine = layers.PointwiseConv(4)
  conv = nn.Conv(4, (1, 1), use_bias=False, kernel_init=layers.conv_init)
  variables = mine.init(jax.random.PRNGKey(3), x)
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(
      np.array_equal, variables, conv.init(jax.random.PRNGKey(3), x)))
  g = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 5, 4))
  grads = [jax.grad(lambda v, x, m=m: (m.apply(v, x) * g).sum(), (0, 1))(variables, x)
           for m in (mine, conv)]
  np.testing.assert_allclose(mine.apply(variables, x), conv.apply(variables, x), rtol=1e-5,
                             atol=1e-6)
  for got, want in zip(*map(jax.tree_util.tree_leaves, grads)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _counted_macs(model, variables, size):
  """Multiply-adds of every Conv/DepthwiseConv/Dense the model really runs."""
  return model_counts.multiply_adds(model, variables, size, (
      nn.Conv, nn.Dense, layers.DepthwiseConv, layers.PointwiseConv))


@pytest.mark.parametrize('space_name', ['spos_tiny', 'spos_cifar'])
def test_analytic_cost_equals_the_network(space_name):
  space = spos.SPACES[space_name]
  rng = np.random.default_rng(0)
  for _ in range(2):
    arch = tuple(int(c) for c in rng.integers(0, 4, space.num_layers))
    model = models.build_model(spos.architecture_name(space_name, arch), 10)
    variables = model_counts.shapes(model, 32)
    macs, params = spos.cost(space, arch, 10)
    assert params == model_counts.num_params(variables)
    assert macs == _counted_macs(model, variables, 32)


def test_reference_space_matches_the_papers_flops_band():
  # SPOS samples 290-360 MFLOPs paths; the uniform architectures span about that range.
  costs = [spos.cost(spos.SPACES['spos_imagenet'], (c,) * 20, 1000)[0] / 1e6 for c in range(4)]
  assert 285 < min(costs) < 300 and 350 < max(costs) < 365


def test_stride2_projection_has_the_choice_kernel_as_in_the_reference():
  # The reference's FLOPs table gives 313.65 and 340.37 M for its uniform 5x5 and 7x7 paths;
  # a 3x3 projection in the four stride-2 layers would count 311.30 and 334.48.
  reference = spos.SPACES['spos_imagenet']
  assert spos.cost(reference, (1,) * 20, 1000)[0] / 1e6 == pytest.approx(313.65, abs=0.02)
  assert spos.cost(reference, (2,) * 20, 1000)[0] / 1e6 == pytest.approx(340.37, abs=0.02)
  # spos_tiny's layers 1-3 have stride 2; each supernet choice has its own projection.
  params = model_counts.shapes(models.build_model('spos_tiny', 10), 32)['params']
  for layer in (1, 2, 3):
    assert [params[f'layer{layer}'][f'choices_{c}']['conv0']['kernel'].shape[0]
            for c in range(4)] == [3, 5, 7, 3]
  arch = (0, 1, 2, 3)  # projections 5x5, 7x7, 3x3: the analytic count follows them
  model = models.build_model(spos.architecture_name('spos_tiny', arch), 10)
  variables = model_counts.shapes(model, 32)
  assert [variables['params'][f'layer{i}']['conv0']['kernel'].shape[0] for i in (1, 2, 3)] == [
      5, 7, 3]
  macs, params = spos.cost(TINY, arch, 10)
  assert params == model_counts.num_params(variables)
  assert macs == _counted_macs(model, variables, 32)


def test_architecture_names_round_trip_and_reject_bad_ones():
  name = spos.architecture_name('spos_tiny', (3, 0, 2, 1))
  assert name == 'spos_tiny:3021' and spos.parse_name(name) == ('spos_tiny', (3, 0, 2, 1))
  assert models.build_model(name, 10).choices == (3, 0, 2, 1)
  with pytest.raises(ValueError, match='4 choices'):
    spos.parse_name('spos_tiny:30')
  with pytest.raises(ValueError, match='not a SPOS architecture'):
    spos.parse_name('spos_huge:0000')


@pytest.mark.parametrize('mode', spos_stage.PATH_SAMPLING)
def test_path_sampler_keeps_to_the_flops_band(mode):
  space = spos_stage.one_shot_space('spos_tiny')
  sampler = spos_stage.PathSampler(space, 10, 2.1, 2.3, mode)
  rng = np.random.default_rng(0)
  assert all(2.1 <= sampler.mflops(sampler(rng)) <= 2.3 for _ in range(20))
  # The path of a supernet step is a function of its seed.
  assert sampler(np.random.default_rng([0, 7])) == sampler(np.random.default_rng([0, 7]))
  with pytest.raises(ValueError, match=r'\[50.0, 60.0\] M'):
    spos_stage.PathSampler(space, 10, 50.0, 60.0, mode, max_tries=50)(rng)
  with pytest.raises(ValueError, match="path_sampling='flat'"):
    spos_stage.PathSampler(space, 10, 2.1, 2.3, 'flat')


def _bin_shares(sampler, binned, draws):
  rng = np.random.default_rng(0)
  archs = [sampler(rng) for _ in range(draws)]
  assert all(sampler.valid(a) for a in archs)
  return np.bincount([binned.bin_of(a) for a in archs],
                     minlength=len(binned.bin_counts)) / draws


def test_flops_uniform_sampling_flattens_the_bins_uniform_does_not():
  config = spos_config.get_config()
  space = spos_stage.one_shot_space(config.space)
  flat = spos_stage.PathSampler(space, 10, config.flops_min, config.flops_max)
  assert flat.mode == config.path_sampling == 'flops_uniform'
  uniform = spos_stage.PathSampler(space, 10, config.flops_min, config.flops_max, 'uniform')
  # Measured with seed 0, 7 bins: shares 0.135-0.156 for flops_uniform, 0.044-0.212 for
  # uniform (the cheapest bin least).
  assert np.abs(_bin_shares(flat, flat, 3000) - 1 / 7).max() < 0.03
  shares = _bin_shares(uniform, flat, 3000)
  assert np.abs(shares - 1 / 7).max() > 0.03 and shares[0] < 0.5 / 7


def test_flops_uniform_bins_are_exact_and_empty_ones_are_never_drawn():
  space = spos_stage.one_shot_space('spos_tiny')
  sampler = spos_stage.PathSampler(space, 10, 0.0, 2.4, num_bins=60)
  paths = list(itertools.product(range(4), repeat=4))
  in_band = [a for a in paths if sampler.valid(a)]
  counts = np.bincount([sampler.bin_of(a) for a in in_band], minlength=60)
  assert list(counts) == sampler.bin_counts and 0 in counts  # 176 paths, some bins empty
  archs = [sampler(np.random.default_rng([1, step])) for step in range(3000)]
  assert set(archs) == set(in_band)  # every path of the band, only those
  shares = np.bincount([sampler.bin_of(a) for a in archs], minlength=60) / 3000
  assert np.abs(shares[counts > 0] - 1 / np.count_nonzero(counts)).max() < 0.01


@pytest.mark.slow  # compiles a whole supernet training step
def test_supernet_step_compiles_once_and_leaves_unused_choices_untouched(quick_compiles):
  step, state, traces, _ = counting_path_step('spos_tiny', 32)
  initial = jax.device_get(state)
  state = step(state, (0, 0, 0, 0))
  after_a = jax.device_get(state)
  state = step(state, (1, 1, 1, 1))  # choice 0 now has momentum and decay, yet is not used
  after_b = jax.device_get(state)
  step(state, (3, 2, 1, 0))
  assert len(traces) == 1

  kernel = ('layer1', 'choices_{}', 'conv0', 'kernel')
  param = lambda s, c: leaf(s.params, *(k.format(c) for k in kernel))[0]
  trace = lambda s, c: leaf(s.opt_state[1][0].trace, *(k.format(c) for k in kernel))[0]
  assert not np.array_equal(param(initial, 0), param(after_a, 0))
  np.testing.assert_array_equal(param(after_a, 0), param(after_b, 0))
  np.testing.assert_array_equal(trace(after_a, 0), trace(after_b, 0))
  assert not np.array_equal(param(after_a, 1), param(after_b, 1))
  for c in (2, 3):
    np.testing.assert_array_equal(param(initial, c), param(after_b, c))
  # Shared layers are trained by every path.
  assert not np.array_equal(leaf(after_a.params, 'fc', 'kernel'),
                            leaf(after_b.params, 'fc', 'kernel'))


@pytest.mark.slow  # compiles a whole supernet evaluation step
def test_candidate_scores_recalibrate_bn_and_do_not_recompile(quick_compiles):
  model = models.build_model('spos_tiny', 10)
  variables = state_lib.init_variables(model, jax.random.PRNGKey(0), 32)
  rng = np.random.default_rng(0)
  images = rng.random((1, 8, 32, 32, 3), np.float32)
  calibration = [{'image': images, 'label': np.zeros((1, 8), np.int32)}]
  held_out = [{'image': images, 'label': np.arange(8, dtype=np.int32)[None] % 10,
               'mask': np.ones((1, 8), np.float32)}]
  evaluator = subnets.SubnetEvaluator(model, variables, calibration, held_out)
  scores = [evaluator((0, 1, 2, 3))]
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, *_, **__: compiles.append(event)
      if event == '/jax/core/compile/backend_compile_duration' else None)
  scores += [evaluator((3, 3, 3, 3)), evaluator((0, 1, 2, 3))]
  assert not compiles  # a new path reuses the compiled calibration and eval steps
  assert scores[0] == scores[2] and all(0.0 <= s <= 1.0 for s in scores)
  # The recalibrated statistics are the calibration batch's own.
  stats = evaluator.p_batch_stats(evaluator.rvariables, dict(calibration[0],
                                                           arch=np.zeros((1, 4), np.int32)))
  x = (images[0] - np.asarray(TINY.mean)) / np.asarray(TINY.std)
  stem = jax.lax.conv_general_dilated(x, variables['params']['stem_conv']['kernel'], (1, 1),
                                      ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(leaf(stats, 'stem_bn', 'mean')[0], np.mean(stem, (0, 1, 2)),
                             rtol=1e-4, atol=1e-5)


def _search(tmp_path, generations, score_calls):
  def score(arch):
    score_calls.append(arch)
    return -float(np.sum((np.asarray(arch) - np.array([3, 1, 2, 0, 1, 3])) ** 2))

  settings = evolution.EvolutionSettings(population=10, generations=generations, top_k=3,
                                         num_mutations=4, mutation_prob=0.3, num_crossovers=3)
  sample = lambda rng: tuple(int(c) for c in rng.integers(0, 4, 6))
  return evolution.EvolutionarySearch(settings, 6, 4, valid=lambda a: a[0] != 0, score=score,
                                      sample=sample, seed=1,
                                      state_path=str(tmp_path / 'state.json'))


def test_evolution_improves_respects_constraints_and_resumes(tmp_path):
  calls = []
  best, best_score = _search(tmp_path / 'full', 8, calls).run()
  assert all(a[0] != 0 for a in calls) and len(set(calls)) == len(calls)  # no re-scoring
  history = json.loads((tmp_path / 'full' / 'state.json').read_text())['history']
  assert history[-1]['best_score'] >= history[0]['best_score'] and best_score > -3

  interrupted = []
  _search(tmp_path / 'resumed', 3, interrupted).run()  # "killed" after generation 3
  resumed = []
  best_resumed, _ = _search(tmp_path / 'resumed', 8, resumed).run()
  assert best_resumed == best and interrupted + resumed == calls


def test_spos_smoke_with_a_users_teacher_then_notebook_02_reuses_it(data_dir, tmp_path):
  """The main job end to end, with the user's own teacher: a torchvision-layout CIFAR-10
  ResNet-18 converted to a teacher directory is the one flag (--config.teacher=DIR)."""
  pytest.importorskip('torch', reason='the user teacher is converted from a PyTorch ResNet')
  from tests import torch_resnets
  teacher_dir, torch_model = torch_resnets.user_teacher(str(tmp_path / 'teacher'))
  module, variables, _ = teachers.load(teacher_dir)
  images = torch_resnets.images_like(32, n=2)
  assert torch_resnets.compare_logits(module, variables, torch_model, images)[0] < 1e-4

  workdir = tmp_path / 'spos'
  args = [f'--config={REPO}/configs/spos.py:smoke', f'--workdir={workdir}',
          f'--config.teacher={teacher_dir}',
          '--config.eval_dataset=cifar10_jpeg', f'--config.eval_data_dir={data_dir}',
          f'--config.eval_split={notebooks.EVAL_SPLIT}', '--config.download=False']
  out = subprocess.run([sys.executable, '-m', 'dfnas_jax.main', *args], cwd=tmp_path,
                       capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, PYTHONPATH=REPO,  # compile-bound run
                                JAX_DISABLE_MOST_OPTIMIZATIONS='1'))
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads((workdir / 'summary.json').read_text())
  arch = tuple(summary['best_choices'])
  assert summary['best_architecture'] == spos.architecture_name('spos_tiny', arch)
  assert spos.cost(TINY, arch, 10)[0] / 1e6 == pytest.approx(summary['flops_m'])
  assert summary['flops_m'] <= 2.3 and summary['num_images'] == 32
  assert summary['search_val_split']['per_class'] == 1 and 0 <= summary['final_accuracy'] <= 1
  assert set(summary['wall_time_s']) == {'data_s', 'supernet_s', 'search_s', 'retrain_s',
                                         'total_s'}
  assert len(summary['search_history']) == 2
  # The teacher the stage synthesized from and distilled from is the user's.
  assert summary['teacher'] == teacher_dir
  metadata = tfds.builder_from_directory(summary['dataset']).info.metadata
  assert metadata['teacher'] == 'my_teacher' and metadata['config']['teacher'] == teacher_dir
  synthesis = json.loads((workdir / 'synthesize' / 'summary.json').read_text())
  assert synthesis['teacher'] == 'my_teacher'
  # The retrained network is a loadable model directory (evaluate stage input).
  module, _, spec = teachers.load(summary['retrain_model_dir'])
  assert spec.architecture == summary['best_architecture'] and module.choices == arch

  # The notebook on the same work directory and config: everything is reused (same
  # result, nothing trained again), and it shows the run.
  nb = notebooks.run('02_spos', notebooks.search_parameters(workdir, data_dir,
                                                           {'teacher': teacher_dir}))
  again = notebooks.check_search(nb, workdir)
  assert again['best_architecture'] == summary['best_architecture']
  assert again['final_accuracy'] == summary['final_accuracy']
  assert 'Reusing the synthetic dataset' in notebooks.stderr(nb)
  assert again['synthesized'] and again['dataset'] == summary['dataset']
  # Wall times count the kept work of earlier attempts, not only this (short) rerun's.
  assert again['wall_time_s']['data_s'] == summary['wall_time_s']['data_s'] > 0
  for phase in ('supernet_s', 'retrain_s', 'total_s'):
    assert again['wall_time_s'][phase] >= summary['wall_time_s'][phase]
  for png in ('supernet_curves.png', 'search_progress.png', 'candidates.png',
              'retrain_curves.png'):
    assert (workdir / png).exists(), png
  assert notebooks.images_shown(nb) == 4
  assert 'Search: resuming after generation 1' in notebooks.stderr(nb)  # its progress log


@pytest.mark.parametrize('field, value', [('compute_dtype', 'fp16'), ('path_sampling', 'flat')])
def test_bad_config_fails_before_any_work(tmp_path, field, value):
  config = spos_config.get_config('smoke')
  config[field] = value
  with pytest.raises(ValueError, match=f"{field}='{value}': expected one of"):
    spos_stage.run(config, str(tmp_path))
  assert not (tmp_path / 'synthesize').exists()
