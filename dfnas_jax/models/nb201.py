"""The NAS-Bench-201 cell search space (Dong & Yang, ICLR 2020), in Flax.

A cell has 4 nodes; node j sums one operation on each earlier node i < j, so
6 edges, each one of the 5 OPS. An architecture is one op index per edge, in the
order of the benchmark's string `|op~0|+|op~0|op~1|+|op~0|op~1|op~2|` (node 1's
input edge, node 2's two, node 3's three): `EDGES[e] = (node, input)`.
"""
from typing import Sequence, Tuple

OPS = ('none', 'skip_connect', 'nor_conv_1x1', 'nor_conv_3x3', 'avg_pool_3x3')
EDGES = ((1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2))
NUM_EDGES = len(EDGES)
NUM_ARCHITECTURES = len(OPS) ** NUM_EDGES  # 15,625

Arch = Tuple[int, ...]


def check(ops: Sequence[int]) -> Arch:
  ops = tuple(int(o) for o in ops)
  if len(ops) != NUM_EDGES or not all(0 <= o < len(OPS) for o in ops):
    raise ValueError(f'A NAS-Bench-201 cell is {NUM_EDGES} op indices in [0, {len(OPS)}), '
                     f'got {ops}.')
  return ops


def arch_to_string(ops: Sequence[int]) -> str:
  """(3, 3, 3, 1, 3, 2) -> '|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|...|'."""
  ops = check(ops)
  nodes = []
  for node in range(1, 4):
    nodes.append('|' + '|'.join(f'{OPS[ops[e]]}~{i}' for e, (j, i) in enumerate(EDGES)
                                if j == node) + '|')
  return '+'.join(nodes)


def arch_from_string(text: str) -> Arch:
  """`arch_to_string`'s inverse; anything else is one clear error."""
  expected = ("the benchmark's '|op~0|+|op~0|op~1|+|op~0|op~1|op~2|' with ops from "
              f'{list(OPS)}')
  nodes = text.split('+')
  if len(nodes) != 3:
    raise ValueError(f'{text!r} is not a NAS-Bench-201 cell: expected {expected}.')
  ops = []
  for node, part in enumerate(nodes, start=1):
    edges = part.strip('|').split('|') if part.startswith('|') and part.endswith('|') else []
    if len(edges) != node:
      raise ValueError(f'{text!r} is not a NAS-Bench-201 cell: node {node} needs {node} '
                       f'edges; expected {expected}.')
    for i, edge in enumerate(edges):
      op, _, source = edge.partition('~')
      if op not in OPS or source != str(i):
        raise ValueError(f'{text!r} is not a NAS-Bench-201 cell: edge {edge!r} of node {node} '
                         f'should be <op>~{i}; expected {expected}.')
      ops.append(OPS.index(op))
  return tuple(ops)
