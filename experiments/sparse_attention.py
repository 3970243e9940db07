"""Sparse attention post-training: fewest attention edges at the base loss.

Command (measured on a 2-core CPU; see experiments/README.md):

    python experiments/sparse_attention.py [--scale small] [--seeds 3]
        [--seed N] [--methods gated sparse_topk hard_topk] [--ks 2 1]
        [--steps N] [--config-arg ARG] [--out DIR]

For every seed, the base is `configs/addition.py` (the 4-block causal
decoder on two-digit addition, dense attention) trained by the trainer into
`<out>/base_seed<S>` (a finished run there is reused). Each method then
post-trains that base with `configs/addition_sparse.py` for `--steps`
steps, an evaluation on the 2,000 held-out pairs every tenth of them:

* gated: Bernoulli edge gates, expected-edge penalty, GECO multiplier
  keeping the answer cross-entropy within the constraint (the paper's
  method; its defaults in `moe.train.sparse_attention_task`);
* sparse_topk, hard_topk: the exactly sparse soft top-k mask (λ = 0.1,
  p = 4/3) or the hard top-k with a straight-through gradient, fine-tuned
  at k keys per query for k in `--ks`, lowered while the run stays
  feasible.

An evaluation is *feasible* when its cross-entropy is within the task's
constraint of the base's held-out one, CE <= (1 + ε) CE_base + δ
(ε = 0.1, δ = 0.01), and its exact match is at least the base's minus 0.5
points. Reported per method (mean ± std over seeds): the smallest active
edge fraction of a feasible evaluation (active: nonzero attention weight;
of the L(L+1)/2 causal edges per head and block), with its CE and exact
match. Writes results.json, results.md, attention_edges.png (the attention
weights for `36+28=` of the base and of each method's sparsest feasible
model, seed of `--seed`: query x key per block, max over heads) and
post_training.png (edge fraction and CE over post-training).

Every finished run in --out is reused (its first wall time is kept in
<workdir>/wall_s.json), so seeds can run as separate processes (`--seed S
--seeds 1`, one per core) and be merged by one more call with all seeds.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from moe import checkpoints
from moe.data import addition
from moe.train import metrics_writing
from moe.nn import models
from moe.train import sparse_attention_task as sat
from moe.train import task_parts

import results_io
import training_runs

BASE_CONFIG, SPARSE_CONFIG = "addition.py", "addition_sparse.py"
METHODS = {"gated": "gated edges + GECO (paper)",
           "sparse_topk": "sparse top-k mask",
           "hard_topk": "hard top-k (straight-through)"}
PROMPT = "36+28=00064"
EXACT_MATCH_DROP = 0.005
PRESETS = {"small": {"steps": 1000}}


def _preset(args, *fields: str) -> str | None:
  return ",".join(f for f in ((args.config_arg,) + fields) if f) or None


def base_run(args, seed: int) -> tuple[str, dict[str, float]]:
  """The base workdir of `seed` (trained, resumed or reused) and its final
  held-out metrics."""
  workdir = pathlib.Path(args.out) / f"base_seed{seed}"
  workdir.mkdir(parents=True, exist_ok=True)
  config = training_runs.load_config(BASE_CONFIG, args.config_arg)
  training_runs.set_seed(config, seed)
  result = training_runs.train(config, workdir=str(workdir))
  return str(workdir), dict(result.eval_metrics)


def run_config(args, method: str, k: int, base: str, seed: int):
  """The post-training config of one method, k and seed."""
  config = training_runs.load_config(
      SPARSE_CONFIG, _preset(args, f"sparsity={method}", f"k={k}"))
  training_runs.set_seed(config, seed)
  config.init_from.checkpoint = base
  config.total_steps = args.steps
  for section in (config.evaluation, config.checkpoint):
    section.every_steps = max(args.steps // 10, 1)
  config.checkpoint.keep = 11
  config.logging.progress_every_secs = 1e9
  return config


def evaluations(workdir: str) -> list[dict[str, float]]:
  """Every evaluation of a run: {"step", "edge_fraction", "loss",
  "exact_match"}, from its event files."""
  scalars = metrics_writing.read_scalars(workdir)
  columns = {name: dict(scalars[f"eval_{name}"])
             for name in ("edge_fraction", "loss", "exact_match")}
  return [{"step": step, **{name: column[step]
                            for name, column in columns.items()}}
          for step in sorted(columns["loss"])]


def sparsest_feasible(history: Sequence[Mapping[str, float]],
                      base: Mapping[str, float], *, tolerance: float,
                      absolute_tolerance: float
                      ) -> dict[str, float] | None:
  """The feasible evaluation with the fewest active edges, or None.

  Args:
    history: `evaluations(...)` of a run.
    base: the base run's `eval_loss` and `eval_exact_match`.
    tolerance: ε.
    absolute_tolerance: δ.

  Returns:
    The chosen evaluation (ties: the earliest).
  """
  limit = (1 + tolerance) * base["eval_loss"] + absolute_tolerance
  feasible = [e for e in history if e["loss"] <= limit and
              e["exact_match"] >= base["eval_exact_match"] - EXACT_MATCH_DROP]
  return min(feasible, key=lambda e: (e["edge_fraction"], e["step"]),
             default=None)


def first_wall_s(workdir: pathlib.Path, wall_s: float) -> float:
  """The seconds the run in `workdir` took when it first ran: `wall_s` is
  recorded in <workdir>/wall_s.json the first time, and the recorded value
  is returned when the run is reused (by a later call of the script, e.g.
  one merging seeds that ran as separate processes)."""
  record = workdir / "wall_s.json"
  if not record.exists():
    record.write_text(json.dumps({"wall_s": wall_s}))
  return float(json.loads(record.read_text())["wall_s"])


def post_train(args, method: str, k: int, base: str, seed: int,
               base_metrics: Mapping[str, float]) -> dict[str, Any]:
  """One post-training run: its history and sparsest feasible evaluation."""
  config = run_config(args, method, k, base, seed)
  workdir = pathlib.Path(args.out) / f"{method}_k{k}_seed{seed}"
  result = training_runs.train(config, workdir=str(workdir))
  wall_s = first_wall_s(workdir, result.wall_s)
  history = evaluations(str(workdir))
  best = sparsest_feasible(
      history, base_metrics, tolerance=config.task.tolerance,
      absolute_tolerance=config.task.absolute_tolerance)
  print(f"{method} k={k} seed {seed}: sparsest feasible {best}, "
        f"{wall_s:.0f} s", flush=True)
  return {"method": method, "k": k, "seed": seed, "workdir": str(workdir),
          "history": history, "best": best, "wall_s": wall_s}


def method_runs(args, method: str, base: str, seed: int,
                base_metrics: Mapping[str, float]) -> list[dict[str, Any]]:
  """gated: one run; top-k methods: k lowered while the run is feasible."""
  if method == "gated":
    return [post_train(args, method, args.ks[0], base, seed, base_metrics)]
  runs = []
  for k in sorted(args.ks, reverse=True):
    runs.append(post_train(args, method, k, base, seed, base_metrics))
    if runs[-1]["best"] is None:
      break
  return runs


def summarize(runs: Sequence[Mapping[str, Any]], bases, methods, seeds
              ) -> list[dict[str, Any]]:
  """Per method: the sparsest feasible evaluation of each seed, summarized."""
  cells = []
  for method in methods:
    per_seed = []
    for seed in seeds:
      found = [dict(r["best"], k=math.nan if method == "gated" else r["k"])
               for r in runs
               if r["method"] == method and r["seed"] == seed and r["best"]]
      best = min(found, key=lambda e: e["edge_fraction"], default=None)
      per_seed.append(best or {"edge_fraction": math.nan, "loss": math.nan,
                               "exact_match": math.nan, "k": math.nan,
                               "step": math.nan})
    wall = [r["wall_s"] for r in runs if r["method"] == method]
    cells.append({"method": method, "feasible_seeds": sum(
        not math.isnan(b["edge_fraction"]) for b in per_seed),
                  **results_io.summarize_seeds(per_seed),
                  "wall_s_per_run": float(np.mean(wall))})
  base_cell = results_io.summarize_seeds([
      {"loss": b["eval_loss"], "exact_match": b["eval_exact_match"]}
      for b in bases])
  return [{"method": "base", "feasible_seeds": len(bases),
           "edge_fraction": results_io.mean_std([1.0] * len(bases)),
           **base_cell}] + cells


def attention_maps(config, params) -> np.ndarray:
  """`[blocks, L, L]` attention weights for `PROMPT`, max over heads."""
  # The eval model alone: building the task would measure CE_base again.
  model = models.build_model(task_parts.merged_model_config(
      config.model, config.evaluation.get("model_overrides")))
  tokens = addition.encode(PROMPT)[None, :-1]
  _, state = model.apply({"params": sat.model_params(params)}, tokens,
                         mutable="intermediates")
  weights = jax.tree.leaves(state["intermediates"])
  return np.stack([np.asarray(w)[0].max(axis=0) for w in weights])


def edge_maps(args, runs, seed: int) -> dict[str, np.ndarray]:
  """The base's and each method's sparsest feasible model's maps."""
  base = pathlib.Path(args.out) / f"base_seed{seed}"
  some = next(r for r in runs if r["seed"] == seed)
  base_config = run_config(args, "dense", some["k"], str(base), seed)
  maps = {"base": attention_maps(base_config,
                                 checkpoints.restore_params(base))}
  for method in args.methods:
    chosen = [r for r in runs if r["method"] == method
              and r["seed"] == seed and r["best"]]
    if chosen:
      run = min(chosen, key=lambda r: r["best"]["edge_fraction"])
      step_dir = (pathlib.Path(run["workdir"]) / checkpoints.CHECKPOINT_SUBDIR
                  / str(run["best"]["step"]))
      maps[method] = attention_maps(
          run_config(args, method, run["k"], str(base), seed),
          checkpoints.restore_params(step_dir))
  return maps


def edges_figure(maps: Mapping[str, np.ndarray]):
  """Rows: base and methods; columns: blocks; query x key heatmaps."""
  names = list(maps)
  blocks = next(iter(maps.values())).shape[0]
  fig, axes = results_io.new_figure(len(names), blocks, panel_size=(2.4, 2.4))
  labels = list(PROMPT[:-1])
  for row, name in enumerate(names):
    for block in range(blocks):
      ax = axes[row, block]
      ax.imshow(maps[name][block], cmap="Greys", vmin=0, vmax=1)
      ax.set_xticks(range(len(labels)), labels, fontsize=6)
      ax.set_yticks(range(len(labels)), labels, fontsize=6)
      active = np.mean(maps[name][block][np.tril_indices(len(labels))] > 0)
      ax.set_title(f"{name}, block {block}: {100 * active:.0f}% edges",
                   fontsize=7)
  return fig


def curves_figure(runs, seed: int):
  """Edge fraction and CE over post-training, one line per method and k."""
  fig, axes = results_io.new_figure(1, 2, panel_size=(5, 3.5))
  for i, run in enumerate(r for r in runs if r["seed"] == seed):
    steps = [e["step"] for e in run["history"]]
    label = f"{run['method']}" + ("" if run["method"] == "gated"
                                  else f", k={run['k']}")
    axes.flat[0].plot(steps, [e["edge_fraction"] for e in run["history"]],
                      color=f"C{i}", marker="o", label=label)
    axes.flat[1].plot(steps, [e["loss"] for e in run["history"]],
                      color=f"C{i}", marker="o", label=label)
  axes.flat[1].set_yscale("log")
  results_io.finish_axes(axes.flat[0], xlabel="post-training step",
                         ylabel="active edge fraction (eval)",
                         title=f"seed {seed}")
  results_io.finish_axes(axes.flat[1], xlabel="post-training step",
                         ylabel="held-out answer CE (log)",
                         title=f"seed {seed}")
  return fig


def _cell(stats, digits: int = 4) -> str:
  if stats["mean"] is None or math.isnan(stats["mean"]):
    return "-"
  return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def to_markdown(results) -> str:
  cfg = results["config"]
  rows = [[METHODS.get(c["method"], "base (dense)"),
           f"{c['feasible_seeds']}/{cfg['seeds']}", _cell(c["edge_fraction"]),
           _cell(c.get("k", {"mean": math.nan}), 1), _cell(c["loss"]),
           _cell(c["exact_match"])] for c in results["cells"]]
  return "\n\n".join([
      f"{cfg['base_config']} base, post-training {cfg['steps']} steps per "
      f"run ({cfg['sparse_config']}), mean ± std over {cfg['seeds']} seeds "
      "of the sparsest feasible evaluation (held-out CE <= 1.1 CE_base + "
      "0.01, exact match >= base - 0.5 points); edges: nonzero attention "
      "weights among the causal ones.",
      results_io.markdown_table(
          ["method", "feasible seeds", "active edge fraction", "k",
           "held-out CE", "exact match"], rows)])


def parse_args(argv=None):
  """Flags; what is not given comes from --scale."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  results_io.add_output_flags(parser, __file__, with_scale=False)
  training_runs.add_run_flags(parser, PRESETS)
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--methods", nargs="+", default=list(METHODS),
                      choices=tuple(METHODS))
  parser.add_argument("--ks", nargs="+", type=int, default=[2, 1])
  args = parser.parse_args(argv)
  if args.steps is None:
    args.steps = PRESETS[args.scale]["steps"]
  for flag in ("--steps", "--seeds", "--ks"):
    training_runs.check_at_least(getattr(args, flag[2:]), 1, flag)
  return args


def main(argv=None):
  """Runs the experiment; returns {file name: path} of what it wrote."""
  args = parse_args(argv)
  start = time.perf_counter()
  seeds = list(range(args.seed, args.seed + args.seeds))
  runs, bases = [], []
  for seed in seeds:
    base, base_metrics = base_run(args, seed)
    bases.append(base_metrics)
    for method in args.methods:
      runs += method_runs(args, method, base, seed, base_metrics)
  results = {
      "config": {"scale": args.scale, "base_config": BASE_CONFIG,
                 "sparse_config": SPARSE_CONFIG, "steps": args.steps,
                 "seeds": args.seeds, "methods": args.methods,
                 "ks": args.ks},
      "cells": summarize(runs, bases, args.methods, seeds), "runs": runs}
  figures = {"attention_edges.png": edges_figure(edge_maps(args, runs,
                                                           args.seed)),
             "post_training.png": curves_figure(runs, args.seed)}
  results["runtime_seconds"] = time.perf_counter() - start
  return results_io.write_results(args.out, results, to_markdown(results),
                                  figures)


if __name__ == "__main__":
  main()
