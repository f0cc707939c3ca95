"""Dependencies point one way: a part of the package imports only the parts below it."""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'dfnas_jax'
# Bottom to top; a part may import from an earlier row, never from its own row or a later one.
LAYERS = (
    ('workdir', 'plots', 'distributed'),
    ('models',),
    ('teachers',),
    ('data',),
    ('train',),
    ('synthesis',),
    ('nas',),
    ('evaluation',),
    ('stages',),
    ('main',),
)
RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}


def _part(path: pathlib.Path) -> str:
  """dfnas_jax/nas/spos.py -> 'nas'; dfnas_jax/plots.py -> 'plots'."""
  return path.relative_to(PACKAGE).with_suffix('').parts[0]


def _imported_parts(tree: ast.AST):
  """The dfnas_jax parts a module imports (at any depth: in functions too), with lines."""
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.level:
      raise AssertionError(f'relative import at line {node.lineno}: use absolute imports')
    if isinstance(node, ast.Import):
      modules = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module == 'dfnas_jax':
      modules = [f'dfnas_jax.{alias.name}' for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      modules = [node.module]
    else:
      continue
    for module in modules:
      parts = module.split('.')
      if parts[0] == 'dfnas_jax' and len(parts) > 1:
        yield parts[1], node.lineno


def _modules():
  return [p for p in sorted(PACKAGE.rglob('*.py')) if p.name != '__init__.py' or
          p.parent != PACKAGE]


def test_every_part_of_the_package_has_a_layer():
  parts = {_part(p) for p in _modules()}
  assert parts <= set(RANK), f'add {sorted(parts - set(RANK))} to LAYERS'


def test_imports_point_down():
  wrong = []
  for path in _modules():
    part = _part(path)
    for imported, line in _imported_parts(ast.parse(path.read_text())):
      if imported != part and RANK.get(imported, len(LAYERS)) >= RANK.get(part, -1):
        wrong.append(f'{path.relative_to(PACKAGE.parent)}:{line} ({part}) imports {imported}')
  assert not wrong, 'imports that point up or sideways:\n' + '\n'.join(wrong)


def test_the_check_sees_a_wrong_way_import():
  tree = ast.parse('from dfnas_jax.nas import spos\nimport dfnas_jax.evaluation.evaluate\n'
                   'from dfnas_jax import plots as p\n')
  assert list(_imported_parts(tree)) == [('nas', 1), ('evaluation', 2), ('plots', 3)]
