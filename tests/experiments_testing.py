"""Helpers of the experiment tests: import a script, check its outputs."""
import importlib
import json
import pathlib
import sys

EXPERIMENTS = pathlib.Path(__file__).resolve().parent.parent / "experiments"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def import_script(name: str):
  """Imports experiments/<name>.py as `python experiments/<name>.py` sees it.

  experiments/ is on sys.path while the script and its sibling modules
  (results_io, training_runs) are imported.
  """
  sys.path.insert(0, str(EXPERIMENTS))
  try:
    return importlib.import_module(name)
  finally:
    sys.path.remove(str(EXPERIMENTS))


def read_outputs(paths, figures):
  """Checks a script's written files; returns its results.json.

  Args:
    paths: {file name: path} returned by the script's `main`.
    figures: the PNG file names the script must write.

  Returns:
    The parsed results.json.
  """
  assert set(paths) == {"results.json", "results.md", *figures}, paths
  for name in figures:
    data = pathlib.Path(paths[name]).read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000, name
  assert "| " in pathlib.Path(paths["results.md"]).read_text()
  return json.loads(pathlib.Path(paths["results.json"]).read_text())
