"""What a compiled SPMD program communicates, read from its HLO text.

`compiled.as_text()` (after `jax.jit(...).lower(...).compile()`) is the
per-device program. Each collective instruction there reads

  %all-to-all.3 = f32[4,2,5,32]{3,2,1,0} all-to-all(%x), channel_id=7, ...
  %ag = (f32[8,64]{1,0}, f32[64,128]{1,0}) all-gather(%a, %b), ...

and `collectives` turns each into its kind and the shapes and bytes of its
result on one device (for asynchronous `-start` ops on GPU/TPU, the last
element of the result tuple: the output buffer).
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re

import jax.numpy as jnp

KINDS = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter",
         "collective-permute", "ragged-all-to-all")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
               "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
               "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}

_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<result>.+?)\s+"
    r"(?P<kind>" + "|".join(sorted(KINDS, key=len, reverse=True)) +
    r")(?P<start>-start)?\(", re.MULTILINE)
_SHAPE = re.compile(r"\b(?P<dtype>[a-z]+[0-9]*[a-z0-9]*)\[(?P<dims>[0-9,]*)\]")


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective instruction of a compiled program.

  Attributes:
    kind: one of `KINDS`.
    shapes: result shapes as HLO writes them, e.g. ("f32[8,64,128]",).
    bytes: bytes of the result on one device.
  """
  kind: str
  shapes: tuple[str, ...]
  bytes: int


def shape_text(dtype, shape) -> str:
  """HLO's text of a shape, e.g. `f32[8,64,128]` for float32 (8, 64, 128)."""
  names = {"float32": "f32", "bfloat16": "bf16", "float16": "f16",
           "float64": "f64", "int32": "s32", "int64": "s64", "bool": "pred"}
  name = str(jnp.dtype(dtype))
  return f"{names.get(name, name)}[{','.join(map(str, shape))}]"


def _shapes(result: str) -> list[tuple[str, tuple[int, ...]]]:
  return [(m.group("dtype"),
           tuple(int(d) for d in m.group("dims").split(",") if d))
          for m in _SHAPE.finditer(result) if m.group("dtype") in DTYPE_BYTES]


def collectives(hlo_text: str) -> list[Collective]:
  """Returns the collectives of a compiled program, in program order.

  Args:
    hlo_text: `compiled.as_text()`.

  Returns:
    One `Collective` per instruction (`-done` halves of async pairs are not
    instructions of their own here).
  """
  found = []
  for match in _INSTRUCTION.finditer(hlo_text):
    shapes = _shapes(match.group("result"))
    if match.group("start") and len(shapes) > 1:
      shapes = shapes[-1:]
    found.append(Collective(
        kind=match.group("kind"),
        shapes=tuple(f"{dtype}[{','.join(map(str, dims))}]"
                     for dtype, dims in shapes),
        bytes=sum(DTYPE_BYTES[dtype] * math.prod(dims)
                  for dtype, dims in shapes)))
  return found


def summarize(found: list[Collective]) -> dict[str, tuple[int, int]]:
  """Returns {kind: (count, bytes)} over `found`, every kind of `KINDS`."""
  totals = collections.OrderedDict((kind, [0, 0]) for kind in KINDS)
  for op in found:
    totals[op.kind][0] += 1
    totals[op.kind][1] += op.bytes
  return {kind: (count, size) for kind, (count, size) in totals.items()}
