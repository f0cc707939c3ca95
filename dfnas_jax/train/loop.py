"""The step loop every trainer runs: the supervised `fit` and the DARTS and ProxylessNAS searches.

A trainer supplies its pmap-ed step as `step_fn(state, step) -> (state, metrics)` and what
it does at a log, after a step and at a checkpoint; the loop owns step counting, metric
windows, the NaN guard, progress (steps/s, ETA), logging and the resumable wall time.
"""
import math
from typing import Any, Callable, Dict, Optional, Tuple

import flax.jax_utils
import jax
from clu import metric_writers, metrics, periodic_actions

from dfnas_jax import workdir as wd

# step -> (state, {prefix: replicated metrics or None when this step computed none})
StepFn = Callable[[Any, int], Tuple[Any, Dict[str, Optional[metrics.Collection]]]]


def make_writer(workdir: str):
  """Metrics to WORKDIR (TensorBoard) and the log, from process 0; the others only log."""
  return metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=False)


class Loop:
  """Steps start_step + 1 .. num_steps of one resumable phase in `workdir`."""

  def __init__(self, workdir: str, start_step: int, num_steps: int):
    self.workdir, self.start_step, self.num_steps = workdir, start_step, num_steps
    self.writer = make_writer(workdir)
    self.report = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=self.writer,
                                                  every_secs=30)
    self.stopwatch = wd.Stopwatch(workdir, start_step)

  def run(self, state, step_fn: StepFn, *, name: str, log_every_steps: int,
          checkpoint_every_steps: int, save: Callable[[int, Any, bool], None],
          boundary: Optional[Callable[[int], bool]] = None,
          on_log: Optional[Callable[[int, Any, Dict[str, float], bool], None]] = None,
          after_step: Optional[Callable[[int, Any], None]] = None):
    """Runs the steps; returns the last state.

    At every `log_every_steps`-th step and at a boundary (the last step, and every step
    `boundary` marks, e.g. an epoch's end) the metrics since the last log become scalars
    `<prefix><name>`, `on_log(step, state, scalars, at_boundary)` may add to them, and they
    are written. `after_step(step, state)` follows every step. At every
    `checkpoint_every_steps`-th step and at a boundary the wall time is marked, then
    `save(step, state, at_boundary)` runs.
    """
    windows: Dict[str, metrics.Collection] = {}
    for step in range(self.start_step + 1, self.num_steps + 1):
      with jax.profiler.StepTraceAnnotation(name, step_num=step):
        state, step_metrics = step_fn(state, step)
      for prefix, m in step_metrics.items():
        if m is not None:
          m = flax.jax_utils.unreplicate(m)
          windows[prefix] = windows[prefix].merge(m) if prefix in windows else m
      self.report(step)
      at_boundary = step == self.num_steps or (boundary is not None and boundary(step))
      if step % log_every_steps == 0 or at_boundary:
        scalars = {f'{prefix}{k}': float(v) for prefix, window in windows.items()
                   for k, v in window.compute().items()}
        windows = {}
        check_finite(scalars, step, name)
        if on_log is not None:
          on_log(step, state, scalars, at_boundary)
        self.writer.write_scalars(step, scalars)
      if after_step is not None:
        after_step(step, state)
      if step % checkpoint_every_steps == 0 or at_boundary:
        self.stopwatch.mark(step)  # first: a checkpoint on disk always has its time
        with self.report.timed('checkpoint'):
          save(step, state, at_boundary)
    self.writer.flush()
    return state


def check_finite(scalars: Dict[str, float], step: int, name: str) -> None:
  """Stops a diverged run at the log that shows it, naming the metric."""
  bad = {k: v for k, v in scalars.items() if not math.isfinite(v)}
  if bad:
    raise FloatingPointError(
        f'{name} diverged: {", ".join(f"{k} = {v}" for k, v in sorted(bad.items()))} in the '
        f'steps up to {step}. Lower the learning rate or clip the gradients (grad_clip).')
