"""Weight pruning during training: hard vs soft top-k in magnitude (paper §6).

Command (2-core CPU; --scale small about 4 minutes):

    python experiments/pruning_mlp.py [--scale small|full] [--out DIR]
        [--epochs E] [--seeds S] [--keep-ratios 0.5 0.1 0.05 0.01]
        [--regularization 1.0] [--hidden-sizes 256 256] [--data-dir DIR]

An MLP (ReLU) trained with SGD, batch 128, constant learning rate 1e-2 (the
paper's setting) whose dense kernels W (biases stay dense) are replaced in
the forward pass by a pruned version with k = round(keep ratio x size)
entries per layer:

* hard: the hard top-k in magnitude with a straight-through gradient,
  W + stop_gradient(hard_topk_magnitude(W, k) - W). The forward pass uses
  exactly k weights; the backward pass is the identity, so every weight,
  pruned ones included, receives the gradient of the dense network and a
  pruned weight can grow back into the top k. (Without it, the gradient of
  W -> hard_topk_magnitude(W, k) is the 0/1 mask itself and a pruned weight
  never moves again.)
* soft p=2, soft p=4/3: the paper's soft top-k in magnitude,
  σ · topk_magnitude(W / σ, k, regularization=λ, p) with σ the root mean
  square of W (no gradient through σ), so that λ is relative to the scale of
  the layer's weights (for p = 2 the operator is scale-equivariant and σ
  changes nothing; for p = 4/3 it is not). Default λ = 1.0: entries of |W|
  between the threshold γ and about 2γ are shrunk, larger ones are kept
  whole, smaller ones are exactly 0, and the gradient reaches kept and
  shrunk weights only.
* dense: no pruning during training; pruned only at evaluation (one-shot
  magnitude pruning after training).

Evaluation (test accuracy after every epoch): every method's training-time
kernel is hard-pruned to exactly k nonzeros, hard_topk_magnitude(W', k) with
W' the kernel the forward pass used, so every method is compared at the same
sparsity. The soft operators keep the order of |W|, so the k survivors are
the k largest |W|; they keep their soft values.

Scales (seeds differ in initialisation and data order):

* small: the embedded digits (1,437 train / 360 test images, 8x8 flattened
  to 64 features), MLP 64-256-256-10, 100 epochs (1,100 steps), 3 seeds;
* full: MNIST through tfds (784 features; `tfds build mnist` first, the
  script never downloads), MLP 784-300-100-10 (LeNet-300-100), 100 epochs,
  3 seeds. Documented, not run here.

Inputs are pixel / 255 standardised per pixel with the train split's mean
and standard deviation (floored at 0.1, so constant pixels stay 0).

Writes results.json (per method and keep ratio: final test accuracy mean,
std and per seed, accuracy-vs-epoch curves, nonzero fraction of the
training-time kernels; the dense network's unpruned accuracy), results.md
(rows: methods, columns: keep ratios, mean ± std over seeds) and
accuracy_vs_epoch.png (one panel per keep ratio) and
accuracy_vs_keep_ratio.png.
"""
from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tensorflow_datasets as tfds

from moe import ops
from moe.data import sources

import results_io

HARD, SOFT_P2, SOFT_P43, DENSE = "hard", "soft p=2", "soft p=4/3", "dense"
METHODS = (HARD, SOFT_P2, SOFT_P43, DENSE)
SOFT_P = {SOFT_P2: 2.0, SOFT_P43: 4 / 3}
KEEP_RATIOS = (0.5, 0.1, 0.05, 0.01)
PRESETS = {
    "small": {"dataset": "digits", "hidden_sizes": (256, 256), "epochs": 100},
    "full": {"dataset": "mnist", "hidden_sizes": (300, 100), "epochs": 100},
}
NUM_CLASSES = 10
MIN_PIXEL_STD = 0.1
STYLES = {HARD: dict(color="black", linestyle="--"),
          SOFT_P2: dict(color="tab:blue"), SOFT_P43: dict(color="tab:orange"),
          DENSE: dict(color="tab:gray", linestyle=":")}


def load_split(dataset: str, split: str, data_dir: str | None):
  """Flattened images (pixel / 255) and integer labels of one tfds split.

  Args:
    dataset: tfds name ("digits", "mnist").
    split: tfds split.
    data_dir: tfds data dir; None: `moe.data.sources.resolve_data_dir`.

  Returns:
    (images float32 [N, H*W*C], labels int32 [N]).

  Raises:
    FileNotFoundError: the dataset is not prepared in the data dir (from
      `moe.data.sources.load_builder`; nothing is downloaded).
  """
  builder = sources.load_builder(dataset, data_dir)
  data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
  labels = np.asarray(data["label"], np.int32)
  images = np.asarray(data["image"], np.float32).reshape(len(labels), -1)
  return images / 255.0, labels


def standardize(train, test):
  """Per-feature standardisation with the train statistics (see docstring)."""
  mean = train.mean(0)
  std = np.maximum(train.std(0), MIN_PIXEL_STD)
  return (train - mean) / std, (test - mean) / std


def layer_sizes(num_features: int, hidden_sizes) -> list[tuple[int, int]]:
  """(fan in, fan out) of every dense layer."""
  widths = [num_features, *hidden_sizes, NUM_CLASSES]
  return list(zip(widths[:-1], widths[1:]))


def keep_count(keep_ratio: float, size: int) -> int:
  """k = round(keep_ratio x size), at least 1."""
  return max(1, int(round(keep_ratio * size)))


def init_params(key, sizes) -> list[dict[str, jax.Array]]:
  """LeCun-normal kernels, zero biases."""
  params = []
  for key, (fan_in, fan_out) in zip(jax.random.split(key, len(sizes)), sizes):
    params.append({
        "kernel": jax.nn.initializers.lecun_normal()(key, (fan_in, fan_out)),
        "bias": jnp.zeros((fan_out,))})
  return params


def pruned_kernel(kernel, method: str, k: int, regularization: float):
  """The kernel the forward pass uses during training (module docstring).

  Args:
    kernel: [I, O] dense kernel.
    method: one of METHODS.
    k: kept entries of the whole kernel.
    regularization: λ of the soft operators, relative to the kernel's RMS.

  Returns:
    [I, O].
  """
  flat = kernel.reshape(-1)
  if method == DENSE:
    return kernel
  if method == HARD:
    hard = ops.hard_topk_magnitude(flat, k)
    flat = flat + jax.lax.stop_gradient(hard - flat)
  else:
    scale = jax.lax.stop_gradient(jnp.sqrt(jnp.mean(jnp.square(flat))))
    flat = scale * ops.topk_magnitude(flat / scale, k,
                                      regularization=regularization,
                                      p=SOFT_P[method])
  return flat.reshape(kernel.shape)


def hard_pruned(kernel, keep_ratio: float):
  """Exactly keep_count(keep_ratio, size) nonzeros, those of largest |W|."""
  if keep_ratio >= 1:
    return kernel
  k = keep_count(keep_ratio, kernel.size)
  return ops.hard_topk_magnitude(kernel.reshape(-1), k).reshape(kernel.shape)


def forward(kernels, params, x):
  """MLP logits [B, 10] from given kernels and the params' biases."""
  for i, (kernel, layer) in enumerate(zip(kernels, params)):
    x = x @ kernel + layer["bias"]
    if i < len(params) - 1:
      x = jax.nn.relu(x)
  return x


def accuracy(kernels, params, images, labels):
  return jnp.mean(jnp.argmax(forward(kernels, params, images), -1) == labels)


@functools.partial(jax.jit, static_argnames=(
    "method", "keep_ratio", "eval_ratios", "epochs", "batch_size",
    "learning_rate", "regularization", "sizes"))
def train_seeds(keys, data, *, method: str, keep_ratio: float,
                eval_ratios: tuple[float, ...], epochs: int, batch_size: int,
                learning_rate: float, regularization: float, sizes):
  """Trains one network per key (vmapped) and evaluates after every epoch.

  Args:
    keys: [S] rng keys, one per seed (initialisation and data order).
    data: (train images [N, F], train labels [N], test images, test labels).
    method: one of METHODS.
    keep_ratio: the training-time keep ratio (ignored by DENSE).
    eval_ratios: keep ratios at which to hard-prune for evaluation.
    epochs: passes over the train split (each a new random order; the last
      N mod batch_size examples of an order are skipped).
    batch_size: examples per SGD step.
    learning_rate: constant SGD learning rate.
    regularization: λ of the soft operators.
    sizes: (fan in, fan out) per layer.

  Returns:
    dict of "curves" [S, epochs, R] test accuracies (R = len(eval_ratios)),
    "nonzero_fraction" [S] of the training-time kernels (all layers
    together) and "train_weights_accuracy" [S], the test accuracy with the
    training-time kernels, not hard-pruned.
  """
  train_x, train_y, test_x, test_y = data
  steps = train_x.shape[0] // batch_size
  optimizer = optax.sgd(learning_rate)
  ks = [keep_count(keep_ratio, fan_in * fan_out) for fan_in, fan_out in sizes]

  def training_kernels(params):
    return [pruned_kernel(layer["kernel"], method, k, regularization)
            for layer, k in zip(params, ks)]

  def loss_fn(params, indices):
    logits = forward(training_kernels(params), params, train_x[indices])
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits, train_y[indices]))

  def sgd_step(carry, indices):
    params, opt_state = carry
    grads = jax.grad(loss_fn)(params, indices)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), None

  def evaluate(params):
    kernels = training_kernels(params)
    return jnp.stack([
        accuracy([hard_pruned(w, ratio) for w in kernels], params, test_x,
                 test_y)
        for ratio in eval_ratios])

  def one_seed(key):
    init_key, data_key = jax.random.split(key)
    params = init_params(init_key, sizes)

    def epoch(carry, index):
      order = jax.random.permutation(jax.random.fold_in(data_key, index),
                                     train_x.shape[0])
      batches = order[:steps * batch_size].reshape(steps, batch_size)
      carry, _ = jax.lax.scan(sgd_step, carry, batches)
      return carry, evaluate(carry[0])

    (params, _), curve = jax.lax.scan(
        epoch, (params, optimizer.init(params)), jnp.arange(epochs))
    kernels = training_kernels(params)
    nonzero = sum(jnp.sum(w != 0) for w in kernels) / sum(
        w.size for w in kernels)
    return {"curves": curve, "nonzero_fraction": nonzero,
            "train_weights_accuracy": accuracy(kernels, params, test_x,
                                               test_y)}

  return jax.vmap(one_seed)(keys)


def ratio_name(ratio: float) -> str:
  """'10%' for 0.1."""
  return f"{100 * ratio:g}%"


def summarize(per_seed_curves, per_seed_nonzero, per_seed_unpruned):
  """The results.json entry of one method and keep ratio.

  Args:
    per_seed_curves: [S, epochs] test accuracies.
    per_seed_nonzero: [S] nonzero fractions of the training-time kernels.
    per_seed_unpruned: [S] accuracies of the training-time kernels.

  Returns:
    final_accuracy (mean, std, num_seeds), per_seed final accuracies, the
    curve's per-epoch mean and std, nonzero fraction and the accuracy of the
    training-time kernels (mean and std).
  """
  curves = np.asarray(per_seed_curves, np.float64)
  std = curves.std(0, ddof=1) if len(curves) > 1 else np.zeros(curves.shape[1])
  return {
      "final_accuracy": results_io.mean_std(curves[:, -1]),
      "per_seed": curves[:, -1],
      "curve_mean": curves.mean(0),
      "curve_std": std,
      "train_nonzero_fraction": results_io.mean_std(per_seed_nonzero),
      "train_weights_accuracy": results_io.mean_std(per_seed_unpruned),
  }


def run_all(args, data, sizes) -> dict:
  """Trains every method (dense once per seed) and summarises.

  Returns:
    {method: {ratio name: summary}} plus "dense (unpruned)": {"100%": ...}.
  """
  keys = jax.random.split(jax.random.key(args.seed), args.seeds)
  common = dict(epochs=args.epochs, batch_size=args.batch_size,
                learning_rate=args.learning_rate,
                regularization=args.regularization, sizes=tuple(sizes))
  runs = {}
  for method in METHODS:
    start = time.perf_counter()
    if method == DENSE:
      eval_ratios = tuple(args.keep_ratios) + (1.0,)
      out = jax.device_get(train_seeds(
          keys, data, method=method, keep_ratio=1.0, eval_ratios=eval_ratios,
          **common))
      for i, ratio in enumerate(eval_ratios):
        name = "dense (unpruned)" if ratio == 1.0 else DENSE
        runs.setdefault(name, {})[ratio_name(ratio)] = summarize(
            out["curves"][:, :, i], out["nonzero_fraction"],
            out["train_weights_accuracy"])
    else:
      for ratio in args.keep_ratios:
        out = jax.device_get(train_seeds(
            keys, data, method=method, keep_ratio=ratio, eval_ratios=(ratio,),
            **common))
        runs.setdefault(method, {})[ratio_name(ratio)] = summarize(
            out["curves"][:, :, 0], out["nonzero_fraction"],
            out["train_weights_accuracy"])
    print(f"{method}: {time.perf_counter() - start:.1f} s", flush=True)
  return runs


def _cell(entry) -> str:
  stats = entry["final_accuracy"]
  return f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def to_markdown(results) -> str:
  """Final test accuracy table and nonzero fractions of the training kernels."""
  cfg = results["config"]
  ratios = [ratio_name(r) for r in cfg["keep_ratios"]]
  runs = results["runs"]
  accuracy_rows = [[method] + [_cell(runs[method][r]) for r in ratios]
                   for method in METHODS]
  nonzero_rows = [
      [method] + [f"{runs[method][r]['train_nonzero_fraction']['mean']:.4f}"
                  for r in ratios] for method in METHODS if method != DENSE]
  dense = runs["dense (unpruned)"]["100%"]
  return "\n\n".join([
      f"{cfg['dataset']}, MLP {'-'.join(map(str, cfg['widths']))}, SGD "
      f"lr {cfg['learning_rate']:g}, batch {cfg['batch_size']}, "
      f"{cfg['epochs']} epochs, λ = {cfg['regularization']:g} (relative to "
      f"the kernel RMS), mean ± std over {cfg['seeds']} seeds. Test accuracy "
      "after the last epoch, every method hard-pruned to exactly k = keep "
      "ratio x size weights per layer (dense: trained dense, pruned after "
      f"training; unpruned dense: {_cell(dense)}).",
      results_io.markdown_table(["method"] + [f"keep {r}" for r in ratios],
                                accuracy_rows),
      "Nonzero fraction of the kernels used in training (all layers; the "
      "hard-pruned evaluation keeps exactly the keep ratio):",
      results_io.markdown_table(["method"] + [f"keep {r}" for r in ratios],
                                nonzero_rows),
  ])


def curves_figure(results):
  """Test accuracy vs epoch, one panel per keep ratio, mean ± std band."""
  ratios = [ratio_name(r) for r in results["config"]["keep_ratios"]]
  fig, axes = results_io.new_figure(1, len(ratios), panel_size=(4.0, 3.2))
  epochs = np.arange(1, results["config"]["epochs"] + 1)
  for ax, ratio in zip(axes[0], ratios):
    for method in METHODS:
      entry = results["runs"][method][ratio]
      mean, std = np.asarray(entry["curve_mean"]), np.asarray(entry["curve_std"])
      ax.plot(epochs, mean, label=method, **STYLES[method])
      ax.fill_between(epochs, mean - std, mean + std, alpha=0.2,
                      color=STYLES[method]["color"])
    ax.set(title=f"keep {ratio}", xlabel="epoch", ylim=(0, 1))
    ax.grid(alpha=0.3)
  axes[0, 0].set_ylabel("test accuracy (hard-pruned to k)")
  axes[0, 0].legend(fontsize="small")
  return fig


def keep_ratio_figure(results):
  """Final test accuracy vs keep ratio (log x), error bars = std."""
  cfg = results["config"]
  fig, axes = results_io.new_figure(1, 1)
  ax = axes[0, 0]
  for method in METHODS:
    entries = [results["runs"][method][ratio_name(r)]
               for r in cfg["keep_ratios"]]
    ax.errorbar(cfg["keep_ratios"],
                [e["final_accuracy"]["mean"] for e in entries],
                yerr=[e["final_accuracy"]["std"] for e in entries],
                marker="o", capsize=3, label=method, **STYLES[method])
  unpruned = results["runs"]["dense (unpruned)"]["100%"]["final_accuracy"]
  ax.axhline(unpruned["mean"], color="tab:gray", linewidth=0.8,
             label="dense, unpruned")
  ax.set(xscale="log", xlabel="keep ratio", ylabel="final test accuracy",
         ylim=(0, 1))
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize="small")
  return fig


def parse_args(argv=None):
  """Flags; dataset, widths and epochs not given come from --scale."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  results_io.add_output_flags(parser, __file__)
  parser.add_argument("--epochs", type=int, default=None,
                      help="epochs (default: from --scale)")
  parser.add_argument("--hidden-sizes", type=int, nargs="+", default=None,
                      help="hidden widths (default: from --scale)")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0, help="first rng seed")
  parser.add_argument("--keep-ratios", type=float, nargs="+",
                      default=list(KEEP_RATIOS))
  parser.add_argument("--regularization", type=float, default=1.0,
                      help="λ of the soft operators, relative to the RMS of "
                      "each kernel")
  parser.add_argument("--learning-rate", type=float, default=1e-2)
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--data-dir", default=None,
                      help="tfds data dir (default: moe.data's)")
  args = parser.parse_args(argv)
  preset = PRESETS[args.scale]
  args.dataset = preset["dataset"]
  if args.epochs is None:
    args.epochs = preset["epochs"]
  if args.hidden_sizes is None:
    args.hidden_sizes = list(preset["hidden_sizes"])
  for name in ("epochs", "seeds", "batch_size"):
    if getattr(args, name) < 1:
      raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got "
                       f"{getattr(args, name)}")
  if not all(0 < r < 1 for r in args.keep_ratios):
    raise ValueError(f"--keep-ratios must be in (0, 1), got "
                     f"{args.keep_ratios}")
  if args.regularization <= 0:
    raise ValueError(f"--regularization must be > 0, got "
                     f"{args.regularization}")
  return args


def main(argv=None):
  """Runs the experiment; returns {file name: path} of what it wrote."""
  args = parse_args(argv)
  start = time.perf_counter()
  train_x, train_y = load_split(args.dataset, "train", args.data_dir)
  test_x, test_y = load_split(args.dataset, "test", args.data_dir)
  if args.batch_size > len(train_y):
    raise ValueError(f"--batch-size {args.batch_size} exceeds the "
                     f"{len(train_y)} train examples")
  train_x, test_x = standardize(train_x, test_x)
  data = tuple(jnp.asarray(a) for a in (train_x, train_y, test_x, test_y))
  sizes = layer_sizes(train_x.shape[1], args.hidden_sizes)
  runs = run_all(args, data, sizes)
  results = {
      "config": {
          "scale": args.scale, "dataset": args.dataset,
          "widths": [sizes[0][0]] + [fan_out for _, fan_out in sizes],
          "epochs": args.epochs, "seeds": args.seeds, "first_seed": args.seed,
          "keep_ratios": list(args.keep_ratios),
          "kept_per_layer": {ratio_name(r): [keep_count(r, a * b)
                                             for a, b in sizes]
                             for r in args.keep_ratios},
          "regularization": args.regularization,
          "learning_rate": args.learning_rate, "batch_size": args.batch_size,
          "optimizer": "sgd (constant learning rate)",
          "train_examples": len(train_y), "test_examples": len(test_y),
          "methods": list(METHODS)},
      "runs": runs,
      "runtime_seconds": time.perf_counter() - start,
  }
  figures = {"accuracy_vs_epoch.png": curves_figure(results),
             "accuracy_vs_keep_ratio.png": keep_ratio_figure(results)}
  return results_io.write_results(args.out, results, to_markdown(results),
                                  figures)


if __name__ == "__main__":
  main()
