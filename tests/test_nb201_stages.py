"""NAS-Bench-201 through the stages: the smoke presets of spos, darts and rank_correlation,
scored against a results table (generated here: every cell, made-up accuracies)."""
import itertools
import json
import re

import numpy as np
import pytest

from dfnas_jax.configs import darts as darts_config
from dfnas_jax.configs import rank_correlation as rc_config
from dfnas_jax.configs import spos as spos_config
from dfnas_jax.data import nasbench201
from dfnas_jax.evaluation import rank_correlation as rc
from dfnas_jax.models import nb201
from dfnas_jax.nas import darts as darts_stage
from dfnas_jax.nas import spos as spos_stage


def _accuracy(ops):
  """Made-up accuracies: more 3x3 convolutions is better, `none` everywhere is chance."""
  return 10.0 + 10 * sum(nb201.OPS[o] == 'nor_conv_3x3' for o in ops) + 0.1 * sum(ops)


@pytest.fixture(scope='module')
def table_path(tmp_path_factory):
  cells = list(itertools.product(range(len(nb201.OPS)), repeat=nb201.NUM_EDGES))
  entries = [{'index': i, 'arch': nb201.arch_to_string(ops), 'cifar10_test_acc_200ep':
              _accuracy(ops), 'cifar10_valid_acc_12ep': _accuracy(ops) / 2}
             for i, ops in enumerate(cells)]
  path = tmp_path_factory.mktemp('nb201') / 'table.json'
  path.write_text(json.dumps({'description': 'test', 'architectures': entries}))
  return str(path)


def _real_eval(config, data_dir):
  config.update(eval_dataset='cifar10_jpeg', eval_data_dir=data_dir,
                eval_split='train[45000:45064]', download=False)
  return config


def test_spos_on_nb201_reports_the_found_cells_benchmark_accuracy(data_dir, table_path,
                                                                  tmp_path, quick_compiles):
  config = _real_eval(spos_config.get_config('nb201_smoke'), data_dir)
  config.benchmark_table = table_path
  summary = spos_stage.run(config, str(tmp_path))
  ops = tuple(summary['best_choices'])
  assert summary['best_architecture'] == nb201.architecture_name(ops, 4, 1)
  assert summary['best_choice_names'] == [nb201.OPS[o] for o in ops]
  table = nasbench201.load(table_path)
  assert summary['benchmark_string'] == nb201.arch_to_string(ops)
  assert summary['benchmark_test_accuracy'] == pytest.approx(_accuracy(ops))
  assert summary['benchmark_rank'] == table.rank(ops)
  assert summary['benchmark_best_test_accuracy'] == pytest.approx(70.0 + 0.1 * 18)
  assert 0 <= summary['final_accuracy'] <= 1


def test_spos_rejects_a_table_for_another_space(table_path, tmp_path):
  config = spos_config.get_config('smoke')
  config.benchmark_table = table_path
  with pytest.raises(ValueError, match='not a NAS-Bench-201 space'):
    spos_stage.run(config, str(tmp_path))
  assert not (tmp_path / 'synthesize').exists()


def test_a_missing_real_retraining_dataset_fails_before_any_work(tmp_path):
  config = spos_config.get_config('nb201_smoke')
  config.update(eval_dataset='', retrain_data='synthetic,real', real_dataset='no_such_data',
                download=False)
  with pytest.raises(ValueError, match="Dataset 'no_such_data' is neither"):
    spos_stage.run(config, str(tmp_path))
  assert not (tmp_path / 'synthesize').exists()
  config.retrain_data = 'real,real'
  with pytest.raises(ValueError, match='retrain_data must be one or both of'):
    spos_stage.run(config, str(tmp_path))


def test_a_warm_up_longer_than_the_real_retraining_fails_before_any_work(data_dir, tmp_path):
  config = spos_config.get_config('nb201_smoke')
  config.update(eval_dataset='', retrain_data='synthetic,real', real_dataset='cifar10_jpeg',
                real_data_dir=data_dir, real_train_split='train[:640]', download=False)
  config.retrain.update(batch_size=64, num_train_steps=20, warmup_epochs=2.0)
  with pytest.raises(ValueError, match=re.escape(
      "retrain.warmup_epochs=2.0 is 20 steps on 'cifar10_jpeg' 'train[:640]' (640 examples, "
      '10 steps per epoch at batch 64), not fewer than the whole schedule '
      '(retrain.num_train_steps=20): lower retrain.warmup_epochs.')):
    spos_stage.run(config, str(tmp_path))
  assert not (tmp_path / 'synthesize').exists()


def test_darts_on_nb201_derives_the_argmax_cell(data_dir, table_path, tmp_path, quick_compiles):
  config = _real_eval(darts_config.get_config('nb201_smoke'), data_dir)
  config.benchmark_table = table_path
  # The found cell retrained twice: on the synthetic data, and on real images with hard labels.
  config.update(retrain_data='synthetic,real', real_dataset='cifar10_jpeg', real_data_dir=data_dir,
                real_train_split='train[:64]')
  summary = darts_stage.run(config, str(tmp_path))
  finals = summary['final_by_train_data']
  assert summary['final_train_data'] == 'synthetic' and list(finals) == ['synthetic', 'real']
  assert summary['final_accuracy'] == finals['synthetic']['accuracy']
  assert finals['synthetic']['loss'] == 'distillation'
  assert finals['real']['loss'] == 'cross_entropy'
  assert finals['real']['train_data'] == 'cifar10_jpeg train[:64]'
  real = json.loads((tmp_path / 'retrain_real' / 'summary.json').read_text())
  assert real['label_smoothing'] == 0.1 and real['eval_split'] == 'train[45000:45064]'
  assert finals['real']['model_dir'] == str(tmp_path / 'retrain_real' / 'model')
  saved = json.loads((tmp_path / 'search' / 'genotypes' / 'epoch_002.json').read_text())
  ops = tuple(saved['ops'])
  assert summary['genotype'] == {'cell': nb201.arch_to_string(ops), 'ops': list(ops)}
  weights = np.asarray(saved['weights']['cell'])  # rounded to 4 places: near-ties stay ties
  assert np.all(weights[np.arange(6), ops] >= weights.max(axis=1) - 1e-4)
  assert np.allclose(weights.sum(axis=1), 1.0, atol=1e-3)
  assert summary['architecture'] == nb201.architecture_name(ops, 4, 1)
  assert summary['benchmark_test_accuracy'] == pytest.approx(_accuracy(ops))
  assert (tmp_path / 'search' / 'alphas.png').stat().st_size > 0
  assert 0 <= summary['final_accuracy'] <= 1


def test_nb201_study_scores_table_cells_with_real_data_controls(data_dir, table_path, tmp_path,
                                                                 quick_compiles):
  config = rc_config.get_config('nb201_smoke')
  config.update(benchmark_table=table_path, real_dataset='cifar10_jpeg', real_data_dir=data_dir,
                download=False, stand_alone=True, stand_alone_architectures=2,
                eval_dataset='cifar10_jpeg', eval_data_dir=data_dir,
                eval_split='train[45000:45064]')
  rc.run(config, str(tmp_path))
  results = json.loads((tmp_path / 'results.json').read_text())
  table = nasbench201.load(table_path)
  rows = table.sample(5, config.seed)
  assert results['benchmark_strings'] == [nb201.arch_to_string(table.archs[r]) for r in rows]
  assert results['real_accuracy'] == pytest.approx([table.test_accuracy[r] / 100 for r in rows])
  assert set(results['scores']['one_shot']) == {'full', 'real_same_count'}
  assert results['scores']['reference']['nb201_12ep'] == pytest.approx(
      [table.valid_accuracy_12ep[r] / 100 for r in rows])
  # The 12-epoch proxy here is half the truth: a perfect ranking.
  assert results['statistics']['reference']['nb201_12ep']['kendall_tau'] == pytest.approx(1.0)
  assert results['num_images'] == {'full': 32, 'real_same_count': 30}
  # Stand-alone: the first 2 cells, trained on real data (hard labels), on `full` and on
  # as many real images as `full` has (distilled like it), each scored against the table
  # on those 2.
  assert results['stand_alone_architectures'] == 2
  stand_alone = results['scores']['stand_alone']
  assert set(stand_alone) == {'real', 'full', 'real_same_count'}
  assert all(len(s) == 2 for s in stand_alone.values())
  expected = {'real': ('cross_entropy', 256), 'full': ('distillation', 32),
              'real_same_count': ('distillation', 30)}  # 3 per class, as in its supernet
  for v, (loss, count) in expected.items():
    for i in range(2):
      model = json.loads((tmp_path / 'stand_alone' / v / str(i) / 'summary.json').read_text())
      assert model['architecture'] == results['architectures'][i]
      assert model['eval_accuracy'] == pytest.approx(stand_alone[v][i])
      assert (model['loss'], model['num_train_examples']) == (loss, count), v
  def statistics(scores):  # as JSON: an undefined interval (NaN) compares equal
    return json.dumps(rc.rank_statistics(scores, results['real_accuracy'][:2],
                                         config.num_bootstrap, config.seed), sort_keys=True)

  stats = results['statistics']
  assert json.dumps(stats['stand_alone']['real'], sort_keys=True) == statistics(
      stand_alone['real'])
  # The supernets' ranking of the same 2 cells, for a like-for-like comparison.
  assert json.dumps(stats['one_shot_same_cells']['full'], sort_keys=True) == statistics(
      results['scores']['one_shot']['full'][:2])
  report = (tmp_path / 'results.md').read_text()
  assert '| one_shot | real_same_count |' in report and '| stand_alone | real |' in report
  assert (tmp_path / 'stand_alone.png').stat().st_size > 0

  # Stand-alone only, on the same work directory: every cell is reused, and the image
  # counts come from the data now that no supernet reports them.
  config.one_shot = False
  rc.run(config, str(tmp_path))
  again = json.loads((tmp_path / 'results.json').read_text())
  assert again['scores']['stand_alone'] == stand_alone and not again['scores']['one_shot']
  assert again['num_images'] == results['num_images']


def test_nb201_study_needs_a_table_and_something_to_rank():
  config = rc_config.get_config('nb201_smoke')
  with pytest.raises(ValueError, match='needs benchmark_table'):
    rc.check_config(config)
  config.benchmark_table, config.one_shot = 'table.json', False
  with pytest.raises(ValueError, match='nothing to rank'):
    rc.check_config(config)
  config.stand_alone, config.eval_dataset = True, ''
  with pytest.raises(ValueError, match='eval_dataset'):
    rc.check_config(config)
  config = rc_config.get_config('smoke')
  config.stand_alone_architectures = 2  # a SPOS study's ground truth needs all K
  with pytest.raises(ValueError, match='stand_alone_architectures is for NAS-Bench-201'):
    rc.check_config(config)
  config = rc_config.get_config('smoke')
  config.variants = 'full,real_same_count'  # only NAS-Bench-201 has real-data supernets
  with pytest.raises(ValueError, match='real_same_count'):
    rc.check_config(config)
