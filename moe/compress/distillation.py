"""Knowledge distillation losses, one way and mutual.

Shapes: B examples, C classes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def kd_loss(logits: jax.Array, target_logits: jax.Array,
            temperature: float) -> jax.Array:
  """Per-example T² KL(softmax(target / T) || softmax(logits / T)).

  The target is a fixed teacher (no gradient flows into `target_logits`);
  the T² factor keeps the gradient scale independent of T (Hinton et al.,
  2015).

  Args:
    logits: `[B, C]` of the network being trained.
    target_logits: `[B, C]` of the network it learns from.
    temperature: T > 0.

  Returns:
    `[B]` losses, >= 0, 0 where the two distributions are equal.
  """
  target = jax.lax.stop_gradient(target_logits) / temperature
  log_p = jax.nn.log_softmax(target)
  log_q = jax.nn.log_softmax(logits / temperature)
  kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
  return temperature ** 2 * kl


def mutual_kd_losses(student_logits: jax.Array, teacher_logits: jax.Array,
                     temperature: float) -> tuple[jax.Array, jax.Array]:
  """The two losses of mutual distillation (PQK phase 2).

  Args:
    student_logits: `[B, C]`.
    teacher_logits: `[B, C]`.
    temperature: T > 0.

  Returns:
    `(student_kd, teacher_kd)`, each `[B]`: the student learns the teacher's
    distribution and the teacher the student's, each with the other fixed.
  """
  return (kd_loss(student_logits, teacher_logits, temperature),
          kd_loss(teacher_logits, student_logits, temperature))
