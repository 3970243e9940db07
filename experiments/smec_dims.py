"""SMEC: retrieval quality of a frozen ViT's embeddings compressed from D to d.

Command (measured on a 2-core CPU; see experiments/README.md):

    python experiments/smec_dims.py [--scale small|full] [--seeds S]
        [--seed N] [--rows full truncate random pca mrl smec_gumbel
        smec_sparse smec_gumbel_xbm smec_sparse_xbm] [--stage-steps N]
        [--backbone DIR] [--config-arg ARG] [--data-dir DIR] [--out DIR]

The backbone is `configs/mnist5k_vit.py` (the dense ViT on the embedded
5,000 MNIST digits, pre-logits width D = 64), trained once by the trainer
into `<out>/backbone` (a finished run there is reused; `--backbone DIR`
names another trained workdir). Its embeddings are frozen; retrieval is
`moe.compress.retrieval`: the 1,000 test images are the queries, the 4,000
train images the corpus, relevant = same class, cosine similarity. For
every kept size d in {D/2, D/4, D/8}, the rows are

* full: the D-dimensional embedding (the same for every d);
* truncate: its first d dimensions;
* random: d dimensions drawn without replacement (a new draw per seed);
* pca: the train split's top-d principal components (centred);
* mrl: a Matryoshka head (`config.task.method="mrl"`): a D x D projection
  trained by the listwise rank loss on all its prefixes d at once, for as
  many steps as SMEC's stages together;
* smec_gumbel, smec_sparse: SMEC (`configs/mnist5k_smec.py`): a projection
  head, then SMRL D -> D/2 -> D/4 -> D/8 in stages of `--stage-steps`,
  each learning which dimensions to keep by the rank loss, with the
  paper's Gumbel top-k (τ = 1) or the sparse top-k mask (λ = 0.1,
  p = 4/3);
* smec_*_xbm: the same with S-XBM hard pairs (a queue of 1,024 frozen
  embeddings, 32 neighbours per query).

The trained rows run through the trainer as `python -m moe.main --config
configs/mnist5k_smec.py:selector=...,memory=... --config.seed=S` would;
the seeds change their initialisation, data order and Gumbel noise, not
the backbone. Reported (mean ± std over seeds): nDCG@10, recall@10 and
mAP@100 at each d; the trained rows' wall time. Writes results.json,
results.md and ndcg_vs_dims.png (nDCG@10 against d, log2 axis).
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import time
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from moe.compress import retrieval
from moe.train import frozen_embeddings
from moe.train import tasks

import results_io
import training_runs


@dataclasses.dataclass(frozen=True)
class Row:
  """One compression method.

  Attributes:
    label: the table's name.
    trained: trained by the trainer (else computed from the embeddings).
    fields: `config.task` fields of a trained row.
  """
  label: str
  trained: bool = False
  fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)


ROWS = {
    "full": Row("full D"),
    "truncate": Row("first d dims"),
    "random": Row("random d dims"),
    "pca": Row("PCA to d"),
    "mrl": Row("MRL head", True, {"method": "mrl"}),
    "smec_gumbel": Row("SMEC, Gumbel top-k", True,
                       {"method": "smec", "selector": "gumbel_topk"}),
    "smec_sparse": Row("SMEC, sparse top-k", True,
                       {"method": "smec", "selector": "sparse_topk"}),
    "smec_gumbel_xbm": Row("SMEC, Gumbel top-k + S-XBM", True,
                           {"method": "smec", "selector": "gumbel_topk",
                            "cross_batch_memory": True}),
    "smec_sparse_xbm": Row("SMEC, sparse top-k + S-XBM", True,
                           {"method": "smec", "selector": "sparse_topk",
                            "cross_batch_memory": True}),
}
PRESETS = {
    "small": {"stage_steps": 200, "dataset": None},
    "full": {"stage_steps": 2000, "dataset": "mnist"},
}
METRICS = {"ndcg10": f"ndcg@{retrieval.NDCG_AT}",
           "recall10": f"recall@{retrieval.RECALL_AT}",
           "map100": f"map@{retrieval.MAP_AT}"}
BACKBONE_CONFIG, SMEC_CONFIG = "mnist5k_vit.py", "mnist5k_smec.py"


def _with_data(config, args):
  if args.dataset:
    config.dataset.name = args.dataset
  if args.data_dir:
    config.dataset.data_dir = args.data_dir
  return config


def train_backbone(args) -> str:
  """The backbone workdir: `--backbone`, or `<out>/backbone` trained (or
  resumed, or reused when finished) by the trainer."""
  if args.backbone:
    return str(args.backbone)
  workdir = pathlib.Path(args.out) / "backbone"
  workdir.mkdir(parents=True, exist_ok=True)
  config = _with_data(
      training_runs.load_config(BACKBONE_CONFIG, args.config_arg), args)
  result = training_runs.train(config, workdir=str(workdir))
  print(f"backbone: step {result.step}, eval accuracy "
        f"{result.eval_metrics.get('eval_accuracy', float('nan')):.4f}",
        flush=True)
  return str(workdir)


def run_config(args, row: Row, seed: int):
  """The SMEC-task config of one trained row and seed."""
  config = _with_data(
      training_runs.load_config(SMEC_CONFIG, args.config_arg), args)
  training_runs.set_seed(config, seed)
  config.task.backbone = args.backbone_workdir
  config.task.update(dict(row.fields))
  config.total_steps = 3 * args.stage_steps
  for section in (config.evaluation, config.checkpoint):
    section.every_steps = args.stage_steps
  config.checkpoint.keep = 1
  config.logging.progress_every_secs = 1e9
  return config


def metrics_by_dim(values: Mapping[str, float], dims) -> dict[str, float]:
  """{"<metric>_d<d>": value} of the task's eval metrics."""
  return {f"{name}_d{d}": float(values[f"eval_{name}_d{d}"])
          for name in METRICS for d in dims}


def retrieval_means(queries, query_labels, corpus, corpus_labels
                    ) -> dict[str, float]:
  """{"ndcg10", "recall10", "map100"}: means over the queries."""
  per_query = retrieval.retrieval_metrics(
      jnp.asarray(queries), jnp.asarray(query_labels), jnp.asarray(corpus),
      jnp.asarray(corpus_labels))
  return {name: float(jnp.mean(per_query[key]))
          for name, key in METRICS.items()}


def pca_projection(train: np.ndarray, d: int) -> tuple[np.ndarray,
                                                       np.ndarray]:
  """The mean `[D]` and top-d principal directions `[D, d]` of `train`."""
  mean = train.mean(axis=0)
  _, _, vt = np.linalg.svd(train - mean, full_matrices=False)
  return mean, vt[:d].T


def compress(key: str, train: np.ndarray, queries: np.ndarray, d: int,
             seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(corpus `[N, d']`, queries `[Q, d']`) of an untrained row."""
  width = train.shape[1]
  if key == "full":
    return train, queries
  if key == "pca":
    mean, directions = pca_projection(train, d)
    return (train - mean) @ directions, (queries - mean) @ directions
  if key == "truncate":
    columns = np.arange(d)
  elif key == "random":
    columns = np.sort(np.random.default_rng(seed).choice(width, d,
                                                         replace=False))
  else:
    raise ValueError(f"no untrained row {key!r}")
  return train[:, columns], queries[:, columns]


def direct_cell(key: str, splits, dims, seeds) -> dict[str, Any]:
  """Mean ± std over seeds of an untrained row's metrics at every d."""
  train, test = splits["train"], splits["eval"]
  emb, label = frozen_embeddings.EMBEDDING, frozen_embeddings.LABEL
  per_seed = []
  for seed in seeds:
    values = {}
    for d in dims:
      corpus, queries = compress(key, train[emb], test[emb], d, seed)
      for name, value in retrieval_means(queries, test[label], corpus,
                                         train[label]).items():
        values[f"{name}_d{d}"] = value
    per_seed.append(values)
  return results_io.summarize_seeds(per_seed)


def trained_cell(args, key: str, dims, seeds) -> dict[str, Any]:
  """Trains a row once per seed; mean ± std of its metrics."""
  per_seed = []
  for seed in seeds:
    result = training_runs.train(run_config(args, ROWS[key], seed))
    values = metrics_by_dim(result.eval_metrics, dims)
    values["ndcg10_full"] = float(result.eval_metrics["eval_ndcg10_full"])
    values["wall_s"] = result.wall_s
    per_seed.append(values)
    print(f"{ROWS[key].label}, seed {seed}: " + ", ".join(
        f"d={d} nDCG@10 {values[f'ndcg10_d{d}']:.4f}" for d in dims)
        + f", {result.wall_s:.0f} s", flush=True)
  return results_io.summarize_seeds(per_seed)


def run_all(args) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """({"width", "dims", "backbone"}, one cell per row)."""
  args.backbone_workdir = train_backbone(args)
  task = tasks.create_task(run_config(args, ROWS["smec_sparse"], args.seed))
  dims, splits = task.kept_dims, task.splits
  seeds = range(args.seed, args.seed + args.seeds)
  cells = [{"row": key, **(trained_cell(args, key, dims, seeds)
                           if ROWS[key].trained else
                           direct_cell(key, splits, dims, seeds))}
           for key in args.rows]
  return {"width": task.width, "dims": list(dims),
          "backbone": args.backbone_workdir}, cells


def _cell(stats, digits: int = 4) -> str:
  return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def to_markdown(results) -> str:
  """A table per metric: rows x kept sizes; trained rows' wall time."""
  cfg = results["config"]
  dims = cfg["dims"]
  header = ["method"] + [f"d={d}" for d in dims]
  tables = []
  for name, key in METRICS.items():
    rows = [[ROWS[cell["row"]].label] + [_cell(cell[f"{name}_d{d}"])
                                         for d in dims]
            for cell in results["cells"]]
    tables += [f"{key}:", results_io.markdown_table(header, rows)]
  timing = [[ROWS[c["row"]].label, f"{c['wall_s']['mean']:.0f}"]
            for c in results["cells"] if "wall_s" in c]
  return "\n\n".join([
      f"{cfg['backbone_config']} backbone ({cfg['dataset']}, D = "
      f"{cfg['width']}) frozen; test images retrieve train images by class "
      f"(cosine); mean ± std over {cfg['seeds']} seeds; trained rows: "
      f"{cfg['stage_steps']} steps per stage x 3 of "
      f"{cfg['batch_size']} embeddings.", *tables,
      results_io.markdown_table(["trained row", "wall s per run"], timing)])


def figure(results):
  """nDCG@10 against d (log2), a line per row."""
  fig, axes = results_io.new_figure(1, 1, panel_size=(7, 5))
  ax = axes.flat[0]
  dims = np.asarray(results["config"]["dims"])
  for i, cell in enumerate(results["cells"]):
    means = np.asarray([cell[f"ndcg10_d{d}"]["mean"] for d in dims])
    stds = np.asarray([cell[f"ndcg10_d{d}"]["std"] for d in dims])
    style = "--" if cell["row"] == "full" else "-"
    ax.errorbar(dims, means, yerr=stds, color=f"C{i}", linestyle=style,
                marker="o", capsize=2, label=ROWS[cell["row"]].label)
  ax.set_xscale("log", base=2)
  ax.set_xticks(dims, [str(d) for d in dims])
  results_io.finish_axes(
      ax, xlabel="kept dimensions d (log2)", ylabel="nDCG@10",
      title=f"{results['config']['dataset']}, D = "
      f"{results['config']['width']}: {results['config']['seeds']} seeds",
      legend_fontsize=7)
  return fig


def parse_args(argv=None):
  """Flags; what is not given comes from --scale."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  results_io.add_output_flags(parser, __file__, with_scale=False)
  training_runs.add_run_flags(parser, PRESETS)
  parser.add_argument("--stage-steps", type=int, default=None)
  parser.add_argument("--rows", nargs="+", default=list(ROWS),
                      choices=tuple(ROWS))
  parser.add_argument("--backbone", default=None,
                      help="a trained mnist5k_vit workdir to reuse")
  parser.add_argument("--data-dir", default=None, help="tfds data dir")
  args = parser.parse_args(argv)
  preset = PRESETS[args.scale]
  args.dataset = preset["dataset"]
  if args.stage_steps is None:
    args.stage_steps = preset["stage_steps"]
  training_runs.check_at_least(args.stage_steps, 1, "--stage-steps")
  training_runs.check_at_least(args.seeds, 1, "--seeds")
  if args.backbone and not pathlib.Path(args.backbone).is_dir():
    raise ValueError(f"--backbone {args.backbone} is not a directory")
  return args


def main(argv=None):
  """Runs the experiment; returns {file name: path} of what it wrote."""
  args = parse_args(argv)
  start = time.perf_counter()
  config = training_runs.load_config(SMEC_CONFIG, args.config_arg)
  shape, cells = run_all(args)
  results = {
      "config": {"scale": args.scale, "backbone_config": BACKBONE_CONFIG,
                 "dataset": args.dataset or config.dataset.name,
                 "stage_steps": args.stage_steps,
                 "batch_size": config.dataset.batch_size,
                 "seeds": args.seeds, "rows": args.rows, **shape},
      "cells": cells}
  results["runtime_seconds"] = time.perf_counter() - start
  return results_io.write_results(args.out, results, to_markdown(results),
                                  {"ndcg_vs_dims.png": figure(results)})


if __name__ == "__main__":
  main()
