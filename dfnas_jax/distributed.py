"""Multi-process (multi-host) start-up: one JAX process per host, or per GPU group.

On Cloud TPU VMs (and SLURM / Open MPI clusters) `jax.distributed.initialize()`
finds the coordinator, the process count and this process's id by itself. GPU
clusters without such an environment pass them explicitly. On CPU the processes
exchange collectives through gloo, so the same code runs as two processes on one
machine (which is how the tests exercise it).

After initialization the stages need nothing else: each process reads its own
share of every dataset (`input_pipeline`), synthesizes the batches it owns,
pmap-ed steps reduce over the devices of all processes, orbax checkpoints are
written collectively, and process 0 alone writes metrics, plots and summaries.
"""
from typing import Optional

import jax
from absl import logging


def initialize(coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> None:
  """Joins this process to the job; the arguments left None are auto-detected."""
  explicit = [coordinator_address, num_processes, process_id]
  if any(a is not None for a in explicit) and any(a is None for a in explicit):
    raise ValueError(
        'Multi-process start-up needs all of coordinator_address, num_processes and '
        'process_id, or none of them (auto-detection on Cloud TPU VMs and SLURM); got '
        f'coordinator_address={coordinator_address!r}, num_processes={num_processes!r}, '
        f'process_id={process_id!r}.')
  if num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f'process_id={process_id} must be in [0, num_processes={num_processes}).')
  # Only the CPU backend reads this; without it CPU processes cannot reduce across hosts.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  logging.info('JAX process %d of %d; %d local and %d global devices.', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
