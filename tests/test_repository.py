"""Tests of the repository itself: function size, references, the layout."""
import ast
import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 60


def _tracked_files(*patterns):
  out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, check=True,
                       capture_output=True, text=True).stdout
  return [ROOT / name for name in out.split()]


def _code_lines(lines, function):
  """Lines of code of a function: no docstring, blank or comment lines."""
  body = function.body
  docstring = None
  if (isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
      and isinstance(body[0].value.value, str)):
    docstring = range(body[0].lineno, body[0].end_lineno + 1)
  count = 0
  for number in range(function.lineno, function.end_lineno + 1):
    text = lines[number - 1].strip()
    if text and not text.startswith("#") and (
        docstring is None or number not in docstring):
      count += 1
  return count


def test_no_function_in_moe_is_longer_than_60_lines_of_code():
  long = []
  for path in sorted((ROOT / "moe").rglob("*.py")):
    source = path.read_text()
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source)):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        count = _code_lines(lines, node)
        if count > MAX_FUNCTION_LINES:
          long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} "
                      f"({count} lines)")
  assert not long, long


def test_counting_ignores_docstrings_and_comments():
  source = 'def f():\n  """Doc.\n\n  More.\n  """\n  # comment\n\n  return 1\n'
  function = ast.parse(source).body[0]
  assert _code_lines(source.splitlines(), function) == 2


def test_references_point_into_the_repository():
  outside = re.compile(r"DESIGN\.md|\.\./shared|shared/seeds")
  hits = [f"{path.relative_to(ROOT)}:{number}"
          for path in _tracked_files("*.py", "*.md", "*.sh", "*.toml")
          if path.name != pathlib.Path(__file__).name
          for number, line in enumerate(path.read_text().splitlines(), 1)
          if outside.search(line)]
  assert not hits, hits
  assert (ROOT / "docs" / "design.md").is_file()


def _layout_rows():
  """The paths of each row of the README's layout table, in order."""
  readme = (ROOT / "README.md").read_text()
  section = readme.split("## Layout", 1)[1]
  return [re.findall(r"`([^`]+)`", row.split("|")[1])
          for row in section.splitlines() if row.startswith("| `")]


def _layout_table():
  return [path for row in _layout_rows() for path in row]


def _row_of(module_path, rows):
  """The row whose most specific path holds `module_path` (moe/x/y.py)."""
  best = None
  for index, paths in enumerate(rows):
    for path in paths:
      path = path.rstrip("/")
      if module_path == path or module_path.startswith(path + "/"):
        if best is None or len(path) > best[1]:
          best = (index, len(path))
  return None if best is None else best[0]


def _moe_imports(path):
  """The moe modules a file imports, as repository paths."""
  imported = []
  for node in ast.walk(ast.parse(path.read_text())):
    names = []
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      names = [node.module] + [f"{node.module}.{alias.name}"
                               for alias in node.names]
    for name in names:
      if not name.startswith("moe"):
        continue
      base = ROOT / pathlib.Path(*name.split("."))
      for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
          imported.append(str(candidate.relative_to(ROOT)))
  return imported


def test_imports_go_down_the_layout_table():
  rows = _layout_rows()
  upward = []
  for path in sorted((ROOT / "moe").rglob("*.py")):
    module = str(path.relative_to(ROOT))
    if _row_of(module, rows) is None:
      # Only packages that import nothing (moe, moe/config) have no row.
      assert path.name == "__init__.py" and not _moe_imports(path), module
      continue
    for imported in _moe_imports(path):
      row = _row_of(imported, rows)
      if row is not None and row < _row_of(module, rows):
        upward.append(f"{module} imports {imported}")
  assert not upward, upward


def test_readme_layout_table_matches_the_tree():
  paths = _layout_table()
  assert paths, "README.md has no layout table"
  for path in paths:
    assert (ROOT / path.rstrip("/")).exists(), path
  packages = {str(p.parent.relative_to(ROOT))
              for p in (ROOT / "moe").glob("*/__init__.py")}
  listed = {p.rstrip("/") for p in paths}
  for package in packages:
    assert package in listed or any(
        p.startswith(package + "/") for p in listed), package
  for module in (ROOT / "moe").glob("*.py"):
    if module.name != "__init__.py":
      assert str(module.relative_to(ROOT)) in listed, module


@pytest.mark.parametrize("package", ["config", "parallel", "checkpoints",
                                     "train"])
def test_package_docstrings_list_their_modules(package):
  directory = ROOT / "moe" / package
  docstring = ast.get_docstring(ast.parse(
      (directory / "__init__.py").read_text()))
  for module in directory.glob("*.py"):
    if module.name != "__init__.py":
      assert f"{module.stem}:" in docstring, (package, module.stem)
