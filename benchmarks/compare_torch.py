"""The project's hot steps against PyTorch implementations of the same work, in one run.

  python benchmarks/compare_torch.py                      # every row; minutes on 2 CPU cores
  python benchmarks/compare_torch.py --steps=synthesis --repeats=10 --json=/tmp/torch.json

Each row is one hot step: the JAX side is the project's own compiled step, the PyTorch side
a module written here for this benchmark that does the same work (same network, loss terms,
optimizer update and batch). Before timing, both sides run on the same inputs and weights
and must agree: the teacher's logits, the losses and the updated tensors, within the
tolerances of torch_twins/parity.py (each derived from float32 arithmetic there). A row
whose check fails is reported with the differences and not timed; the others still run, the
JSON marks it ('parity': 'failed') and the exit status is 1. Timed calls then alternate
(JAX call, torch call, JAX call, ...), so load from other processes falls on both alike; a
row's time per side is the median of --repeats calls after --warmup untimed pairs. Both
sides run on the CPU: torch with --threads intra-op threads; XLA:CPU runs on its own thread
pool, sized from the host's cores (JAX has no setting for it), so compare at --threads = the
number of cores (default).
With JAX_PLATFORMS=cuda both run on the GPU (torch on CUDA, its calls synchronized before
the clock stops); benchmarks/device.sh runs that at accelerator batch sizes.

Load from other processes hurts torch far more: its OpenMP threads spin at every barrier.
Measured on 2 cores beside a job using ~1.6 of them, the torch synthesis step took 4.5 s at
--threads=2, 0.55 s at 1 thread or with OMP_WAIT_POLICY=PASSIVE, and 0.30 s when that job
was lighter; JAX's took 0.25-0.40 s. So time on an idle machine, or set OMP_WAIT_POLICY=PASSIVE
in the environment; the header prints the load average and that variable.

Rows:
  synthesis      one inversion update as configs/synthesize.py makes it: the shipped
                 cifar10_resnet20, batch 128, canvas 40 / window 32 (a random window and
                 flip per image), every loss term at its default weight, Adam; forward +
                 backward + Adam + clipping on the canvases, full-resolution stage.
  spos_supernet  one SPOS supernet step as configs/spos.py trains it (spos_cifar, batch 32,
                 32 px): the teacher's logits computed in the step, distillation at the
                 config's temperature, SGD as `state_lib.sgd` builds it; the path is an
                 input (`steps.pmap_train_step`, one device). The check runs one fixed
                 path; timing draws a path per (JAX, torch) pair, uniformly among the paths
                 in the config's FLOPs band (the search itself draws by FLOPs bin).
  nb201_supernet the same step on NAS-Bench-201 as configs/spos.py:nb201 trains it
                 (nb201-8x1, batch 64, 32 px, no dropout): the path is the cell
                 architecture, one op per edge shared by every cell; the torch twin is
                 torch_twins/nb201.py. The check runs one fixed cell using every op
                 type; timing draws a cell per pair uniformly among all 5**6.
  proxyless_weight one weight step of the ProxylessNAS search as configs/proxylessnas.py
                 runs it (proxyless_cifar, batch 16, 32 px): a path drawn in the step from
                 the architecture logits, distillation from the teacher computed in the
                 step, Nesterov SGD; the candidates off the path keep weights and momentum.
  proxyless_arch one architecture step of that search: binary gates on two candidates
                 per layer drawn in the step, the task loss times the latency term
                 (mul_log; the latency table measured here as the search measures it,
                 cached in the temp directory), the binary-gate estimator, Adam per layer.
                 Both rows and their torch twin: torch_twins/proxyless.py.
  darts_second_order one step of the DARTS search as configs/darts.py runs it (C=8, 3
                 cells, 16 px, batch 16): the architecture step on a val batch (the
                 hypergradient through a virtual weight step, --darts_mode: exact, the
                 config's, or finite_difference; Adam on the logits), then the weight step on
                 a train batch with the updated logits (distillation from the teacher
                 computed in the step, SGD momentum, clipping). The torch twin runs the
                 reference's finite-difference step; parity holds exactly against JAX's
                 finite_difference, while 'exact' reports how far its hypergradient is.
                 Row and twin: torch_twins/darts.py.

Differences that leave the work the same: torch holds images NCHW (converted once, outside
the timed step); while timing it draws its own windows, flips and dropout masks (the check
feeds it JAX's); its BatchNorm keeps the unbiased batch variance in the running statistics
where Flax keeps the biased one (running statistics are not compared).

Imports nothing that imports TensorFlow (the accelerator machines have none), so what lives
in TensorFlow-importing modules is restated here: the optimizer `trainer.fit` builds, and
paths drawn uniformly in the FLOPs band instead of `nas.spos.PathSampler`
(torch_twins/spos.py). This file is the entry point; the PyTorch side of every row, its
twin and its check, is in benchmarks/torch_twins/.
"""
import json
import os
import tempfile
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # before JAX starts: both sides on the CPU

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import torch  # pylint: disable=wrong-import-position
from absl import app, flags  # pylint: disable=wrong-import-position
from torch_twins import darts, nb201, op_profile, proxyless, spos, synthesis  # pylint: disable=wrong-import-position  # pylint: disable=wrong-import-position
from torch_twins import parity as tp  # pylint: disable=wrong-import-position

ROWS = {'synthesis': synthesis.SynthesisBench, 'spos_supernet': spos.SupernetBench,
        'nb201_supernet': nb201.NB201SupernetBench,
        'proxyless_weight': proxyless.ProxylessWeightBench,
        'proxyless_arch': proxyless.ProxylessArchBench,
        'darts_second_order': darts.DartsSecondOrderBench}


# --- Timing ----------------------------------------------------------------------------------

def run_row(bench, repeats: int, warmup: int, profile_calls: int = 0, hlo_dir: str = ''):
  """(row dict, parity result, description lines) of one built row (`ROWS[name](...)`):
  the parity check, then timing; then, with `profile_calls`, both sides' profiles of the
  last timed calls (`hlo_dir`: where XLA dumped the optimized HLO, `op_profile.dump_flags`)."""
  name = bench.name
  parity = bench.check()
  lines = [f'{name} parity: {bench.describe_check(parity)}']
  if getattr(bench, 'draws_paths', False):
    jax_call, torch_call, paths = bench.timers(warmup + repeats)
    lines.append(f'{name} timed paths (one per pair, warm-up first): '
                 + ' '.join(''.join(map(str, p)) for p in paths))
  else:
    jax_call, torch_call = bench.timers()
  jax_all, torch_all = tp.interleaved(jax_call, torch_call, repeats, warmup)
  lines.append(f'{name} ms per call, warm-up first: JAX ' + ' '.join(f'{t:.0f}' for t in jax_all)
               + '; torch ' + ' '.join(f'{t:.0f}' for t in torch_all))
  if profile_calls:
    calls = list(range(warmup + repeats))[-profile_calls:]  # paths already compiled and run
    lines.append(op_profile.summary(name, *op_profile.jax_profile(jax_call, calls, hlo_dir),
                                    *op_profile.torch_profile(torch_call, calls)))
  jax_ms, torch_ms = (float(np.median(t[warmup:])) for t in (jax_all, torch_all))
  row = {'step': name, 'config': bench.config, 'parity': 'passed', 'check': lines[0],
         'jax_ms': jax_ms, 'torch_ms': torch_ms, 'ratio': torch_ms / jax_ms}
  return row, parity, lines


def run_rows(builders, repeats: int, warmup: int, profile_calls: int = 0, hlo_dir: str = '',
             json_path: str = ''):
  """(rows, names of the rows whose parity check failed): `run_row` on each of `builders`
  ({name: a function building the row}), printing as it goes. A failed check is a row of
  its own ('parity': 'failed', the error); the rows after it still run. With `json_path`,
  the rows so far are written there after each (a run cut short keeps what it measured)."""
  rows, failed = [], []
  for name, build in builders.items():
    row_start = time.perf_counter()
    bench = build()
    try:
      row, _, lines = run_row(bench, repeats, warmup, profile_calls, hlo_dir)
    except tp.ParityError as e:  # a real mismatch: reported, not timed
      row = {'step': name, 'config': bench.config, 'parity': 'failed', 'error': str(e)}
      lines = [f'{name}: PARITY CHECK FAILED, nothing timed: {e}']
      failed.append(name)
    print('\n'.join(lines))
    print(f'{name}: {time.perf_counter() - row_start:.0f} s (build, compile, check, time); '
          f'load average {os.getloadavg()[0]:.1f}', flush=True)
    rows.append(row)
    del bench  # its compiled steps and torch modules, before the next row's
    if json_path:
      with open(json_path, 'w') as f:
        json.dump(rows, f, indent=2)
  return rows, failed


def markdown(rows) -> str:
  out = ['| step | config | JAX ms | torch ms | torch / JAX |', '|---|---|---|---|---|']
  for r in rows:
    if r['parity'] == 'passed':
      out.append(f'| {r["step"]} | {r["config"]} | {r["jax_ms"]:.1f} | {r["torch_ms"]:.1f} | '
                 f'{r["ratio"]:.2f} |')
    else:
      out.append(f'| {r["step"]} | {r["config"]} | parity failed | | |')
  return '\n'.join(out)


def main(_):
  unknown = sorted(set(FLAGS.steps) - set(ROWS))
  if unknown:
    raise app.UsageError(f'--steps: unknown rows {unknown}; rows: {sorted(ROWS)}')
  hlo_dir = ''
  if FLAGS.profile:  # before the backend starts: XLA reads its flags once
    hlo_dir = tempfile.mkdtemp(prefix='compare-torch-hlo-')
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' '
                               + op_profile.dump_flags(hlo_dir))
  backend = jax.default_backend()
  if backend == 'gpu':  # both sides on the same GPU
    if not torch.cuda.is_available():
      raise SystemExit('JAX runs on the GPU, but this torch has no CUDA.')
    torch.set_default_device('cuda')
    # Full float32 on both sides: the tolerances are float32's (TF32 keeps 10 mantissa bits,
    # u = 2^-11, and cuDNN uses it by default in torch, as XLA does for matrix products).
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    jax.config.update('jax_default_matmul_precision', 'highest')
  elif backend != 'cpu':
    raise SystemExit(f'JAX runs on {backend}: this benchmark compares on the CPU or a GPU.')
  torch.set_num_threads(FLAGS.threads)
  torch.manual_seed(0)
  start = time.perf_counter()
  where = (f'{jax.local_device_count()} CPU device(s)' if backend == 'cpu' else
           f'{jax.devices()[0].device_kind}, torch on {torch.cuda.get_device_name()}')
  print(f'JAX {jax.__version__} on {where}, PyTorch '
        f'{torch.__version__}; host cores {len(os.sched_getaffinity(0))}. --threads='
        f'{FLAGS.threads}: torch.set_num_threads({torch.get_num_threads()}); XLA:CPU uses its '
        'own thread pool (sized from the host cores, not by --threads). Load average '
        f'{" ".join(f"{x:.1f}" for x in os.getloadavg())}; OMP_WAIT_POLICY='
        f'{os.environ.get("OMP_WAIT_POLICY", "(unset)")}; XLA_FLAGS='
        f'{os.environ.get("XLA_FLAGS", "(unset)")}.')
  print(f'Median of --repeats={FLAGS.repeats} interleaved calls per side after '
        f'--warmup={FLAGS.warmup} pairs; one call = one update (forward + backward + optimizer).')
  overrides = {'synthesis': dict(batch_size=FLAGS.synthesis_batch_size),
               'spos_supernet': dict(batch_size=FLAGS.supernet_batch_size, space=FLAGS.space),
               'nb201_supernet': dict(batch_size=FLAGS.supernet_batch_size),
               'proxyless_weight': dict(batch_size=FLAGS.proxyless_batch_size,
                                        space=FLAGS.proxyless_space),
               'proxyless_arch': dict(batch_size=FLAGS.proxyless_batch_size,
                                      space=FLAGS.proxyless_space,
                                      cost_model=FLAGS.proxyless_cost_model),
               'darts_second_order': dict(
                   batch_size=FLAGS.darts_batch_size, mode=FLAGS.darts_mode,
                   config=darts.darts_config.get_config(FLAGS.darts_preset))}
  rows, failed = run_rows({name: lambda name=name: ROWS[name](**overrides[name])
                           for name in FLAGS.steps},
                          FLAGS.repeats, FLAGS.warmup, min(FLAGS.profile, FLAGS.repeats), hlo_dir,
                          FLAGS.json)
  print(markdown(rows))
  if FLAGS.json:
    print(f'Wrote {FLAGS.json}')
  print(f'Total {time.perf_counter() - start:.0f} s')
  if failed:
    raise SystemExit(f'Parity check failed for {", ".join(failed)}: see above.')


if __name__ == '__main__':
  flags.DEFINE_list('steps', list(ROWS), f'Rows to run, of {list(ROWS)}.')
  flags.DEFINE_integer('repeats', 5, 'Timed calls per side and row (the median is reported).')
  flags.DEFINE_integer('warmup', 2, 'Untimed (JAX, torch) pairs before timing.')
  flags.DEFINE_integer('threads', len(os.sched_getaffinity(0)), 'torch intra-op threads.')
  flags.DEFINE_string('json', None, 'Also write the rows to this JSON file.')
  flags.DEFINE_integer('profile', 0, 'Profile this many of the last timed calls per side and '
                       'print where the time goes (benchmarks/torch_twins/op_profile.py); 0: none.')
  flags.DEFINE_integer('synthesis_batch_size', 128, 'Images per synthesis update.')
  flags.DEFINE_integer('supernet_batch_size', 0,
                       "Supernet rows' batch (0: each config's, 32 SPOS, 64 NB201).")
  flags.DEFINE_string('space', '', "SPOS space of the supernet row ('': the config's).")
  flags.DEFINE_integer('proxyless_batch_size', 0, "ProxylessNAS rows' batch (0: the config's, 16).")
  flags.DEFINE_string('proxyless_space', '', "ProxylessNAS rows' space ('': the config's).")
  flags.DEFINE_string('proxyless_cost_model', '', "proxyless_arch's cost table: latency | flops | "
                      "none ('': the config's, latency).")
  flags.DEFINE_integer('darts_batch_size', 0, "darts_second_order's batch (0: the config's, 16).")
  flags.DEFINE_string('darts_preset', '', "darts_second_order's configs/darts.py preset ('': "
                      "the default; 'smoke': C=2, 8 px, batch 4).")
  flags.DEFINE_enum('darts_mode', 'exact', list(darts.MODES),
                    "darts_second_order's hypergradient (the config's: exact).")
  FLAGS = flags.FLAGS
  app.run(main)
