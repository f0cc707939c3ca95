"""The zero_shot stage: drawing and numbering cells, the resumable scoring loop, its config
checks (before any work), and the smoke preset end to end against a made-up benchmark
table, resumed, then shown by notebook 06 from the same work directory."""
import json
import os

import numpy as np
import pytest
from scipy import stats

from dfnas_jax import stages
from dfnas_jax.configs import zero_shot as zero_shot_config
from dfnas_jax.models import nb201
from dfnas_jax.nas import cell_scoring, zero_shot
from dfnas_jax.nas import zero_cost as zc
from tests import notebooks
from tests.test_nb201_stages import _accuracy, table_path  # noqa: F401 (a fixture)


def test_cells_are_numbered_one_to_one_and_drawn_by_seed():
  assert zero_shot.cell_of_number(0) == (0,) * 6
  assert zero_shot.cell_number((0, 0, 0, 0, 0, 1)) == 1
  assert zero_shot.cell_number((1, 0, 0, 0, 0, 0)) == 5 ** 5
  every = zero_shot.draw_cells(0, seed=3)
  assert len(set(every)) == nb201.NUM_ARCHITECTURES
  assert [zero_shot.cell_number(c) for c in every] == list(range(nb201.NUM_ARCHITECTURES))
  drawn = zero_shot.draw_cells(50, seed=3)
  assert len(set(drawn)) == 50 and drawn == zero_shot.draw_cells(50, seed=3)
  assert drawn != zero_shot.draw_cells(50, seed=4)


def test_scoring_resumes_after_the_last_saved_cell_and_refuses_other_cells(tmp_path):
  path = str(tmp_path / 'scores.json')
  strings = [f'cell{i}' for i in range(5)]
  calls = []

  def score(i):
    calls.append(i)
    if len(calls) == 4:
      raise KeyboardInterrupt  # killed while scoring the fourth cell
    return {'scores': {'x': float(i)}}

  with pytest.raises(KeyboardInterrupt):
    cell_scoring.score_cells(path, strings, score, str(tmp_path), {'settings': 1}, save_every=2)
  assert json.loads((tmp_path / 'scores.json').read_text())['benchmark_strings'] == strings[:2]
  calls.clear()
  done = cell_scoring.score_cells(path, strings, lambda i: {'scores': {'x': float(i)}} if not
                                  calls.append(i) else None, str(tmp_path), {'settings': 1},
                                  save_every=2)
  assert calls == [2, 3, 4] and [d['scores']['x'] for d in done] == [0, 1, 2, 3, 4]
  saved = json.loads((tmp_path / 'scores.json').read_text())
  assert saved['settings'] == 1 and len(saved['cells']) == 5
  with pytest.raises(ValueError, match='holds the scores of other cells or settings'):
    cell_scoring.score_cells(path, ['other'] + strings, score, str(tmp_path), {'settings': 1})
  with pytest.raises(ValueError, match='holds the scores of other cells or settings'):
    cell_scoring.score_cells(path, strings, score, str(tmp_path), {'settings': 2})


@pytest.mark.parametrize('field, value, message', [
    ('estimator', 'jacob_cov,nope', "estimator='jacob_cov,nope': one or more of"),
    ('estimator', 'params,params', 'none twice'),
    ('space', 'nb201:|none~0|+|none~0|none~1|+|none~0|none~1|none~2|', 'without a cell'),
    ('train_space', 'spos_tiny', "train_space='spos_tiny': expected the size"),
    ('top_k', 7, r'top_k=7 must be in \[1, num_architectures=6\]'),
    ('num_architectures', 20_000, 'NAS-Bench-201 has 15625 cells'),
    ('image_size', 30, 'image_size=30: NAS-Bench-201 networks need image sides divisible'),
    ('batch_size', 32, r'batch_size x num_batches = 32 scoring images, more than the 22'),
    ('pick_z', -1.0, r'pick_z=-1.0: expected >= 0 standard errors'),
])
def test_a_bad_config_fails_before_any_work(field, value, message, tmp_path):
  config = zero_shot_config.get_config('smoke')
  config[field] = value
  with pytest.raises(ValueError, match=message):
    stages.run(config, str(tmp_path))
  assert not os.listdir(tmp_path)  # nothing synthesized, scored or trained


def test_group_estimators_need_the_batch_to_split_into_groups():
  config = zero_shot_config.get_config('smoke')
  config.num_groups = 3  # does not divide batch_size 8: fine while no estimator reads groups
  stages.check(config)
  config.estimator = 'zico'
  with pytest.raises(ValueError, match=r'num_groups=3 must be >= 2 and divide the batch \(8\)'):
    stages.check(config)


def test_the_ranking_is_one_estimator_or_the_mean_rank_of_several():
  records = [{'scores': {'a': a, 'b': b}} for a, b in ((1., 3.), (np.nan, 2.), (2., 1.))]
  np.testing.assert_array_equal(zero_shot.ranking(['a'], records), [1., -np.inf, 2.])
  np.testing.assert_array_equal(zero_shot.ranking(['a', 'b'], records),
                                zc.mean_rank({'a': [1., np.nan, 2.], 'b': [3., 2., 1.]}))


def test_the_pick_leaves_the_zero_cost_top1_only_for_a_significantly_better_cell():
  top = [{'zero_cost_rank': k + 1, 'heldout_accuracy': a} for k, a in enumerate((.4, .5, .5))]
  # Over 50 images the standard error of 0.5 - 0.4 is sqrt((0.24 + 0.25) / 50) = 0.099, so
  # the difference is 1.01 of them.
  assert zero_shot.pick(top, 50, z=2.0) is top[0]
  assert zero_shot.pick(top, 50, z=1.02) is top[0]
  assert zero_shot.pick(top, 50, z=1.0) is top[1]  # of the tie, the better zero-cost rank
  assert zero_shot.pick(top, 400, z=2.0) is top[1]  # SE 0.035 over 400 images
  assert zero_shot.pick(top, 50, z=0.0) is top[1]
  level = [dict(t, heldout_accuracy=0.4) for t in top]
  assert zero_shot.pick(level, 50, z=0.0) is level[0]


@pytest.mark.slow  # synthesizes, scores and trains (about a minute), then runs notebook 06
def test_smoke_search_picks_from_its_top_k_resumes_and_notebook_06_shows_it(
    table_path, tmp_path, quick_compiles):  # noqa: F811 (the fixture imported above)
  workdir = tmp_path / 'zero_shot'
  config = zero_shot_config.get_config('smoke')
  config.benchmark_table = table_path
  summary = stages.run(config, str(workdir))

  # The cells drawn by seed, scored by jacob_cov + synflow + params, ranked by mean rank.
  cells = zero_shot.draw_cells(6, config.seed)
  [path] = (workdir / 'scores').glob('*.json')
  assert path.name == 'jacob_cov+params+synflow.json'
  saved = json.loads(path.read_text())
  assert saved['benchmark_strings'] == [nb201.arch_to_string(c) for c in cells]
  assert all(set(c['scores']) == {'jacob_cov', 'synflow', 'params'} for c in saved['cells'])
  assert [c['scores']['params'] for c in saved['cells']] == [
      nb201.cost(c, 10, 2, 1)[1] for c in cells]
  combined = zc.mean_rank({n: [c['scores'][n] for c in saved['cells']]
                           for n in summary['estimators']})
  top = [cells[i] for i in np.argsort(-combined, kind='stable')[:2]]
  assert [tuple(t['ops']) for t in summary['top']] == top
  assert [t['zero_cost_rank'] for t in summary['top']] == [1, 2]
  assert summary['combination'] == 'mean_rank' and summary['num_architectures'] == 6

  # Each of the top 2 trained on the training images, scored on the held-out ones; the pick
  # is the zero-cost top-1 unless another is significantly more accurate.
  for t in summary['top']:
    trained = json.loads((workdir / 'train' / f"2x1_{zero_shot.cell_number(t['ops'])}" /
                          'summary.json').read_text())
    assert trained['architecture'] == nb201.architecture_name(t['ops'], 2, 1)
    assert trained['num_train_examples'] + trained['num_eval_examples'] == 32
    assert trained['num_eval_examples'] == summary['heldout_images'] > 0
    assert t['heldout_accuracy'] == trained['eval_accuracy']
    assert t['benchmark_test_accuracy'] == pytest.approx(_accuracy(t['ops']))
  best = zero_shot.pick(summary['top'], summary['heldout_images'], config.pick_z)
  assert summary['pick_z'] == config.pick_z == 2.0
  assert summary['best_ops'] == best['ops']
  assert summary['best_benchmark_string'] == nb201.arch_to_string(best['ops'])
  assert summary['benchmark_test_accuracy'] == pytest.approx(_accuracy(best['ops']))
  truth = [_accuracy(c) for c in cells]
  assert summary['benchmark']['sample_best_test_accuracy'] == pytest.approx(max(truth))
  assert summary['benchmark']['zero_cost_top1_test_accuracy'] == pytest.approx(
      _accuracy(top[0]))
  assert summary['benchmark']['kendall_tau'] == pytest.approx(
      stats.kendalltau(combined, truth).statistic)
  assert (workdir / 'scores.png').stat().st_size > 0

  # Resume: cut the scores back to 3 cells and drop a training's summary (killed after its
  # last checkpoint): the rerun scores cells 3-5 only and trains nothing again.
  scores = [c['scores'] for c in saved['cells']]
  saved.update(benchmark_strings=saved['benchmark_strings'][:3], cells=saved['cells'][:3])
  path.write_text(json.dumps(saved))
  first = workdir / 'train' / f"2x1_{zero_shot.cell_number(top[0])}" / 'summary.json'
  second = workdir / 'train' / f"2x1_{zero_shot.cell_number(top[1])}" / 'summary.json'
  kept, checkpoints = second.stat().st_mtime_ns, sorted(os.listdir(first.parent / 'checkpoints'))
  first.unlink()
  again = stages.run(config, str(workdir))
  resumed = json.loads(path.read_text())
  assert [c['seconds'] for c in resumed['cells'][:3]] == [c['seconds'] for c in saved['cells']]
  for got, want in zip(resumed['cells'], scores):  # cells 3-5 scored again, as before
    assert got['scores'] == pytest.approx(want, nan_ok=True)
  assert second.stat().st_mtime_ns == kept
  assert sorted(os.listdir(first.parent / 'checkpoints')) == checkpoints
  assert [t['heldout_accuracy'] for t in again['top']] == [
      t['heldout_accuracy'] for t in summary['top']]
  assert again['best_ops'] == summary['best_ops']

  # Notebook 06 on the same work directory: everything is reused and shown.
  nb = notebooks.run('06_zero_shot', {'SCALE': 'smoke', 'WORKDIR': str(workdir),
                                      'SYNTHETIC_DIR': '', 'BENCHMARK_TABLE': table_path})
  assert second.stat().st_mtime_ns == kept
  assert notebooks.images_shown(nb) == 2  # scores.png, the training curves
  table = notebooks.markdown_shown(nb)
  assert all(f"`{t['benchmark_string']}`" in table for t in summary['top'])
  out = notebooks.stdout(nb)
  assert f"Chosen cell: {summary['best_benchmark_string']}" in out
  assert '6 cells scored by jacob_cov, synflow, params' in out
  assert 'Read back the scores of 6 of 6 cells' in notebooks.stderr(nb)

