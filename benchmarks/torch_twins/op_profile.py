"""Where a step's time goes, per operation, on each side of benchmarks/compare_torch.py.

JAX: the profiler's trace of a few calls (XLA:CPU records every thunk it runs, named by its
HLO instruction), joined with the optimized HLO that XLA dumps (`dump_flags`, set before
the backend starts), so each instruction gets its kind (a convolution, a fusion holding a
convolution or a matrix product, an elementwise or reduction fusion, a copy) and the JAX
operation it came from (the `op_name` metadata: `transpose(jvp(...))` marks the backward
pass). PyTorch: `torch.profiler`'s self time per operator.

Times are per call, summed over operations: XLA:CPU may run two thunks at once, so the sum
can exceed the wall time; what the sum leaves out of the wall time is dispatch and waiting.
Imports nothing that imports TensorFlow.
"""
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time
from typing import Callable, Dict, List, Tuple

import jax
import torch

_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*.+?\s(?P<op>[a-z][\w\-]*)\('
                          r'(?P<rest>.*)$')
_COMPUTATION = re.compile(r'^%?(?P<name>[\w.\-]+)\s.*\{\s*$')
_OP_NAME = re.compile(r'op_name="(?P<op_name>[^"]*)"')
_CALLS = re.compile(r'calls=%?(?P<callee>[\w.\-]+)')
_CONTAINERS = ('conditional', 'while', 'call')  # thunks that run other thunks


def dump_flags(directory: str) -> str:
  """XLA_FLAGS that make XLA write every module's optimized HLO to `directory`."""
  return f'--xla_dump_to={directory} --xla_dump_hlo_as_text --xla_dump_hlo_pass_re=^$'


def read_hlo_dumps(directory: str) -> Dict[str, Dict[str, Tuple[str, str]]]:
  """{module name: {instruction: (kind, op_name)}} from the optimized HLO in `directory`."""
  modules = {}
  for path in sorted(glob.glob(os.path.join(directory, '*after_optimizations.txt'))):
    module = os.path.basename(path).split('.')[1]  # module_0012.<name>.cpu_after_...
    computations, instructions, current = collections.defaultdict(set), {}, None
    with open(path) as f:
      for line in f:
        if not line.startswith(' '):
          m = _COMPUTATION.match(line)
          current = m['name'] if m else None
          continue
        m = _INSTRUCTION.match(line)
        if not m:
          continue
        computations[current].add(m['op'])
        op_name = _OP_NAME.search(m['rest'])
        callee = _CALLS.search(m['rest'])
        instructions[m['name']] = (m['op'], callee['callee'] if callee else None,
                                   op_name['op_name'] if op_name else '')
    named = modules.setdefault(module, {})
    for name, (op, callee, op_name) in instructions.items():
      named[name] = (_kind(op, computations.get(callee, set())), op_name)
  return modules


def _kind(op: str, fused_ops) -> str:
  if op == 'fusion':
    for inner in ('convolution', 'dot'):
      if inner in fused_ops:
        return f'fusion with {inner}'
    return 'fusion, elementwise/reduce'
  return op


def short_op_name(op_name: str) -> str:
  """'jit(f)/jit(main)/transpose(jvp(Net))/layer1/conv/conv_general_dilated' ->
  'backward: layer1/conv/conv_general_dilated'."""
  backward = 'transpose(' in op_name
  parts = [p for p in op_name.split('/') if not re.match(r'^(jit|pmap|jvp|transpose|vmap)\(', p)]
  return ('backward: ' if backward else '') + '/'.join(parts[-4:])


def jax_profile(call: Callable[[int], None], calls: List[int], hlo_dir: str):
  """Per-call ms by HLO instruction: [(ms, kind, instruction, op_name)], largest first, and
  the wall ms per call. `call(i)` must block until its result is ready."""
  modules = read_hlo_dumps(hlo_dir)
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    start = time.perf_counter()
    for i in calls:
      call(i)
    wall = (time.perf_counter() - start) * 1e3 / len(calls)
    jax.profiler.stop_trace()
    trace, = glob.glob(os.path.join(trace_dir, '**', 'perfetto_trace.json.gz'), recursive=True)
    with gzip.open(trace) as f:
      events = json.load(f)
  events = events['traceEvents'] if isinstance(events, dict) else events
  total = collections.Counter()
  for e in events:
    args = e.get('args') or {}
    if e.get('ph') == 'X' and 'hlo_op' in args:
      total[(args.get('hlo_module', ''), args['hlo_op'])] += e['dur'] / 1e3 / len(calls)
  rows = []
  for (module, op), ms in total.items():
    kind, op_name = modules.get(module, {}).get(op, ('?', ''))
    if kind not in _CONTAINERS:  # their time is their nested thunks', recorded as well
      rows.append((ms, kind, op, op_name))
  return sorted(rows, reverse=True), wall


def torch_profile(call: Callable[[int], None], calls: List[int]):
  """Per-call ms of self CPU time by operator: [(ms, operator, count per call)], largest
  first, and the wall ms per call."""
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    start = time.perf_counter()
    for i in calls:
      call(i)
    wall = (time.perf_counter() - start) * 1e3 / len(calls)
  rows = [(e.self_cpu_time_total / 1e3 / len(calls), e.key, e.count / len(calls))
          for e in prof.key_averages()]
  return sorted(rows, reverse=True), wall


def summary(name: str, jax_rows, jax_wall: float, torch_rows, torch_wall: float,
            top: int = 12) -> str:
  """The two profiles as text: totals by kind, then the largest operations of each side."""
  lines = [f'{name} JAX profile: wall {jax_wall:.1f} ms/call, sum over XLA thunks '
           f'{sum(r[0] for r in jax_rows):.1f} ms, {len(jax_rows)} distinct instructions']
  kinds, backward = collections.Counter(), collections.Counter()
  for ms, kind, _, op_name in jax_rows:
    kinds[kind] += ms
    backward['backward' if 'transpose(' in op_name else 'forward'] += ms
  lines.append('  by kind: ' + ', '.join(f'{k} {v:.1f}' for k, v in kinds.most_common()))
  lines.append('  by pass: ' + ', '.join(f'{k} {v:.1f}' for k, v in backward.most_common()))
  for ms, kind, op, op_name in jax_rows[:top]:
    lines.append(f'  {ms:8.2f} ms  {kind:28s} {op:32s} {short_op_name(op_name)}')
  lines.append(f'{name} torch profile: wall {torch_wall:.1f} ms/call, sum of self times '
               f'{sum(r[0] for r in torch_rows):.1f} ms')
  for ms, key, count in torch_rows[:top]:
    lines.append(f'  {ms:8.2f} ms  {key:40s} x{count:g}')
  return '\n'.join(lines)
