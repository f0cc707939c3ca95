"""A differentiable search's step loop and checkpoints (DARTS, ProxylessNAS)."""
import os
from typing import Dict, List, Tuple

import flax
import flax.jax_utils
import jax
import orbax.checkpoint as ocp
from absl import logging

from dfnas_jax import workdir as wd
from dfnas_jax.train import checkpointing, loop, steps
from dfnas_jax.train import state as state_lib


def restore(workdir: str, config, state: state_lib.SearchState, num_steps: int
            ) -> Tuple[ocp.CheckpointManager, state_lib.SearchState, int, List[Dict]]:
  """(checkpoint manager, state, start step, history) of a search in `workdir`.

  Resumes from the latest checkpoint. Per-epoch history entries logged after it
  are dropped, since those epochs are redone.
  """
  mngr = checkpointing.manager(os.path.join(workdir, 'checkpoints'), config.keep_checkpoints,
                               config.checkpoint_every_steps)
  restored = checkpointing.restore_latest(mngr, state)
  if restored is None:
    return mngr, state, 0, []
  start_step = int(restored.weights.step)
  logging.info('Resuming the search from step %d of %d.', start_step, num_steps)
  history_path = os.path.join(workdir, 'history.json')
  history = wd.read_json(history_path) if os.path.exists(history_path) else []
  return mngr, restored, start_step, [h for h in history if h['step'] <= start_step]


def save(mngr: ocp.CheckpointManager, workdir: str, step: int, rstate: state_lib.SearchState,
         history: List[Dict], epoch_end: bool) -> None:
  """Checkpoints replicated `rstate`; at an epoch's end first the history that ends it."""
  if jax.process_index() == 0 and epoch_end:
    wd.write_json(os.path.join(workdir, 'history.json'), history)
  checkpointing.save(mngr, step, jax.device_get(flax.jax_utils.unreplicate(rstate)),
                     force=epoch_end)


def run(runner: loop.Loop, state: state_lib.SearchState, step_fn: loop.StepFn, *, config,
        mngr: ocp.CheckpointManager, workdir: str, history: List[Dict],
        steps_per_epoch: int, on_epoch_end) -> state_lib.SearchState:
  """A search's steps (DARTS, ProxylessNAS) from `state`: logged and checkpointed as
  `config` says and at every epoch's end, where `on_epoch_end(step, epoch, rstate,
  scalars)` records the epoch (in `history`, saved with its checkpoint). Returns the
  final state on the host."""
  def log(step, rstate, scalars, at_epoch_end):
    if at_epoch_end:
      on_epoch_end(step, -(-step // steps_per_epoch), rstate, scalars)

  rstate = runner.run(
      steps.replicate(state), step_fn, name='search', log_every_steps=config.log_every_steps,
      checkpoint_every_steps=config.checkpoint_every_steps,
      save=lambda step, rstate, at_epoch_end: save(mngr, workdir, step, rstate, history,
                                                          at_epoch_end),
      boundary=lambda step: step % steps_per_epoch == 0, on_log=log)
  mngr.wait_until_finished()
  return jax.device_get(flax.jax_utils.unreplicate(rstate))
