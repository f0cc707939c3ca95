"""Evolutionary architecture search as in SPOS: top-k, mutation, crossover, random fill.

Architectures are tuples of choice indices. The search is resumable: after each
generation its state (population, top-k, every score so far) is written to a
JSON file, and the random numbers of generation g depend only on (seed, g), so a
resumed search makes the same candidates as an uninterrupted one.
"""
import dataclasses
import json
import os
import time
from typing import Callable, Dict, List, Optional, Tuple

import jax
import numpy as np
from absl import logging

from dfnas_jax import workdir as wd

Arch = Tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class EvolutionSettings:
  population: int = 50
  generations: int = 20
  top_k: int = 10
  num_mutations: int = 25
  mutation_prob: float = 0.1
  num_crossovers: int = 25
  max_tries: int = 1000   # draws per mutation/crossover/random phase before giving up


def _key(arch: Arch) -> str:
  return ''.join(str(c) for c in arch)


class EvolutionarySearch:
  """Maximizes `score(arch)` over archs of `num_layers` choices with `valid(arch)` true."""

  def __init__(self, settings: EvolutionSettings, num_layers: int, num_choices: int,
               valid: Callable[[Arch], bool], score: Callable[[Arch], float],
               sample: Callable[[np.random.Generator], Arch], seed: int,
               state_path: Optional[str] = None):
    self.s = settings
    self.num_layers, self.num_choices = num_layers, num_choices
    self.valid, self.score, self.sample = valid, score, sample
    self.seed, self.state_path = seed, state_path
    self.scores: Dict[str, float] = {}
    self.top: List[Arch] = []
    self.history: List[Dict[str, float]] = []

  # State ---------------------------------------------------------------------------------
  def _save(self, generation: int):
    if self.state_path and jax.process_index() == 0:
      wd.write_json(self.state_path, {'generation': generation, 'scores': self.scores,
                                      'top': [_key(a) for a in self.top],
                                      'history': self.history})

  def _restore(self) -> int:
    """Next generation to run (0 for a fresh search)."""
    if not (self.state_path and os.path.exists(self.state_path)):
      return 0
    with open(self.state_path) as f:
      state = json.load(f)
    self.scores = {k: float(v) for k, v in state['scores'].items()}
    self.top = [tuple(int(c) for c in k) for k in state['top']]
    self.history = state['history']
    logging.info('Search: resuming after generation %d (%d candidates scored).',
                 state['generation'], len(self.scores))
    return state['generation'] + 1

  # Candidates ----------------------------------------------------------------------------
  def _fill(self, candidates: List[Arch], count: int, make: Callable[[], Optional[Arch]]):
    """Appends up to `count` new, valid, unseen architectures made by `make`."""
    seen = set(candidates) | set(self.top)
    added = 0
    for _ in range(self.s.max_tries):
      if added == count:
        break
      arch = make()
      if arch is not None and arch not in seen and self.valid(arch):
        candidates.append(arch)
        seen.add(arch)
        added += 1

  def _next_population(self, rng: np.random.Generator) -> List[Arch]:
    candidates: List[Arch] = []
    if self.top:
      def mutate():
        parent = self.top[rng.integers(len(self.top))]
        flips = rng.random(self.num_layers) < self.s.mutation_prob
        return tuple(int(rng.integers(self.num_choices)) if f else c
                     for c, f in zip(parent, flips))

      def cross():
        a, b = (self.top[i] for i in rng.integers(len(self.top), size=2))
        return tuple(int(x if rng.random() < 0.5 else y) for x, y in zip(a, b))

      self._fill(candidates, self.s.num_mutations, mutate)
      self._fill(candidates, self.s.num_crossovers, cross)
    self._fill(candidates, self.s.population - len(candidates), lambda: self.sample(rng))
    return candidates

  # Search --------------------------------------------------------------------------------
  def run(self, on_generation: Optional[Callable[[int, Dict[str, float]], None]] = None
          ) -> Tuple[Arch, float]:
    """Runs the remaining generations; returns the best architecture and its score."""
    for generation in range(self._restore(), self.s.generations):
      start = time.time()
      rng = np.random.default_rng([self.seed, generation])
      population = self._next_population(rng)
      for arch in population:
        if _key(arch) not in self.scores:
          self.scores[_key(arch)] = float(self.score(arch))
      pool = sorted(set(population) | set(self.top), key=lambda a: -self.scores[_key(a)])
      self.top = pool[:self.s.top_k]
      best = self.scores[_key(self.top[0])]
      record = {'generation': generation, 'best_score': best,
                'top_k_mean_score': float(np.mean([self.scores[_key(a)] for a in self.top])),
                'evaluated': len(self.scores), 'seconds': round(time.time() - start, 2)}
      self.history.append(record)
      logging.info('Search generation %d/%d: best %.4f, top-%d mean %.4f, %d archs scored, %.1fs',
                   generation + 1, self.s.generations, best, len(self.top),
                   record['top_k_mean_score'], len(self.scores), record['seconds'])
      self._save(generation)
      if on_generation is not None:
        on_generation(generation, record)
    return self.top[0], self.scores[_key(self.top[0])]

