"""Tests of experiments/topk_loss_vit.py: label noise, configs, a tiny run."""
import numpy as np
import pytest
import tensorflow as tf

import experiments_testing

topk_script = experiments_testing.import_script("topk_loss_vit")


def test_label_noise_is_a_fixed_fraction_of_wrong_labels():
  op = topk_script.label_noise(0.3, 10, seed=1)
  ids = tf.range(2000, dtype=tf.int32)
  labels = tf.cast(ids % 10, tf.int64)

  def noisy():
    return np.array([int(op({"id": i, "label": y})["label"])
                     for i, y in zip(ids[:400], labels[:400])])

  first, again = noisy(), noisy()
  np.testing.assert_array_equal(first, again)  # Per example, not per call.
  flipped = first != labels[:400].numpy()
  assert 0.2 < flipped.mean() < 0.4
  assert set(first[flipped]) <= set(range(10))
  other_seed = topk_script.label_noise(0.3, 10, seed=2)
  assert any(int(other_seed({"id": i, "label": y})["label"]) != first[int(i)]
             for i, y in zip(ids[:50], labels[:50]))
  keep_all = topk_script.label_noise(0.0, 10)
  assert int(keep_all({"id": 3, "label": tf.constant(4, tf.int64)})[
      "label"]) == 4


def test_with_label_noise_inserts_the_op_after_decoding():
  pp = "decode|value_range(-1, 1)|onehot(10, key_result='labels')"
  assert topk_script.with_label_noise(pp, 0.3, 10) == (
      "decode|label_noise(0.3, 10)|value_range(-1, 1)|"
      "onehot(10, key_result='labels')")
  with pytest.raises(ValueError, match="starts with 'decode|'"):
    topk_script.with_label_noise("value_range(-1, 1)", 0.3, 10)


def test_finetune_config_uses_init_from_and_the_loss_options():
  args = topk_script.parse_args([])
  config = topk_script.finetune_config(args, "topk_xent", 1, "/tmp/pre")
  assert config.init_from.checkpoint == "/tmp/pre"
  assert config.init_from.reinit == ("head/.*",)
  assert config.task.loss == "topk_xent"
  assert config.task.loss_options.to_dict() == {
      "topk_weights": (0.5, 0.5), "regularization": 1.0, "p": 4 / 3,
      "epsilon": 1e-7}
  assert config.dataset.train_split == "train[50%:]"
  assert config.dataset.pp_train.startswith("decode|label_noise(0.3, 10)|")
  assert "label_noise" not in config.dataset.pp_eval
  assert (config.total_steps, config.seed) == (300, 1)
  xent = topk_script.finetune_config(args, "softmax_xent", 1, "/tmp/pre")
  assert (xent.task.loss, xent.task.loss_options.to_dict()) == (
      "softmax_xent", {})
  full = topk_script.parse_args(["--scale", "full"])
  assert (full.config_file, full.label_noise, full.pretrain) == (
      "cifar100_ft_vit_b16.py", 0.0, False)
  assert full.topk_weights == (0.5, 0.0, 0.0, 0.0, 0.5)
  with pytest.raises(ValueError, match="--label-noise must be in"):
    topk_script.parse_args(["--label-noise", "2"])


@pytest.mark.slow
def test_tiny_run_writes_every_field(tmp_path, digits_data_dir):
  paths = topk_script.main([
      "--out", str(tmp_path), "--config-arg", "runlocal", "--seeds", "1",
      "--pretrain-steps", "4", "--finetune-steps", "4",
      "--data-dir", digits_data_dir])
  results = experiments_testing.read_outputs(paths, ["topk_accuracy.png"])
  assert set(results) == {"config", "pretrain", "losses", "runtime_seconds"}
  assert results["config"]["finetune_steps"] == 4
  assert results["pretrain"]["steps"] == 4
  assert set(results["losses"]) == {"softmax_xent", "topk_xent"}
  for stats in results["losses"].values():
    assert set(stats) == {f"top{k}" for k in range(1, 6)} | {"wall_s"}
    accuracies = [stats[f"top{k}"]["mean"] for k in range(1, 6)]
    assert all(0 <= a <= 1 for a in accuracies)
    assert accuracies == sorted(accuracies)  # Top-k grows with k.
    assert stats["top1"]["per_seed"] == [stats["top1"]["mean"]]
