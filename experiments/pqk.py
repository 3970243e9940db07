"""PQK: accuracy vs compressed size for pruning, QAT and mutual distillation.

Command (measured on a 2-core CPU; see experiments/README.md):

    python experiments/pqk.py [--scale small|full] [--steps N] [--seeds S]
        [--rows dense hard_pruning pruning_qat pqk pqk_soft]
        [--sparsities 0.5 0.8 0.9 0.95] [--bits 32 8 4]
        [--config-file FILE] [--config-arg ARG] [--data-dir DIR] [--out DIR]

Trains `configs/mnist5k_pqk_mlp.py` (LeNet-300-100 on the embedded 5,000
MNIST digits; `--scale full`: the same on tfds `mnist`, documented, not run
here) once per row, sparsity, weight bits and seed through the trainer, as
`python -m moe.main --config configs/mnist5k_pqk_mlp.py
--config.task.<field>=...` would, every run with the same number of steps,
and writes the student with `PqkTask.export_student`: its size on disk is
the model size. Rows (every kernel pruned to the same sparsity per layer;
weights per-channel symmetric at the given bits, activations 8 bits, both
float at 32 bits):

* dense: no pruning; quantized after training (post-training quantization,
  PTQ) at 8 and 4 bits;
* hard_pruning: dense training for a third of the steps, then iterative
  magnitude pruning (4 cubic rounds) for the rest, quantized after training
  (PTQ);
* pruning_qat: the same with quantization-aware training from the first
  round on (PQK's phase 1 alone); at 32 bits it is hard_pruning;
* pqk: PQK with hard pruning: a third dense, a third pruning with QAT, a
  tenth warm-up (student and teacher by cross-entropy), the rest mutual
  distillation (T = 4, both directions weighted 1);
* pqk_soft: PQK whose prune phase uses the soft top-k in magnitude
  (λ = 1 relative to the weights' RMS, p = 4/3).

Reported per cell (mean ± std over seeds): the student's test accuracy, the
teacher's (PQK rows: the full net after mutual training), the file size in
KB. Writes results.json, results.md and accuracy_vs_size.png (accuracy
against KB on a log axis, one marker per row and bits, a line through the
sparsities).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from typing import Any, Mapping

import numpy as np

from moe.train import tasks

import results_io
import training_runs


@dataclasses.dataclass(frozen=True)
class Row:
  """One method.

  Attributes:
    label: the table's name.
    phases: "dense", "prune" (phase 1 only) or "pqk" (both phases).
    fields: `config.task` fields on top of the schedule.
  """
  label: str
  phases: str
  fields: Mapping[str, Any]


ROWS = {
    "dense": Row("dense (PTQ)", "dense", {"qat": False}),
    "hard_pruning": Row("hard magnitude pruning (PTQ)", "prune",
                        {"qat": False}),
    "pruning_qat": Row("pruning + QAT", "prune", {"qat": True}),
    "pqk": Row("PQK (hard pruning)", "pqk", {"qat": True}),
    "pqk_soft": Row("PQK (soft top-k pruning)", "pqk",
                    {"qat": True, "pruning_method": "soft"}),
}
PRESETS = {
    "small": {"config_file": "mnist5k_pqk_mlp.py", "steps": 400,
              "dataset": None},
    "full": {"config_file": "mnist5k_pqk_mlp.py", "steps": 20_000,
             "dataset": "mnist"},
}
FLOAT_BITS = 32


def phase_fields(row: Row, total_steps: int) -> dict[str, int]:
  """The phase lengths of a row, all rows with the same total steps."""
  third = total_steps // 3
  if row.phases == "dense":
    return dict(dense_steps=total_steps, prune_steps=0, warmup_steps=0)
  if row.phases == "prune":
    return dict(dense_steps=third, prune_steps=total_steps - third,
                warmup_steps=0)
  return dict(dense_steps=third, prune_steps=third,
              warmup_steps=total_steps // 10)


def run_config(args, row: Row, sparsity: float, bits: int, seed: int):
  """The experiment config of one cell and seed."""
  config = training_runs.load_config(args.config_file, args.config_arg)
  training_runs.set_seed(config, seed)
  config.total_steps = args.steps
  training_runs.evaluate_only_at_end(config)
  config.logging.progress_every_secs = 1e9
  if args.dataset:
    config.dataset.name = args.dataset
  if args.data_dir:
    config.dataset.data_dir = args.data_dir
  config.task.update(phase_fields(row, args.steps))
  config.task.update(dict(row.fields))
  config.task.sparsity = 0.0 if row.phases == "dense" else sparsity
  config.task.weight_bits = bits
  config.task.activation_bits = FLOAT_BITS if bits == FLOAT_BITS else 8
  return config


def run_cell(args, row: Row, sparsity: float, bits: int
             ) -> dict[str, dict[str, Any]]:
  """Trains and exports every seed of one cell; mean ± std of its metrics."""
  per_seed = []
  for seed in range(args.seed, args.seed + args.seeds):
    config = run_config(args, row, sparsity, bits, seed)
    result = training_runs.train(config)
    task = tasks.create_task(config)
    with tempfile.TemporaryDirectory() as tmp:
      size = task.export_student(result.state.params, result.step,
                                 os.path.join(tmp, "student.npz"),
                                 config.model)
    evals = result.eval_metrics
    per_seed.append({"accuracy": evals["eval_accuracy"],
                     "teacher_accuracy": evals["eval_teacher_accuracy"],
                     "measured_sparsity": evals["eval_sparsity"],
                     "size_kb": size / 1024, "wall_s": result.wall_s})
    print(f"{row.label}, sparsity {sparsity:g}, {bits} bits, seed {seed}: "
          f"accuracy {per_seed[-1]['accuracy']:.4f}, "
          f"{per_seed[-1]['size_kb']:.1f} KB, {result.wall_s:.0f} s",
          flush=True)
  return results_io.summarize_seeds(per_seed)


def cells(args):
  """(row key, sparsity, bits) of every run; dense has sparsity 0 only,
  pruning_qat no 32-bit cell (it is hard_pruning)."""
  for key in args.rows:
    for sparsity in ((0.0,) if ROWS[key].phases == "dense"
                     else args.sparsities):
      for bits in args.bits:
        if key == "pruning_qat" and bits == FLOAT_BITS:
          continue
        yield key, sparsity, bits


def run_all(args) -> list[dict[str, Any]]:
  return [{"row": key, "sparsity": sparsity, "bits": bits,
           **run_cell(args, ROWS[key], sparsity, bits)}
          for key, sparsity, bits in cells(args)]


def _cell(stats, digits: int = 4) -> str:
  return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def to_markdown(results) -> str:
  """One table row per method and sparsity; columns: bits x metrics."""
  cfg = results["config"]
  bits = cfg["bits"]
  header = ["method", "sparsity"] + [
      f"{b} bits: {what}" for b in bits for what in ("top-1", "KB")]
  by_key = {(r["row"], r["sparsity"], r["bits"]): r for r in results["cells"]}
  rows = []
  for key in cfg["rows"]:
    for sparsity in sorted({r["sparsity"] for r in results["cells"]
                            if r["row"] == key}):
      line = [ROWS[key].label, f"{100 * sparsity:g}%"]
      for b in bits:
        cell = by_key.get((key, sparsity, b))
        line += (["= hard pruning", "-"] if cell is None else
                 [_cell(cell["accuracy"]), f"{cell['size_kb']['mean']:.1f}"])
      rows.append(line)
  teachers = [[ROWS[r["row"]].label, f"{100 * r['sparsity']:g}%",
               r["bits"], _cell(r["accuracy"]), _cell(r["teacher_accuracy"])]
              for r in results["cells"] if ROWS[r["row"]].phases == "pqk"]
  return "\n\n".join([
      f"{cfg['config_file']} ({cfg['dataset']}), {cfg['steps']} steps of "
      f"{cfg['batch_size']} images per run, mean ± std over {cfg['seeds']} "
      "seeds; top-1 of the student on the test split; KB = the exported "
      "student file (packed codes, bitmask, scales, float biases). "
      "Activations 8 bits (float at 32 bits).",
      results_io.markdown_table(header, rows),
      "PQK's teacher (the full net: the student plus the pruned weights):",
      results_io.markdown_table(
          ["method", "sparsity", "bits", "student top-1", "teacher top-1"],
          teachers)])


def figure(results):
  """Accuracy against size (KB, log), a line per method and bits."""
  fig, axes = results_io.new_figure(1, 1, panel_size=(7, 5))
  ax = axes.flat[0]
  markers = {32: "o", 8: "s", 4: "^", 2: "v"}
  for i, key in enumerate(results["config"]["rows"]):
    for bits in results["config"]["bits"]:
      points = sorted((r["size_kb"]["mean"], r["accuracy"]["mean"],
                       r["accuracy"]["std"]) for r in results["cells"]
                      if r["row"] == key and r["bits"] == bits)
      if not points:
        continue
      x, y, err = map(np.asarray, zip(*points))
      ax.errorbar(x, y, yerr=err, color=f"C{i}",
                  marker=markers.get(bits, "x"), capsize=2,
                  label=f"{ROWS[key].label}, {bits} bits")
  ax.set_xscale("log")
  results_io.finish_axes(
      ax, xlabel="student file size (KB, log scale)",
      ylabel="test accuracy (top-1)",
      title=f"{results['config']['dataset']}: "
      f"{results['config']['seeds']} seeds", legend_fontsize=6)
  return fig


def parse_args(argv=None):
  """Flags; what is not given comes from --scale."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  results_io.add_output_flags(parser, __file__, with_scale=False)
  parser.add_argument("--scale", choices=tuple(PRESETS), default="small")
  parser.add_argument("--config-file", default=None)
  parser.add_argument("--config-arg", default=None,
                      help="the config's preset argument, e.g. runlocal")
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0, help="first seed")
  parser.add_argument("--rows", nargs="+", default=list(ROWS),
                      choices=tuple(ROWS))
  parser.add_argument("--sparsities", nargs="+", type=float,
                      default=[0.5, 0.8, 0.9, 0.95])
  parser.add_argument("--bits", nargs="+", type=int, default=[32, 8, 4])
  parser.add_argument("--data-dir", default=None, help="tfds data dir")
  args = parser.parse_args(argv)
  preset = PRESETS[args.scale]
  args.dataset = preset["dataset"]
  for name in ("config_file", "steps"):
    if getattr(args, name) is None:
      setattr(args, name, preset[name])
  if args.steps < 30:
    raise ValueError(f"--steps must be >= 30 (every phase needs steps), "
                     f"got {args.steps}")
  if args.seeds < 1:
    raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
  return args


def main(argv=None):
  """Runs the experiment; returns {file name: path} of what it wrote."""
  args = parse_args(argv)
  start = time.perf_counter()
  config = training_runs.load_config(args.config_file, args.config_arg)
  results = {
      "config": {"scale": args.scale, "config_file": args.config_file,
                 "dataset": args.dataset or config.dataset.name,
                 "steps": args.steps, "batch_size": config.dataset.batch_size,
                 "seeds": args.seeds, "rows": args.rows,
                 "sparsities": args.sparsities, "bits": args.bits},
      "cells": run_all(args)}
  results["runtime_seconds"] = time.perf_counter() - start
  return results_io.write_results(args.out, results, to_markdown(results),
                                  {"accuracy_vs_size.png": figure(results)})


if __name__ == "__main__":
  main()
