"""The package's import structure, read from the source (ast; nothing is imported): library code
never imports configs/ (configs import the library), hyperconn_jax's modules form no import
cycle, and a function-local import is never of the project's own code (that would hide a cycle)
and always says why it is local (an optional or heavy dependency)."""

import ast
import functools
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = 'hyperconn_jax'
PROJECT = (PACKAGE, 'configs')


def _modules() -> dict[str, str]:
  """{dotted module name: file path} of every module of the package."""
  out = {}
  for root, _, names in os.walk(os.path.join(REPO, PACKAGE)):
    for name in names:
      if name.endswith('.py'):
        path = os.path.join(root, name)
        parts = os.path.relpath(path, REPO)[:-3].split(os.sep)
        out['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = path
  return out


def _imports(name: str, path: str, modules) -> list[tuple[ast.stmt, set[str], bool]]:
  """Each import statement of the module: (node, the modules it needs, whether it is local to a
  function or class). `from P import x` needs P.x when that is a module, else P itself."""
  tree = ast.parse(open(path).read(), path)
  local = {id(node) for scope in ast.walk(tree)
           if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
           for node in ast.walk(scope) if node is not scope}
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      needed = {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:  # Relative: resolved against the module's package.
        package = name.split('.') if path.endswith('__init__.py') else name.split('.')[:-1]
        base = '.'.join(package[:len(package) - node.level + 1] + ([base] if base else []))
      needed = {f'{base}.{a.name}' if f'{base}.{a.name}' in modules else base for a in node.names}
    else:
      continue
    out.append((node, needed, id(node) in local))
  return out


@functools.cache  # Parsed once for the three tests.
def _graph():
  modules = _modules()
  return modules, {name: _imports(name, path, modules) for name, path in modules.items()}


def test_library_code_does_not_import_configs():
  _, imports = _graph()
  offenders = sorted(f'{name}: {needed}' for name, found in imports.items()
                     for _, needed, _ in found if any(n.split('.')[0] == 'configs' for n in needed))
  assert not offenders


def test_no_import_cycles():
  modules, imports = _graph()
  edges = {name: sorted({n for _, needed, _ in found for n in needed if n in modules} - {name})
           for name, found in imports.items()}
  assert len(edges) > 40 and 'hyperconn_jax.sharding' in edges['hyperconn_jax.models.trunk']
  state, cycles = {}, []

  def visit(node, stack):
    state[node] = 'open'
    for nxt in edges[node]:
      if state.get(nxt) == 'open':
        cycles.append(' -> '.join(stack[stack.index(nxt):] + [nxt]))
      elif nxt not in state:
        visit(nxt, stack + [nxt])
    state[node] = 'done'

  for node in sorted(edges):
    if node not in state:
      visit(node, [node])
  assert not cycles


def test_function_local_imports_are_optional_dependencies_with_a_reason():
  modules, imports = _graph()
  offenders = []
  for name, found in imports.items():
    lines = open(modules[name]).read().splitlines()
    for node, needed, local in found:
      if not local:
        continue
      line = lines[node.lineno - 1]
      reason = re.sub(r'pylint:\s*disable=\S+', '', line.partition('#')[2]).strip()
      if any(n.split('.')[0] in PROJECT for n in needed) or not reason:
        offenders.append(f'{modules[name]}:{node.lineno}: {line.strip()}')
  assert not offenders
