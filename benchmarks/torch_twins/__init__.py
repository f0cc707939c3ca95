"""The PyTorch side of benchmarks/compare_torch.py: for each row, the torch twin of a JAX
step (the same network, loss terms, optimizer update and batch, written for the benchmark)
and the row that builds both and checks that they agree before timing them.

  parity.py     the tolerances and checks every row shares, Flax variables -> torch
                modules, the teachers' twin (CIFAR ResNets), interleaved timing
  synthesis.py  synthesis            the inversion update (TorchInversion)
  spos.py       spos_supernet        the SPOS supernet step (TorchSupernet)
  nb201.py      nb201_supernet       the same step on NAS-Bench-201 (TorchNB201Supernet)
  proxyless.py  proxyless_weight, proxyless_arch   the ProxylessNAS search's two steps
  darts.py      darts_second_order   the DARTS search step (TorchDARTSSearchNet)
  op_profile.py per-operation profiles of both sides (compare_torch.py --profile)

Not named `torch`: with benchmarks/ on sys.path (every script there has it) a package of
that name would hide PyTorch itself. Imports nothing that imports TensorFlow.
"""
import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # before JAX starts: both sides on the CPU
