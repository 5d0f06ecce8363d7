"""The package's modules import without cycles."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "jax_thundermla"


def _module(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
  """Module -> package modules it imports, at top level or inside functions
  (imports under ``if TYPE_CHECKING`` only name types and are left out)."""
  modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
  graph = {}
  for name, path in modules.items():
    tree = ast.parse(path.read_text())
    type_only = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(
          node.test):
        type_only.update(id(n) for n in ast.walk(node))
    deps = set()
    for node in ast.walk(tree):
      if id(node) in type_only:
        continue
      if isinstance(node, ast.ImportFrom) and node.module:
        for alias in node.names:
          full = f"{node.module}.{alias.name}"
          deps.add(full if full in modules else node.module)
      elif isinstance(node, ast.Import):
        deps.update(a.name for a in node.names)
    graph[name] = {d for d in deps if d in modules and d != name}
  return graph


def _cycle(graph):
  """A list of modules forming a cycle, or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = 1
    stack.append(node)
    for dep in sorted(graph[node]):
      if state.get(dep) == 1:
        return stack[stack.index(dep):] + [dep]
      if dep not in state:
        found = visit(dep)
        if found:
          return found
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_the_graph_sees_known_edges():
  graph = _graph()
  assert "jax_thundermla.isa" in graph["jax_thundermla.vm"]
  assert "jax_thundermla.plan.timing" in graph["jax_thundermla.plan.gantt"]
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


# A package's __init__ importing its own submodules is not a cycle of
# meaning; only edges between module files count.
def test_no_import_cycles():
  graph = _graph()
  modules = {m for m in graph
             if not (PACKAGE.parent / m.replace(".", "/") / "__init__.py"
                     ).exists()}
  files_only = {m: {d for d in deps if d in modules}
                for m, deps in graph.items() if m in modules}
  assert _cycle(files_only) is None, _cycle(files_only)


def test_the_planner_does_not_import_the_virtual_machine():
  graph = _graph()
  for module in graph:
    if module.startswith("jax_thundermla.plan"):
      assert "jax_thundermla.vm" not in graph[module], module
