"""How good is the synthetic data: a student distilled on each ablation, at one budget.

Each row synthesizes the same number of images from the same teacher with one
set of method switches, then distils the same student for the same number of
steps on it (soft labels from the teacher, recomputed on each augmented crop)
and scores it on a real held-out split:

  gaussian_noise  teacher-labelled N(0, 1) noise, no optimization
  deepinversion   per-image inversion: hard targets, canvas = window (jitter only), one
                  resolution
  +rlc            ... + recursive label calibration
  +regional       ... + regional update (random windows of a larger canvas)
  inversion       ... + multi-resolution (the per-image method)
  full            the default method: the same terms, images made by a carried generator
  real_same_count as many real training images (the first of --real_split), no
                  synthesis: what a synthetic image is worth against a real one

  python benchmarks/data_quality.py --workdir=/tmp/data_quality \
      --eval_dataset=cifar10_jpeg --eval_data_dir=$TFDS --eval_split='train[45000:]' \
      --real_dataset=cifar10_jpeg --real_data_dir=$TFDS --nodownload

With several --images (and --epochs, a student budget that grows with the images)
it is the scaling curve: every row at every N and --seeds, e.g.

  python benchmarks/data_quality.py --workdir=/tmp/scaling --images=256,1024,4096 \
      --rows=full,real_same_count,gaussian_noise --epochs=32 ...   # the data flags above

Rows resume: a row whose student finished is read back, a half-done one
continues where its stages stopped. Each run writes WORKDIR/results.md and
results.json, and scaling.json (one entry per student finished in WORKDIR, this run's
or an earlier one's: data, images, seed, student accuracy, synthesis seconds per
image) with its plot scaling.png.
"""
import glob
import math
import os
import time

import ml_collections
from absl import app, flags, logging

from dfnas_jax import plots, stages
from dfnas_jax import workdir as wd
from dfnas_jax.configs import retrain as retrain_config
from dfnas_jax.configs import synthesize as synthesize_config
from dfnas_jax.evaluation.rank_correlation import VARIANTS

# Synthesis overrides per row; the consistency study's variants where they coincide.
ROWS = {
    'gaussian_noise': VARIANTS['gaussian_noise'],
    'deepinversion': VARIANTS['deepinversion'],
    '+rlc': {'method': 'inversion', 'regional_update': False, 'multi_resolution': False},
    '+regional': {'method': 'inversion', 'multi_resolution': False},
    'inversion': {'method': 'inversion'},
    'full': VARIANTS['full'],
}
REAL_ROW = 'real_same_count'
FLAGS = flags.FLAGS


def define_flags():
  """The command line's flags (defined only when run, so that tests can import this file)."""
  flags.DEFINE_string('workdir', None, 'One sub-directory per row.')
  flags.DEFINE_list('rows', [*ROWS, REAL_ROW], f'Rows to run, of {[*ROWS, REAL_ROW]}.')
  flags.DEFINE_string('teacher', 'cifar10_resnet20', 'Zoo teacher.')
  flags.DEFINE_list('images', ['256'], 'Images per row (num_rounds rounds of N / num_rounds); '
                    'several: every row at each.')
  flags.DEFINE_list('seeds', ['0'], 'Seeds (of the synthesis and of the student) of every row.')
  flags.DEFINE_integer('num_rounds', 2, 'RLC rounds.')
  flags.DEFINE_integer('batch_size', 128, 'Synthesis batch.')
  flags.DEFINE_string('synth_preset', '', 'configs/synthesize.py preset of the synthetic rows '
                      '(its name is appended to theirs: full_fast).')
  flags.DEFINE_multi_string('synth', [], 'Extra synthesis config overrides, key=value '
                            '(e.g. --synth=bn_weight=0.1), applied to every row.')
  flags.DEFINE_string('student', 'cifar_resnet20', 'Student architecture.')
  flags.DEFINE_integer('student_steps', 400, 'Distillation steps (the least, with --epochs).')
  flags.DEFINE_float('epochs', 0.0, '> 0: distil max(student_steps, epochs x N / student_batch) '
                     'steps, a budget that grows with the images.')
  flags.DEFINE_integer('student_batch', 64, 'Distillation batch.')
  flags.DEFINE_float('student_lr', 0.05, 'Peak learning rate (cosine, no warm-up).')
  flags.DEFINE_string('eval_dataset', 'cifar10', 'Real TFDS dataset for the score.')
  flags.DEFINE_string('eval_data_dir', None, 'Its TFDS data_dir.')
  flags.DEFINE_string('eval_split', 'test', 'Its split.')
  flags.DEFINE_string('real_dataset', 'cifar10', f'Real TFDS training data of the {REAL_ROW} row.')
  flags.DEFINE_string('real_data_dir', None, 'Its TFDS data_dir.')
  flags.DEFINE_string('real_split', 'train', 'Its split; the row takes its first images.')
  flags.DEFINE_bool('download', True, 'Let TFDS download the real datasets.')
  flags.mark_flags_as_required(['workdir'])


def _override(config, assignment: str):
  """key=value, the key dotted into sub-configs (generator.meta_step=0.5)."""
  key, sep, text = assignment.partition('=')
  *parents, name = key.split('.')
  node = config
  for part in parents:
    node = node.get(part)
    if not isinstance(node, ml_collections.ConfigDict):
      node = None
      break
  if not sep or node is None or name not in node or isinstance(node[name],
                                                               ml_collections.ConfigDict):
    raise ValueError(f'--synth={assignment!r}: expected key=value with a key of the '
                     f'synthesize config ({sorted(config)}; a dotted key for a sub-config, '
                     f'e.g. generator.meta_step).')
  old = node[name]
  if isinstance(old, bool):
    if text.lower() not in ('true', 'false'):
      raise ValueError(f'--synth={assignment!r}: {key} takes true or false.')
    node[name] = text.lower() == 'true'
  else:
    node[name] = type(old)(text)


def label(row: str) -> str:
  """The row's name in the results: synthetic rows carry the synthesis preset."""
  synthetic = row not in (REAL_ROW, 'gaussian_noise')
  return f'{row}_{FLAGS.synth_preset}' if synthetic and FLAGS.synth_preset else row


def synthesis_config(row: str, images: int, seed: int):
  config = synthesize_config.get_config(FLAGS.synth_preset)
  config.update(teacher=FLAGS.teacher, images_per_round=images // FLAGS.num_rounds,
                num_rounds=FLAGS.num_rounds, batch_size=min(FLAGS.batch_size, images),
                seed=seed)
  for assignment in FLAGS.synth:
    _override(config, assignment)
  config.update(ROWS[row])
  return config


def student_steps(images: int) -> int:
  if FLAGS.epochs <= 0:
    return FLAGS.student_steps
  return max(FLAGS.student_steps, math.ceil(FLAGS.epochs * images / FLAGS.student_batch))


def student_config(dataset: str, images: int, seed: int, split: str = 'train', data_dir=None,
                   augment: str = 'crop'):
  config = retrain_config.get_config()
  steps = student_steps(images)
  config.update(
      architecture=FLAGS.student, dataset=dataset, train_split=split, augment=augment,
      teacher=FLAGS.teacher, seed=seed,
      soft_labels='teacher', eval_dataset=FLAGS.eval_dataset, eval_split=FLAGS.eval_split,
      download=FLAGS.download, batch_size=FLAGS.student_batch,
      num_train_steps=steps, learning_rate=FLAGS.student_lr, warmup_epochs=0.0,
      eval_every_steps=10 * steps)
  config.eval_data_dir, config.data_dir = FLAGS.eval_data_dir, data_dir
  return config


def run_row(row: str, images: int, seed: int):
  base = os.path.join(FLAGS.workdir, label(row), f'n{images}-s{seed}')
  done = os.path.join(base, 'student', 'summary.json')
  if row == REAL_ROW:  # no synthesis; the teacher labels real images as it does synthetic ones
    student = (wd.read_json(done) if os.path.exists(done) else stages.run(
        student_config(FLAGS.real_dataset, images, seed, f'{FLAGS.real_split}[:{images}]',
                       FLAGS.real_data_dir, augment='cifar'), os.path.join(base, 'student')))
    return {'num_images': images, 'wall_time_s': 0.0}, student
  if os.path.exists(done):
    return wd.read_json(os.path.join(base, 'synthesize', 'summary.json')), wd.read_json(done)
  start = time.time()
  synthesis = stages.run(synthesis_config(row, images, seed), os.path.join(base, 'synthesize'))
  student = stages.run(student_config(synthesis['dataset_dir'], images, seed),
                       os.path.join(base, 'student'))
  logging.info('Row %s, %d images, seed %d: student accuracy %.4f (%.0f s).', label(row),
               images, seed, student['eval_accuracy'], time.time() - start)
  return synthesis, student


def scaling_rows(workdir: str):
  """Every finished student under `workdir`, as the scaling curve's entries."""
  entries = []
  for done in sorted(glob.glob(os.path.join(workdir, '*', 'n*-s*', 'student', 'summary.json'))):
    base = os.path.dirname(os.path.dirname(done))
    images, seed = (int(part[1:]) for part in os.path.basename(base).split('-'))
    synthesis = os.path.join(base, 'synthesize', 'summary.json')
    seconds = wd.read_json(synthesis)['wall_time_s'] if os.path.exists(synthesis) else 0.0
    student = wd.read_json(done)
    entries.append({'data': os.path.basename(os.path.dirname(base)), 'images': images,
                    'seed': seed, 'student_accuracy': student['eval_accuracy'],
                    'synthesis_cpu_s_per_image': round(seconds / images, 4),
                    'student_steps': student['num_train_steps'],
                    'student_s': round(student['wall_time_s'])})
  return entries


def plot_scaling(entries, path: str) -> str:
  """Student accuracy against N, a line per data source, error bars over the seeds."""
  lines = {}
  for data in sorted({e['data'] for e in entries}):
    xs = sorted({e['images'] for e in entries if e['data'] == data})
    accs = [[100 * e['student_accuracy'] for e in entries
             if e['data'] == data and e['images'] == x] for x in xs]
    lines[data] = (xs, [sum(a) / len(a) for a in accs],
                   [(max(a) - min(a)) / 2 for a in accs])
  return plots.error_bar_lines(lines, path, xlabel='synthetic (or real) images N',
                               ylabel='student accuracy on real held-out images (%)',
                               log_x=True)


def main(argv):
  del argv
  unknown = [r for r in FLAGS.rows if r not in ROWS and r != REAL_ROW]
  if unknown:
    raise app.UsageError(f'Unknown rows {unknown}; rows: {[*ROWS, REAL_ROW]}')
  if '[' in FLAGS.real_split:
    raise app.UsageError(f'--real_split={FLAGS.real_split!r}: give a whole split; the '
                         f'{REAL_ROW} row takes its first images.')
  images = [int(n) for n in FLAGS.images]
  seeds = [int(s) for s in FLAGS.seeds]
  odd = [n for n in images if n % FLAGS.num_rounds]
  if odd:
    raise app.UsageError(f'--images {odd}: each must be a multiple of --num_rounds '
                         f'({FLAGS.num_rounds}).')
  results = {}
  for n in images:
    for seed in seeds:
      for row in FLAGS.rows:
        synthesis, student = run_row(row, n, seed)
        results[f'{label(row)}/n{n}-s{seed}'] = {
            'student_accuracy': student['eval_accuracy'],
            'teacher_agrees_with_target': synthesis.get('teacher_agrees_with_target'),
            'mean_teacher_confidence': synthesis.get('mean_teacher_confidence'),
            'num_images': synthesis['num_images'],
            'synthesis_s': round(synthesis['wall_time_s']),
            'student_s': round(student['wall_time_s'])}
  lines = ['| data | images | student accuracy | teacher agrees with target | '
           'mean teacher confidence | synthesis s | student s |', '|---|---|---|---|---|---|---|']
  number = lambda x: '-' if x is None else f'{x:.2f}'
  for row, r in results.items():
    lines.append(f"| {row} | {r['num_images']} | {100 * r['student_accuracy']:.1f}% | "
                 f"{number(r['teacher_agrees_with_target'])} | "
                 f"{number(r['mean_teacher_confidence'])} | {r['synthesis_s']} | "
                 f"{r['student_s']} |")
  table = '\n'.join(lines) + '\n'
  wd.write_json(os.path.join(FLAGS.workdir, 'results.json'),
                {'rows': results, 'flags': {f: FLAGS[f].value for f in (
                    'teacher', 'images', 'seeds', 'num_rounds', 'synth_preset', 'synth',
                    'student', 'student_steps', 'epochs', 'student_batch', 'student_lr',
                    'eval_dataset', 'eval_split', 'real_dataset', 'real_split')}})
  wd.atomic_write_bytes(os.path.join(FLAGS.workdir, 'results.md'), table.encode())
  entries = scaling_rows(FLAGS.workdir)
  wd.write_json(os.path.join(FLAGS.workdir, 'scaling.json'), entries)
  plot_scaling(entries, os.path.join(FLAGS.workdir, 'scaling.png'))
  print(table)


if __name__ == '__main__':
  define_flags()
  app.run(main)
