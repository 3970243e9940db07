"""The compressed student in one file: packed low-bit codes and a bitmask.

Layout of the `.npz` (`np.savez_compressed`: the arrays deflated, which
shrinks the bitmask of a very sparse kernel far below its 1 bit per weight,
while the packed codes stay about b bits each; its size on disk is the
model's size):

  header                 uint8 JSON: format, version, model config, bits,
                         every parameter's name, shape and kind
  <name>:mask            a pruned kernel's nonzero pattern, `np.packbits`
                         of N bits (row-major)
  <name>:codes           its nonzero codes, b bits each, packed (code +
                         qmax as an unsigned b-bit number)
  <name>:scales          float32 `[O]`, the per-channel scales
  <name>:values          (weight_bits 32) the nonzero float32 values
  <name>                 a parameter that is not pruned, float32

`read_student` rebuilds the dense float parameters exactly as the forward
pass saw them (`codes * scales` on the mask) and the model from its config;
`predict` runs it with the same activation quantization.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from etils import epath
import flax.linen as nn
from flax import traverse_util
import jax
import numpy as np

from moe.compress import quantization
from moe.nn import models

FORMAT, VERSION = "moe.pqk_student", 1
HEADER = "header"


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
  """Unsigned integers < 2^bits, `bits` each, into a uint8 stream."""
  values = np.asarray(values, np.uint16).reshape(-1)
  planes = (values[:, None] >> np.arange(bits, dtype=np.uint16)) & 1
  return np.packbits(planes.astype(np.uint8).reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
  """The inverse of `pack_bits` for `count` values."""
  planes = np.unpackbits(packed, bitorder="little", count=count * bits)
  weights = (1 << np.arange(bits)).astype(np.int64)
  return planes.reshape(count, bits).astype(np.int64) @ weights


def write_student(path: str | os.PathLike, *, model_config: Mapping[str, Any],
                  kernels: Mapping[str, np.ndarray],
                  other_params: Mapping[str, np.ndarray], weight_bits: int,
                  activation_bits: int) -> int:
  """Writes the student; returns the file's size in bytes.

  Args:
    path: the `.npz` to write (via `path.tmp`, moved into place).
    model_config: `config.model` as a plain dict (JSON-able).
    kernels: name -> the pruned kernel before quantization (float).
    other_params: name -> every other parameter.
    weight_bits: the kernels' bits (2..8, or 32 for float values).
    activation_bits: the activation bits the model runs with.
  """
  arrays, params = {}, {}
  for name, kernel in kernels.items():
    kernel = np.asarray(kernel, np.float32)
    if weight_bits == quantization.FLOAT_BITS:
      nonzero = kernel != 0
      arrays[f"{name}:values"] = kernel[nonzero]
    else:
      codes, scales = jax.device_get(
          quantization.quantize_kernel(kernel, weight_bits))
      nonzero = codes != 0
      arrays[f"{name}:codes"] = pack_bits(
          codes[nonzero].astype(np.int64) + quantization.qmax(weight_bits),
          weight_bits)
      arrays[f"{name}:scales"] = np.asarray(scales, np.float32)
    arrays[f"{name}:mask"] = np.packbits(nonzero.reshape(-1))
    params[name] = {"kind": "pruned", "shape": list(kernel.shape),
                    "nonzeros": int(nonzero.sum())}
  for name, value in other_params.items():
    arrays[name] = np.asarray(value, np.float32)
    params[name] = {"kind": "float", "shape": list(np.shape(value))}
  header = {"format": FORMAT, "version": VERSION, "model": model_config,
            "weight_bits": weight_bits, "activation_bits": activation_bits,
            "params": params}
  arrays[HEADER] = np.frombuffer(json.dumps(header).encode(), np.uint8)
  path = epath.Path(path)
  partial = path.parent / (path.name + ".tmp")
  with partial.open("wb") as f:
    np.savez_compressed(f, **arrays)
  partial.replace(path)
  return os.path.getsize(path)


@dataclasses.dataclass(frozen=True)
class Student:
  """A loaded student.

  Attributes:
    model: the flax module.
    params: its parameters, float32 numpy arrays.
    weight_bits: bits of its pruned kernels.
    activation_bits: bits of its layer inputs.
    nonzeros: name -> nonzero weights of each pruned kernel.
  """
  model: nn.Module
  params: Any
  weight_bits: int
  activation_bits: int
  nonzeros: Mapping[str, int]


def _kernel(data, name: str, spec: Mapping[str, Any], bits: int
            ) -> np.ndarray:
  shape = tuple(spec["shape"])
  size = int(np.prod(shape))
  nonzero = np.unpackbits(data[f"{name}:mask"], count=size).astype(bool)
  if nonzero.sum() != spec["nonzeros"]:
    raise ValueError(f"student file: {name}:mask has {nonzero.sum()} ones, "
                     f"the header says {spec['nonzeros']}.")
  dense = np.zeros(size, np.float32)
  if bits == quantization.FLOAT_BITS:
    dense[nonzero] = data[f"{name}:values"]
    return dense.reshape(shape)
  codes = np.zeros(size, np.float32)
  codes[nonzero] = unpack_bits(data[f"{name}:codes"], bits, spec["nonzeros"]
                               ) - quantization.qmax(bits)
  return codes.reshape(shape) * data[f"{name}:scales"]


def read_student(path: str | os.PathLike) -> Student:
  """Reads a file of `write_student`.

  Raises:
    FileNotFoundError: if there is no file at `path`.
    ValueError: if it is not a student file of this version.
  """
  path = epath.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no student file at {path}.")
  with path.open("rb") as f, np.load(f) as data:
    if HEADER not in data.files:
      raise ValueError(f"{path} is not a {FORMAT} file (no {HEADER!r}).")
    header = json.loads(bytes(data[HEADER]).decode())
    if (header.get("format"), header.get("version")) != (FORMAT, VERSION):
      raise ValueError(f"{path}: format {header.get('format')!r} version "
                       f"{header.get('version')!r}, expected {FORMAT!r} "
                       f"version {VERSION}.")
    flat = {}
    for name, spec in header["params"].items():
      flat[name] = (_kernel(data, name, spec, header["weight_bits"])
                    if spec["kind"] == "pruned" else data[name])
  return Student(
      model=models.build_model(header["model"]),
      params=traverse_util.unflatten_dict(flat, sep="/"),
      weight_bits=header["weight_bits"],
      activation_bits=header["activation_bits"],
      nonzeros={name: spec["nonzeros"] for name, spec in
                header["params"].items() if spec["kind"] == "pruned"})


def predict(student: Student, inputs: jax.Array) -> jax.Array:
  """The student's logits `[B, C]` for a batch of inputs."""
  with quantization.quantized_layer_inputs(student.activation_bits):
    logits, _ = student.model.apply({"params": student.params}, inputs,
                                    train=False)
  return logits
