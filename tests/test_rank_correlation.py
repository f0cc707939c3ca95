"""Consistency study: rank statistics, architecture choice, and the stage's resumable table."""
import json

import numpy as np
import pytest

from dfnas_jax.configs import rank_correlation as rc_config
from dfnas_jax.evaluation import rank_correlation as rc
from dfnas_jax.models import darts, spos
from dfnas_jax.nas import spos as spos_stage
from tests import notebooks


def test_rank_statistics_known_values():
  same = rc.rank_statistics([1, 2, 3, 4], [10, 20, 30, 40], num_bootstrap=200, seed=0)
  assert same['kendall_tau'] == pytest.approx(1) and same['spearman_rho'] == pytest.approx(1)
  assert same['kendall_tau_ci95'] == pytest.approx([1, 1]) and same['regret'] == 0
  reverse = rc.rank_statistics([4, 3, 2, 1], [0.1, 0.2, 0.3, 0.4], num_bootstrap=200, seed=0)
  assert reverse['kendall_tau'] == pytest.approx(-1) and reverse['top1_index'] == 0
  assert reverse['regret'] == pytest.approx(0.3) and reverse['top1_real_accuracy'] == 0.1
  # One swapped pair of four: 5 of 6 pairs concordant; squared rank differences sum to 2.
  swap = rc.rank_statistics([1, 3, 2, 4], [1, 2, 3, 4], num_bootstrap=500, seed=0)
  assert swap['kendall_tau'] == pytest.approx(4 / 6)
  assert swap['spearman_rho'] == pytest.approx(1 - 6 * 2 / (4 * 15))
  low, high = swap['kendall_tau_ci95']
  assert -1 <= low < swap['kendall_tau'] <= high <= 1
  constant = rc.rank_statistics([0.5, 0.5, 0.5], [1, 2, 3], num_bootstrap=20, seed=0)
  assert np.isnan(constant['kendall_tau']) and 'undefined' in rc.markdown(_results(constant))
  # A tie for the top is a random pick among the tied: its expected accuracy.
  assert constant['top1_ties'] == 3 and constant['regret'] == pytest.approx(3 - 2)
  assert 'a 3-way tie' in rc.markdown(_results(constant))


def test_top10_precision_counts_the_shared_best_tenth():
  truth = np.arange(20.0)  # the best tenth: architectures 18 and 19
  assert rc.rank_statistics(truth, truth, 10, 0)['top10_precision'] == 1.0
  one_of_two = truth.copy()
  one_of_two[[18, 0]] = one_of_two[[0, 18]]
  assert rc.rank_statistics(one_of_two, truth, 10, 0)['top10_precision'] == 0.5
  assert rc.rank_statistics(-truth, truth, 10, 0)['top10_precision'] == 0.0
  assert rc.rank_statistics([1, 2, 3], [1, 2, 3], 10, 0)['top10_precision'] == 1.0  # at least 1


def _results(stat):
  return {'statistics': {'stand_alone': {'full': stat}}, 'architectures': [], 'size_unit': '',
          'scores': {'stand_alone': {'full': []}, 'one_shot': {}}}


def test_architectures_are_distinct_spread_by_flops_and_fixed_by_seed():
  space = spos_stage.one_shot_space('spos_cifar')
  archs = rc.choose_architectures(space, 10, 6, 300, 12.0, 16.0, seed=3)
  mflops = [spos.cost(spos.SPACES['spos_cifar'], a, 10)[0] / 1e6 for a in archs]
  assert len(set(archs)) == 6 and mflops == sorted(mflops)
  assert 12.0 <= mflops[0] and mflops[-1] <= 16.0 and mflops[-1] - mflops[0] > 2.0
  assert archs == rc.choose_architectures(space, 10, 6, 300, 12.0, 16.0, seed=3)
  assert archs != rc.choose_architectures(space, 10, 6, 300, 12.0, 16.0, seed=4)
  with pytest.raises(ValueError, match='distinct paths'):  # only 2 paths cost <= 1.8 M
    rc.choose_architectures(spos_stage.one_shot_space('spos_tiny'), 10, 3, 50, 0.0, 1.8, seed=0)


def test_darts_option_gives_distinct_valid_genotypes_spread_by_convolutions():
  names = rc.darts_architectures(5, 100, init_channels=8, layers=3, seed=0)
  assert len(set(names)) == 5 and names == rc.darts_architectures(5, 100, 8, 3, seed=0)
  convs = [rc.darts_convolutions(darts.parse_name(n)['genotype']) for n in names]
  assert convs == sorted(convs) and convs[-1] - convs[0] >= 4
  assert all(darts.parse_name(n)['init_channels'] == 8 for n in names)
  config = rc_config.get_config('smoke')
  config.space = 'darts'
  with pytest.raises(ValueError, match='one_shot=False'):
    rc.check_config(config)


def test_bad_configs_are_named():
  config = rc_config.get_config('smoke')
  config.variants = 'full,no_such_variant'
  with pytest.raises(ValueError, match='no_such_variant'):
    rc.check_config(config)
  config = rc_config.get_config('smoke')
  config.train.image_size = 64
  with pytest.raises(ValueError, match='train.image_size'):
    rc.check_config(config)


def test_a_synthetic_set_made_once_is_reused_not_synthesized_again(tmp_path):
  from dfnas_jax import stages
  from dfnas_jax.configs import synthesize as synthesize_config
  made = synthesize_config.get_config('smoke')
  made.method = 'gaussian_noise'  # the same TFDS output, in seconds
  directory = stages.run(made, str(tmp_path / 'made'))['dataset_dir']
  config = rc_config.get_config('smoke')
  config.update(variants='gaussian_noise,full', synthetic_datasets=f'gaussian_noise={directory}')
  rc.check_config(config)
  study = rc.Study(config, str(tmp_path / 'study'))
  assert study.data('gaussian_noise') == directory
  assert study.num_images('gaussian_noise') == 32
  assert not (tmp_path / 'study').exists()  # nothing synthesized
  config.synthetic_datasets = f'no_such_variant={directory}'
  with pytest.raises(ValueError, match='no_such_variant=.* must be VARIANT=DIR'):
    rc.check_config(config)
  config.synthetic_datasets = f'full={directory}'
  config.synthesis.num_rounds = 4
  with pytest.raises(ValueError, match='holds 32 images.* = 64'):
    rc.check_config(config)


def _smoke(data_dir, **overrides):
  config = rc_config.get_config('smoke')
  config.update(num_architectures=2, variants='gaussian_noise', real_dataset='cifar10_jpeg',
                real_data_dir=data_dir, eval_dataset='cifar10_jpeg', eval_data_dir=data_dir,
                eval_split='train[45000:45064]', download=False)
  config.train.num_train_steps = 2
  config.update(overrides)
  return config


def test_study_writes_its_table_and_notebook_05_reruns_it_from_its_cells(data_dir, tmp_path,
                                                                         quick_compiles):
  workdir = tmp_path / 'study'
  rc.run(_smoke(data_dir), str(workdir))
  results = json.loads((workdir / 'results.json').read_text())
  assert len(results['architectures']) == 2 and len(results['real_accuracy']) == 2
  for version in rc.VERSIONS:
    assert set(results['statistics'][version]) == {'gaussian_noise'}
    scores = results['scores'][version]['gaussian_noise']
    assert len(scores) == 2 and all(0 <= a <= 1 for a in scores)
    assert (workdir / f'{version}.png').stat().st_size > 0
  assert results['num_images'] == {'gaussian_noise': 32}
  assert results['eval_data'] == f'cifar10_jpeg {notebooks.EVAL_SPLIT}'
  assert results['real_train_data'] == 'cifar10_jpeg train[:256]'
  assert results['size_unit'] == 'MFLOPs' and results['size'] == sorted(results['size'])
  table = (workdir / 'results.md').read_text()
  assert '| stand_alone | gaussian_noise |' in table and '| one_shot | gaussian_noise |' in table
  cells = sorted(str(p.relative_to(workdir)) for p in (workdir / 'cells').glob('**/*.json'))
  assert cells == ['cells/one_shot/gaussian_noise.json',
                   *[f'cells/stand_alone/{v}/{i}.json' for v in ('gaussian_noise', 'real')
                     for i in (0, 1)]]
  kept = {p: p.stat().st_mtime_ns for p in (workdir / 'cells').glob('**/*.json')}

  # The notebook on the same work directory and config (fewer bootstrap samples): every
  # cell is reused, the tables are recomputed from them, and it shows the study.
  nb = notebooks.run('05_consistency', {
      'SCALE': 'smoke', 'WORKDIR': str(workdir),
      'REAL_DATASET': 'cifar10_jpeg', 'REAL_DATA_DIR': data_dir, 'REAL_TRAIN_SPLIT': 'train[:256]',
      'EVAL_DATASET': 'cifar10_jpeg', 'EVAL_DATA_DIR': data_dir,
      'EVAL_SPLIT': notebooks.EVAL_SPLIT, 'DOWNLOAD': False,
      'CONFIG_OVERRIDES': {'num_architectures': 2, 'variants': 'gaussian_noise',
                           'train.num_train_steps': 2, 'num_bootstrap': 10}})
  assert {p: p.stat().st_mtime_ns for p in kept} == kept
  again = json.loads((workdir / 'results.json').read_text())
  assert again['scores'] == results['scores']
  for png in ('architectures.png', 'agreement.png'):
    assert (workdir / png).stat().st_size > 0, png
  # Architectures by size, stand-alone and one-shot rankings, tau and regret per variant.
  assert notebooks.images_shown(nb) == 4
  table = notebooks.markdown_shown(nb)
  assert '| stand_alone | gaussian_noise |' in table and '| one_shot | gaussian_noise |' in table
  out = notebooks.stdout(nb)
  assert 'regret' in out and out.count('cells/') == 5  # 2 real, 2 noise, 1 supernet
  assert 'Cell stand_alone/real/0 reused' in notebooks.stderr(nb)  # its progress log

  with pytest.raises(ValueError, match='other architectures'):
    rc.run(_smoke(data_dir, seed=5), str(workdir))
