"""V-MoE routers at matched E, K and compute, and a dense ViT of equal FLOPs.

Command (measured on a 2-core CPU, 3 seeds, 7 rows: --scale small 41
minutes, --scale mnist5k 58 minutes; results in experiments/README.md):

    python experiments/moe_router.py [--scale small|mnist5k|full]
        [--steps N] [--seeds S] [--rows sparse_topk vmoe ...]
        [--config-file FILE] [--dense-config-file FILE] [--config-arg ARG]
        [--data-dir DIR] [--out DIR]

Trains the same V-MoE once per row and seed through `moe.train`, exactly as
`python -m moe.main --config configs/<file> --config.seed=S
--config.dataset.seed=S --config.model.encoder.moe.router.name=ROUTER
--config.model.encoder.moe.router.<field>=...` would. Every MoE row has the
config's experts E, selected experts K, MoE layers and capacity factor
(train and eval), and capacity rounded up to a multiple of 4
(`capacity_multiple_of=4`, vmoe's default, for every row so that every
router has the same expert buffers, i.e. the same expert compute). Rows
(`ROWS`):

* sparse_topk: SparseTopK, the paper's router: gates = soft top-k mask of
  the logits over experts (p = 4/3, λ = 0.1 as in the config), importance
  loss (weight 1, times the trainer's `aux_loss_weight` 0.01);
* sparse_topk_annealed: the same with λ annealed from 1.0 to 0.1 (cosine
  over the run's steps): smooth gates early, the fixed row's λ at the end;
* sparse_experts_choice: SparseTopItemsPerExpert, the soft top-C mask over
  the group's tokens for each expert (λ = 0.1), C = ceil(K S cf / E);
* vmoe_top_k: NoisyTopExpertsPerItem with vmoe's defaults: noise std 1.0,
  importance and load losses weighted 0.005 each in the total loss
  (`importance_loss_weight = load_loss_weight = 0.5` times 0.01);
* experts_choice: TopItemsPerExpert with vmoe's train noise (std 1.0) and
  the same capacity as the token-choice routers (C = ceil(K S cf / E); vmoe
  would give it ceil(S cf / E), half the compute at K = 2);
* soft_moe: SoftMoE as in its paper (no noise, no auxiliary loss) with C
  slots per expert, the token-choice routers' buffer size;
* dense: the dense ViT of the same per-token FLOPs: every MLP of width
  H (L + m (K - 1)) / L (L blocks, m of them MoE), since a token of the
  V-MoE passes through K expert MLPs in each MoE layer.

Scales:

* small: `configs/digits_vmoe.py` / `digits_vit.py` (embedded digits, 17
  tokens per image, D = 64, 4 blocks, E = 8, K = 2 in blocks 1 and 3,
  capacity factor 1.25: C = 8 after rounding) for 500 steps;
* mnist5k: `configs/mnist5k_vmoe.py` / `mnist5k_vit.py` (embedded 5,000 MNIST
  digits, 28x28 in 4x4 patches: 50 tokens, the same model: C = 16) for 300
  steps (10 epochs; the config's 1000 take 3 times longer);
* full: `configs/imagenet21k_vmoe_b32.py` with its own steps (needs the
  dataset and a TPU slice; documented, not run here).

Reported per row (mean ± std over seeds), from the final evaluation on the
test split unless said otherwise, averaged over the MoE layers:

* accuracy (top-1) and top-5;
* load CV: coefficient of variation (std / mean) of the tokens dispatched
  per expert (0 = balanced);
* dropped fraction: tokens that reach no expert, at eval and over the last
  logging window of training;
* experts per token: mean number of experts a token is dispatched to;
* gate support: experts with a nonzero gate per token before capacity
  (SparseTopK: `support_size`; NoisyTopExpertsPerItem: K; experts-choice:
  the experts per token; SoftMoE: E, every expert mixes every token);
* step time: median wall time of a train step after compilation
  (`training_runs.StepTimer`, state blocked on after every step), ms;
* parameters, and forward FLOPs per token of the eval model from XLA's cost
  analysis of one image (router, padding slots and attention included).

Writes results.json (per row: every metric's mean, std and per-seed values;
the setup), results.md (one row per router) and two PNGs:
router_comparison.png (one panel per metric) and accuracy_vs_step_time.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
import time
from typing import Any, Mapping

import jax
import numpy as np

from moe.nn import transformer
from moe.train import tasks

import results_io
import training_runs


@dataclasses.dataclass(frozen=True)
class Row:
  """One line of the comparison.

  Attributes:
    label: the table's name of the row.
    router: a key of `moe.nn.routers.ROUTERS`; None: the dense ViT.
    fields: router fields set on top of the config's.
    settings: what the table states about the row's settings.
  """
  label: str
  router: str | None
  fields: Mapping[str, Any]
  settings: str


ROWS = {
    "sparse_topk": Row("SparseTopK", "SparseTopK", {},
                       "λ 0.1, p 4/3, importance loss 0.01"),
    "sparse_topk_annealed": Row(
        "SparseTopK, λ 1→0.1", "SparseTopK",
        {"regularization": 1.0, "regularization_end": 0.1,
         "regularization_schedule": "cosine"},
        "λ cosine 1.0→0.1 over the run, p 4/3, importance loss 0.01"),
    "sparse_experts_choice": Row(
        "SparseTopItemsPerExpert", "SparseTopItemsPerExpert", {},
        "λ 0.1, p 4/3, C = ceil(K S cf / E)"),
    "vmoe_top_k": Row(
        "NoisyTopExpertsPerItem", "NoisyTopExpertsPerItem",
        {"noise_std": 1.0, "importance_loss_weight": 0.5,
         "load_loss_weight": 0.5},
        "vmoe: noise 1.0, importance and load losses 0.005 each"),
    "experts_choice": Row(
        "TopItemsPerExpert", "TopItemsPerExpert", {"noise_std": 1.0},
        "vmoe noise 1.0, C = ceil(K S cf / E)"),
    "soft_moe": Row("SoftMoE", "SoftMoE", {},
                    "paper: no noise, no aux loss, C slots per expert"),
    "dense": Row("dense ViT", None, {},
                 "MLP width for the V-MoE's per-token FLOPs"),
}
CAPACITY_MULTIPLE_OF = 4     # vmoe's default, for every MoE row.
PRESETS = {
    "small": {"config_file": "digits_vmoe.py",
              "dense_config_file": "digits_vit.py", "steps": 500},
    "mnist5k": {"config_file": "mnist5k_vmoe.py",
                "dense_config_file": "mnist5k_vit.py", "steps": 300},
    "full": {"config_file": "imagenet21k_vmoe_b32.py",
             "dense_config_file": None, "steps": None},
}
# Per-layer model metrics (`eval_<layer>/<name>`) averaged over the layers.
LAYER_METRICS = {"load_cv": "tokens_per_expert_cv",
                 "dropped_fraction": "dropped_fraction",
                 "experts_per_token": "experts_per_token",
                 "support_size": "support_size"}
# (key, column title, digits) of the table and the figure.
COLUMNS = (("accuracy", "top-1", 4), ("top5", "top-5", 4),
           ("load_cv", "load CV", 3),
           ("dropped_fraction", "dropped (eval)", 4),
           ("train_dropped_fraction", "dropped (train)", 4),
           ("experts_per_token", "experts/token", 3),
           ("gate_support", "gate support", 3),
           ("step_ms", "step ms", 1),
           ("params", "params", 0),
           ("flops_per_token", "MFLOPs/token", 3))


def layer_mean(metrics, prefix: str, name: str) -> float | None:
  """Mean of `<prefix><layer>/<name>` over the MoE layers; None if absent."""
  pattern = re.compile(re.escape(prefix) + r"[^/]+/" + re.escape(name))
  values = [value for key, value in metrics.items() if pattern.fullmatch(key)]
  return float(np.mean(values)) if values else None


def gate_support(router: str | None, metrics: Mapping[str, Any],
                 num_selected: int, num_experts: int) -> float | None:
  """Experts with a nonzero gate per token (module docstring)."""
  if router == "SparseTopK":
    return metrics["support_size"]
  if router == "NoisyTopExpertsPerItem":
    return float(num_selected)
  if router == "SoftMoE":
    return float(num_experts)
  if router is None:
    return None
  return metrics["experts_per_token"]


def router_metrics(row: Row, moe_setup: Mapping[str, int], result,
                   step_ms: float) -> dict[str, float | None]:
  """The reported metrics of one run, except parameters and FLOPs.

  Args:
    row: the run's row.
    moe_setup: `num_experts` and `num_selected_experts` (K).
    result: the run's `TrainResult`.
    step_ms: its median step time.

  Returns:
    {metric: float or None}.
  """
  evals, trains = result.eval_metrics, result.train_metrics
  metrics = {"accuracy": evals["eval_accuracy"], "top5": evals["eval_top5"]}
  for key, name in LAYER_METRICS.items():
    metrics[key] = layer_mean(evals, "eval_", name)
  metrics["train_dropped_fraction"] = layer_mean(trains, "train_",
                                                 "dropped_fraction")
  metrics["gate_support"] = gate_support(
      row.router, metrics, moe_setup["num_selected_experts"],
      moe_setup["num_experts"])
  del metrics["support_size"]
  metrics["step_ms"] = step_ms
  metrics["wall_s"] = result.wall_s
  return metrics


def model_cost(config, params) -> dict[str, float]:
  """Parameters, and eval forward FLOPs per token from XLA's cost analysis.

  Args:
    config: the experiment config (its eval model and dataset).
    params: the trained parameters.

  Returns:
    {"params": count, "flops_per_token": MFLOPs per token of one image}.
  """
  task = tasks.ClassificationTask.from_config(config)
  image = next(iter(task.make_eval_data()))[task.inputs_key][:1]
  apply = jax.jit(lambda p, x: task.eval_model.apply({"params": p}, x)[0])
  shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                        params)
  cost = apply.lower(shapes, image).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  tokens = params["Transformer"]["posembed_input"]["pos_embedding"].shape[1]
  return {"params": float(sum(a.size for a in jax.tree.leaves(params))),
          "flops_per_token": float(cost["flops"]) / tokens / 1e6}


def dense_mlp_dim(moe_config, num_layers: int, mlp_dim: int) -> int:
  """The MLP width of a dense ViT with the V-MoE's per-token FLOPs."""
  moe_layers = len(transformer.moe_layer_indices(moe_config.layers,
                                                 num_layers))
  extra = moe_layers * (moe_config.num_selected_experts - 1)
  return round(mlp_dim * (num_layers + extra) / num_layers)


def run_config(args, row: Row, seed: int):
  """The experiment config of one row and seed."""
  config = training_runs.load_config(args.config_file, args.config_arg)
  if row.router is None:
    moe = config.model.encoder.moe
    num_layers = config.model.encoder.num_layers
    width = dense_mlp_dim(moe, num_layers, config.model.encoder.mlp_dim)
    config = training_runs.load_config(args.dense_config_file,
                                       args.config_arg)
    config.model.encoder.mlp_dim = width
  training_runs.set_seed(config, seed)
  if args.steps is not None:
    config.total_steps = args.steps
  training_runs.evaluate_only_at_end(config)
  config.logging.progress_every_secs = 1e9  # No progress lines.
  if args.data_dir:
    config.dataset.data_dir = args.data_dir
  if row.router is not None:
    router = config.model.encoder.moe.router
    router.name = row.router
    router.capacity_multiple_of = CAPACITY_MULTIPLE_OF
    for field, value in row.fields.items():
      setattr(router, field, value)
    if row.fields.get("regularization_end") is not None:
      router.regularization_steps = config.total_steps
  return config


def moe_setup(args) -> dict[str, Any]:
  """The shared MoE settings, read from the V-MoE config."""
  config = training_runs.load_config(args.config_file, args.config_arg)
  moe = config.model.encoder.moe
  return {"num_experts": moe.num_experts,
          "num_selected_experts": moe.num_selected_experts,
          "moe_layers": moe.layers,
          "capacity_factor": moe.router.capacity_factor,
          "eval_capacity_factor": moe.router.eval_capacity_factor,
          "capacity_multiple_of": CAPACITY_MULTIPLE_OF,
          "total_steps": args.steps or config.total_steps,
          "batch_size": config.dataset.batch_size,
          "logging_every_steps": config.logging.every_steps,
          "dataset": config.dataset.name}


def run_all(args) -> tuple[dict, dict]:
  """Trains every row for every seed; returns (summaries, setup)."""
  setup, summaries = moe_setup(args), {}
  for key in args.rows:
    row, per_seed = ROWS[key], []
    for seed in range(args.seed, args.seed + args.seeds):
      config = run_config(args, row, seed)
      timer = training_runs.StepTimer()
      result = training_runs.train(config, hooks=[timer])
      metrics = router_metrics(row, setup, result, timer.median_ms())
      metrics.update(model_cost(config, result.state.params))
      per_seed.append(metrics)
      print(f"{row.label} seed {seed}: accuracy {metrics['accuracy']:.4f}, "
            f"{metrics['step_ms']:.1f} ms/step, {result.wall_s:.0f} s",
            flush=True)
    summaries[key] = results_io.summarize_seeds(per_seed)
  return summaries, setup


def _cell(stats, digits: int) -> str:
  if stats["mean"] is None or not math.isfinite(stats["mean"]):
    return "-"   # e.g. the load of the dense ViT
  if digits == 0:
    return f"{stats['mean']:,.0f}"
  return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def to_markdown(results) -> str:
  """One row per router, mean ± std over seeds, and the rows' settings."""
  cfg = results["config"]
  rows = [[ROWS[key].label] + [_cell(summary[name], digits)
                               for name, _, digits in COLUMNS]
          for key, summary in results["routers"].items()]
  settings = [[ROWS[key].label, ROWS[key].settings]
              for key in results["routers"]]
  return "\n\n".join([
      f"{cfg['config_file']} ({cfg['dataset']}), E = {cfg['num_experts']}, "
      f"K = {cfg['num_selected_experts']}, MoE layers {cfg['moe_layers']}, "
      f"capacity factor {cfg['capacity_factor']} (eval: "
      f"{cfg['eval_capacity_factor'] or cfg['capacity_factor']}), capacity "
      f"rounded up to a multiple of {cfg['capacity_multiple_of']}, "
      f"{cfg['total_steps']} steps of {cfg['batch_size']} images; mean ± "
      f"std over {cfg['seeds']} seeds. Eval metrics on the test split "
      f"averaged over the MoE layers; 'dropped (train)' over the last "
      f"{cfg['logging_every_steps']} train steps; 'gate support' = experts "
      "with a nonzero gate per token (see moe_router.py); step time = "
      "median ms of a train step; MFLOPs/token = XLA's count for the eval "
      "forward pass.",
      results_io.markdown_table(["router"] + [t for _, t, _ in COLUMNS], rows),
      results_io.markdown_table(["router", "settings"], settings),
  ])


def _labels(keys):
  return [ROWS[k].label.replace("TopExpertsPerItem", "\nTopExpertsPerItem")
          .replace("ItemsPerExpert", "\nItemsPerExpert").replace(", ", ",\n")
          for k in keys]


def figure(results):
  """One panel per metric: a bar per router (mean), dots for the seeds."""
  keys = list(results["routers"])
  fig, axes = results_io.new_figure(2, 5, panel_size=(3.2, 2.8))
  colors = [f"C{i}" for i in range(len(keys))]
  for ax, (name, title, _) in zip(axes.flat, COLUMNS):
    means = [results["routers"][k][name]["mean"] for k in keys]
    positions = np.arange(len(keys))
    ax.bar(positions, [np.nan if m is None else m for m in means],
           color=colors)
    for i, key in enumerate(keys):
      seeds = [v for v in results["routers"][key][name]["per_seed"]
               if v is not None]
      ax.plot([i] * len(seeds), seeds, "k.", markersize=4)
    ax.set_xticks(positions, _labels(keys), fontsize=5)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
  return fig


def accuracy_vs_step_time(results):
  """Test accuracy against train step time, mean ± std over seeds."""
  fig, axes = results_io.new_figure(1, 1, panel_size=(6, 4.5))
  ax = axes.flat[0]
  for i, (key, summary) in enumerate(results["routers"].items()):
    ax.errorbar(summary["step_ms"]["mean"], summary["accuracy"]["mean"],
                xerr=summary["step_ms"]["std"],
                yerr=summary["accuracy"]["std"], fmt="o", color=f"C{i}",
                capsize=3, label=ROWS[key].label)
  results_io.finish_axes(
      ax, xlabel="train step time (ms, median)",
      ylabel="test accuracy (top-1)",
      title=f"{results['config']['dataset']}: "
      f"{results['config']['seeds']} seeds")
  return fig


def parse_args(argv=None):
  """Flags; the config files and steps not given come from --scale."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  results_io.add_output_flags(parser, __file__, with_scale=False)
  parser.add_argument("--scale", choices=tuple(PRESETS), default="small",
                      help="preset (default: %(default)s)")
  parser.add_argument("--config-file", default=None,
                      help="V-MoE file in configs/ (default: from --scale)")
  parser.add_argument("--dense-config-file", default=None,
                      help="dense ViT file in configs/ for the 'dense' row "
                      "(default: from --scale)")
  parser.add_argument("--config-arg", default=None,
                      help="the configs' preset argument, e.g. runlocal (a "
                      "2-block model: smoke tests)")
  parser.add_argument("--steps", type=int, default=None,
                      help="train steps (default: from --scale)")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0, help="first seed")
  parser.add_argument("--rows", nargs="+", default=list(ROWS),
                      choices=tuple(ROWS))
  parser.add_argument("--data-dir", default=None, help="tfds data dir")
  args = parser.parse_args(argv)
  preset = PRESETS[args.scale]
  for name in ("config_file", "dense_config_file", "steps"):
    if getattr(args, name) is None:
      setattr(args, name, preset[name])
  if args.steps is not None and args.steps < 1:
    raise ValueError(f"--steps must be >= 1, got {args.steps}")
  if args.seeds < 1:
    raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
  if "dense" in args.rows and args.dense_config_file is None:
    raise ValueError("the 'dense' row needs --dense-config-file")
  return args


def main(argv=None):
  """Runs the experiment; returns {file name: path} of what it wrote."""
  args = parse_args(argv)
  start = time.perf_counter()
  routers, setup = run_all(args)
  results = {
      "config": {"scale": args.scale, "config_file": args.config_file,
                 "dense_config_file": args.dense_config_file,
                 "config_arg": args.config_arg, "seeds": args.seeds,
                 "first_seed": args.seed, **setup},
      "routers": routers,
      "runtime_seconds": time.perf_counter() - start,
  }
  return results_io.write_results(
      args.out, results, to_markdown(results),
      {"router_comparison.png": figure(results),
       "accuracy_vs_step_time.png": accuracy_vs_step_time(results)})


if __name__ == "__main__":
  main()
