"""Output conventions shared by the paper experiments under `experiments/`.

Every experiment script takes `--out DIR` (default `out/<script name>` at the
repository root; `out/` is git-ignored) and, where it has more than one size,
`--scale small|full`. Into DIR it writes

* `results.json`: everything the script measured. numpy and jax numbers and
  arrays become Python floats (lists of floats); Python ints, bools and
  strings stay as they are; NaN and ±inf become null (strict JSON);
* `results.md`: the markdown table(s), also printed to stdout;
* PNG figures, drawn with matplotlib's object-oriented API (no pyplot, so no
  display and no global figure state).

Scripts run as `python experiments/<script>.py`, which puts `experiments/`
on `sys.path`, so they import this module as `import results_io`.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib import figure as mpl_figure

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SCALES = ("small", "full")


def default_out_dir(script_file: str) -> pathlib.Path:
  """`<repo>/out/<script name without .py>`.

  Args:
    script_file: the script's `__file__`.

  Returns:
    The default output directory of that script.
  """
  return REPO_ROOT / "out" / pathlib.Path(script_file).stem


def add_output_flags(parser: argparse.ArgumentParser, script_file: str,
                     with_scale: bool = True) -> None:
  """Adds `--out` and (optionally) `--scale` to an argument parser.

  Args:
    parser: the script's parser.
    script_file: the script's `__file__`, which names the default `--out`.
    with_scale: also add `--scale small|full` (default small).
  """
  parser.add_argument(
      "--out", type=pathlib.Path, default=default_out_dir(script_file),
      help="output directory (default: %(default)s)")
  if with_scale:
    parser.add_argument("--scale", choices=SCALES, default="small",
                        help="problem sizes (default: %(default)s)")


def to_jsonable(value: Any) -> Any:
  """Converts nested results into plain JSON values (see module docstring).

  Args:
    value: dicts, lists, tuples, strings, Python numbers, numpy/jax scalars
      and arrays, None, nested arbitrarily.

  Returns:
    The same structure made of dict, list, str, int, bool, float and None.

  Raises:
    TypeError: a value of another type.
  """
  if isinstance(value, Mapping):
    return {str(key): to_jsonable(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_jsonable(item) for item in value]
  if value is None or isinstance(value, (str, bool, int)):
    return value
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if hasattr(value, "__array__"):
    array = np.asarray(value, dtype=np.float64)
    return to_jsonable(array.tolist()) if array.ndim else to_jsonable(
        float(array))
  raise TypeError(f"cannot write {type(value).__name__} to results.json")


def mean_std(values: Sequence[float]) -> dict[str, float]:
  """Mean and sample standard deviation (ddof=1; 0 for one value).

  Args:
    values: one number per seed.

  Returns:
    {"mean": ..., "std": ..., "num_seeds": ...}.
  """
  array = np.asarray(values, dtype=np.float64)
  if array.size == 0:
    raise ValueError("mean_std needs at least one value")
  std = float(array.std(ddof=1)) if array.size > 1 else 0.0
  return {"mean": float(array.mean()), "std": std, "num_seeds": int(array.size)}


def summarize_seeds(per_seed: Sequence[Mapping[str, float]]
                    ) -> dict[str, dict[str, Any]]:
  """Per metric: `mean_std` of its values over the seeds, plus the values.

  Args:
    per_seed: one {metric: value} dict per seed, all with the same metrics.

  Returns:
    {metric: {"mean", "std", "num_seeds", "per_seed"}}.
  """
  summary = {}
  for key in per_seed[0]:
    values = [run[key] for run in per_seed]
    summary[key] = mean_std(values) | {"per_seed": values}
  return summary


def format_mean_std(values: Sequence[float], digits: int = 3) -> str:
  """'mean ± std' over seeds, e.g. '0.912 ± 0.004'.

  Args:
    values: one number per seed.
    digits: digits after the decimal point.

  Returns:
    The formatted string.
  """
  stats = mean_std(values)
  return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]],
                   float_format: str = ".4g") -> str:
  """A markdown table; numeric columns right-aligned, the others left.

  Args:
    header: column titles.
    rows: one sequence of cells per row, as long as `header`. Floats are
      formatted with `float_format`, None as '-', anything else with str().
      A column is numeric when every cell reads as a number, allowing a
      trailing '*' (a marker) and '-' (missing).
    float_format: format spec for float cells.

  Returns:
    The table, without a trailing newline.
  """
  cells = [[_cell(value, float_format) for value in row] for row in rows]
  for row in cells:
    if len(row) != len(header):
      raise ValueError(f"row {row} has {len(row)} cells, header {len(header)}")
  numeric = [bool(cells) and all(_reads_as_number(row[i]) for row in cells)
             for i in range(len(header))]
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---:" if num else "---" for num in numeric) + "|"]
  lines += ["| " + " | ".join(row) + " |" for row in cells]
  return "\n".join(lines)


def _reads_as_number(text: str) -> bool:
  if text == "-":
    return True
  try:
    float(text.rstrip("*"))
  except ValueError:
    return False
  return True


def _cell(value: Any, float_format: str) -> str:
  if value is None:
    return "-"
  if isinstance(value, (float, np.floating)):
    return format(float(value), float_format)
  return str(value)


def new_figure(nrows: int = 1, ncols: int = 1, panel_size=(4.5, 3.5)):
  """A figure with a grid of axes, sized per panel.

  Args:
    nrows: rows of panels.
    ncols: columns of panels.
    panel_size: (width, height) of one panel in inches.

  Returns:
    (figure, axes) with axes a 2-D numpy array [nrows, ncols].
  """
  fig = mpl_figure.Figure(figsize=(panel_size[0] * ncols,
                                   panel_size[1] * nrows),
                          layout="constrained")
  axes = fig.subplots(nrows, ncols, squeeze=False)
  return fig, axes


def finish_axes(ax, *, xlabel: str, ylabel: str, title: str,
                legend_fontsize: float = 7) -> None:
  """Labels, title, a light grid and the legend of a one-panel figure."""
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=legend_fontsize)


def write_results(out_dir: pathlib.Path, results: Mapping[str, Any],
                  markdown: str,
                  figures: Mapping[str, mpl_figure.Figure]) -> dict[str, str]:
  """Writes results.json, results.md and the figures; prints the markdown.

  Args:
    out_dir: output directory, created if missing.
    results: the measurements, any structure `to_jsonable` accepts.
    markdown: the content of results.md.
    figures: file name (e.g. "fig_operator.png") -> figure.

  Returns:
    {"results.json": path, "results.md": path, <figure name>: path, ...}.
  """
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  paths = {"results.json": out_dir / "results.json",
           "results.md": out_dir / "results.md"}
  paths["results.json"].write_text(
      json.dumps(to_jsonable(results), indent=2, allow_nan=False) + "\n")
  paths["results.md"].write_text(markdown.rstrip("\n") + "\n")
  for name, fig in figures.items():
    paths[name] = out_dir / name
    fig.savefig(paths[name], dpi=120)
  print(markdown)
  print(f"\nwrote {', '.join(str(path) for path in paths.values())}")
  return {name: str(path) for name, path in paths.items()}
