"""V-MoE routers at equal E, K and capacity: SparseTopK vs the V-MoE baselines.

Command (2-core CPU; --scale small about 11 minutes):

    python experiments/moe_router.py [--scale small|full] [--steps N]
        [--seeds S] [--routers SparseTopK NoisyTopExpertsPerItem ...]
        [--config-file FILE] [--config-arg ARG] [--noise-std 1.0]
        [--data-dir DIR] [--out DIR]

Trains the same V-MoE once per router and seed through `moe.train`, exactly
as `python -m moe.main --config configs/<file> --config.seed=S
--config.dataset.seed=S --config.model.encoder.moe.router.name=ROUTER` would,
changing only the router's name (and the noise of NoisyTopExpertsPerItem),
so every router has the same experts E, selected experts K, capacity factor
(train and eval) and MoE layers:

* SparseTopK: the paper's router, gates = soft top-k mask of the router
  logits (p = 4/3, λ = 0.1), dispatched where gate > 0 (at most K experts);
* NoisyTopExpertsPerItem: V-MoE's top-K of a softmax with noise
  (`--noise-std`, default 1.0 as in V-MoE) and importance + load losses;
* TopItemsPerExpert: experts choice, every expert takes its top-C tokens.

Scales:

* small: `configs/digits_vmoe.py` (embedded digits, D=64, 4 blocks, E=8,
  K=2 in blocks 1 and 3, capacity factor 1.25) for `--steps` 500 steps
  (the config's schedule, shortened), 3 seeds;
* full: `configs/imagenet21k_vmoe_b32.py` (V-MoE B/32 on ImageNet-21k; the
  paper trains B/32 on JFT-300M, which is not public) with its own steps;
  `--config-file ilsvrc2012_vmoe_s32.py` for ImageNet-1k. Needs the dataset
  in the tfds data dir and a TPU slice; documented, not run here.

Reported per router (mean ± std over seeds), from the final evaluation on
the test split (eval-time routing) unless said otherwise, averaged over the
MoE layers:

* accuracy (top-1) and top-5;
* load balance: coefficient of variation (std / mean) of the tokens
  dispatched per expert (0 = perfectly balanced);
* dropped-token fraction: tokens that reach no expert (capacity full, or no
  selected expert), at eval and over the last logging window of training;
* experts per token: mean number of experts a token is dispatched to;
* gate support: mean number of experts with a nonzero gate per token before
  capacity. SparseTopK: the positive entries of its soft top-k mask (the
  `support_size` metric, which can exceed K; only the K largest are
  dispatched). NoisyTopExpertsPerItem: exactly K by construction (the top-K
  softmax gates). TopItemsPerExpert: tokens have no gate of their own before
  the experts choose, so its support is the experts per token;
* step time: median wall time of a train step after compilation
  (`training_runs.StepTimer`, state blocked on after every step), ms.

Writes results.json (per router: every metric's mean, std and per-seed
values, the config), results.md (one row per router) and
router_comparison.png (one panel per metric, one bar per router with the
seeds as dots).
"""
from __future__ import annotations

import argparse
import re
import time

import numpy as np

import results_io
import training_runs

ROUTERS = ("SparseTopK", "NoisyTopExpertsPerItem", "TopItemsPerExpert")
NOISY = "NoisyTopExpertsPerItem"
PRESETS = {"small": {"config_file": "digits_vmoe.py", "steps": 500},
           "full": {"config_file": "imagenet21k_vmoe_b32.py", "steps": None}}
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
           ("step_ms", "step ms", 1))


def layer_mean(metrics, prefix: str, name: str) -> float | None:
  """Mean of `<prefix><layer>/<name>` over the MoE layers; None if absent."""
  pattern = re.compile(re.escape(prefix) + r"[^/]+/" + re.escape(name))
  values = [value for key, value in metrics.items() if pattern.fullmatch(key)]
  return float(np.mean(values)) if values else None


def router_metrics(router: str, num_selected: int, result, step_ms: float):
  """The reported metrics of one run (module docstring).

  Args:
    router: the router's name.
    num_selected: K.
    result: the run's `TrainResult`.
    step_ms: its median step time.

  Returns:
    {metric: float}.
  """
  evals, trains = result.eval_metrics, result.train_metrics
  metrics = {"accuracy": evals["eval_accuracy"], "top5": evals["eval_top5"]}
  for key, name in LAYER_METRICS.items():
    metrics[key] = layer_mean(evals, "eval_", name)
  metrics["train_dropped_fraction"] = layer_mean(trains, "train_",
                                                 "dropped_fraction")
  if router == "SparseTopK":
    metrics["gate_support"] = metrics["support_size"]
  elif router == NOISY:
    metrics["gate_support"] = float(num_selected)
  else:
    metrics["gate_support"] = metrics["experts_per_token"]
  del metrics["support_size"]
  metrics["step_ms"] = step_ms
  metrics["wall_s"] = result.wall_s
  return metrics


def run_config(args, router: str, seed: int):
  """The experiment config of one router and seed."""
  config = training_runs.load_config(args.config_file, args.config_arg)
  training_runs.set_seed(config, seed)
  if args.steps is not None:
    config.total_steps = args.steps
  training_runs.evaluate_only_at_end(config)
  config.logging.progress_every_secs = 1e9  # No progress lines.
  if args.data_dir:
    config.dataset.data_dir = args.data_dir
  config.model.encoder.moe.router.name = router
  if router == NOISY:
    config.model.encoder.moe.router.noise_std = args.noise_std
  return config


def run_all(args) -> tuple[dict, dict]:
  """Trains every router for every seed; returns (summaries, setup)."""
  summaries, setup = {}, {}
  for router in args.routers:
    per_seed = []
    for seed in range(args.seed, args.seed + args.seeds):
      config = run_config(args, router, seed)
      moe = config.model.encoder.moe
      setup = {"num_experts": moe.num_experts,
               "num_selected_experts": moe.num_selected_experts,
               "moe_layers": moe.layers,
               "capacity_factor": moe.router.capacity_factor,
               "eval_capacity_factor": moe.router.eval_capacity_factor,
               "total_steps": config.total_steps,
               "batch_size": config.dataset.batch_size,
               "logging_every_steps": config.logging.every_steps,
               "dataset": config.dataset.name}
      timer = training_runs.StepTimer()
      result = training_runs.train(config, hooks=[timer])
      per_seed.append(router_metrics(router, moe.num_selected_experts, result,
                                     timer.median_ms()))
      print(f"{router} seed {seed}: accuracy {per_seed[-1]['accuracy']:.4f}, "
            f"{per_seed[-1]['step_ms']:.1f} ms/step, "
            f"{result.wall_s:.0f} s", flush=True)
    summaries[router] = results_io.summarize_seeds(per_seed)
  return summaries, setup


def _cell(stats, digits: int) -> str:
  if stats["mean"] is None:
    return "-"
  return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def to_markdown(results) -> str:
  """One row per router, mean ± std over seeds."""
  cfg = results["config"]
  rows = [[router] + [_cell(summary[key], digits)
                      for key, _, digits in COLUMNS]
          for router, summary in results["routers"].items()]
  return "\n\n".join([
      f"{cfg['config_file']} ({cfg['dataset']}), E = {cfg['num_experts']}, "
      f"K = {cfg['num_selected_experts']}, MoE layers {cfg['moe_layers']}, "
      f"capacity factor {cfg['capacity_factor']} (eval: "
      f"{cfg['eval_capacity_factor'] or cfg['capacity_factor']}), "
      f"{cfg['total_steps']} steps of {cfg['batch_size']} images, "
      f"NoisyTopExpertsPerItem noise std {cfg['noise_std']}; mean ± std over "
      f"{cfg['seeds']} seeds. Eval metrics on the test split averaged over "
      f"the MoE layers; 'dropped (train)' over the last "
      f"{cfg['logging_every_steps']} train steps; "
      "'gate support' = experts with a nonzero gate per token (see "
      "moe_router.py); step time = median ms of a train step.",
      results_io.markdown_table(["router"] + [t for _, t, _ in COLUMNS], rows),
  ])


def figure(results):
  """One panel per metric: a bar per router (mean), dots for the seeds."""
  routers = list(results["routers"])
  fig, axes = results_io.new_figure(2, 4, panel_size=(3.2, 2.8))
  for ax, (key, title, _) in zip(axes.flat, COLUMNS):
    means = [results["routers"][r][key]["mean"] for r in routers]
    positions = np.arange(len(routers))
    ax.bar(positions, [np.nan if m is None else m for m in means],
           color=["tab:orange", "tab:blue", "tab:green"][:len(routers)])
    for i, router in enumerate(routers):
      seeds = results["routers"][router][key]["per_seed"]
      ax.plot([i] * len(seeds), seeds, "k.", markersize=4)
    ax.set_xticks(positions,
                  [r.replace("TopExpertsPerItem", "\nTopExpertsPerItem")
                   .replace("ItemsPerExpert", "\nItemsPerExpert")
                   for r in routers], fontsize=6)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
  return fig


def parse_args(argv=None):
  """Flags; the config file and steps not given come from --scale."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  results_io.add_output_flags(parser, __file__)
  parser.add_argument("--config-file", default=None,
                      help="file in configs/ (default: from --scale)")
  parser.add_argument("--config-arg", default=None,
                      help="the config's preset argument, e.g. runlocal (a "
                      "2-block model: smoke tests)")
  parser.add_argument("--steps", type=int, default=None,
                      help="train steps (default: 500 small, the config's "
                      "full)")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0, help="first seed")
  parser.add_argument("--routers", nargs="+", default=list(ROUTERS),
                      choices=ROUTERS)
  parser.add_argument("--noise-std", type=float, default=1.0,
                      help="noise_std of NoisyTopExpertsPerItem")
  parser.add_argument("--data-dir", default=None, help="tfds data dir")
  args = parser.parse_args(argv)
  preset = PRESETS[args.scale]
  if args.config_file is None:
    args.config_file = preset["config_file"]
  if args.steps is None:
    args.steps = preset["steps"]
  if args.steps is not None and args.steps < 1:
    raise ValueError(f"--steps must be >= 1, got {args.steps}")
  if args.seeds < 1:
    raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
  return args


def main(argv=None):
  """Runs the experiment; returns {file name: path} of what it wrote."""
  args = parse_args(argv)
  start = time.perf_counter()
  routers, setup = run_all(args)
  results = {
      "config": {"scale": args.scale, "config_file": args.config_file,
                 "config_arg": args.config_arg,
                 "seeds": args.seeds, "first_seed": args.seed,
                 "noise_std": args.noise_std, **setup},
      "routers": routers,
      "runtime_seconds": time.perf_counter() - start,
  }
  return results_io.write_results(args.out, results, to_markdown(results),
                                  {"router_comparison.png": figure(results)})


if __name__ == "__main__":
  main()
