"""The student's precision, config `student.dtype`: 'float32' (default) or 'bfloat16'.

bfloat16 is mixed precision, the usual policy on TPUs and recent GPUs:
  * parameters, optimiser state and gradients stay float32 (every layer casts its float32
    parameters to bfloat16 for the product, so updates are applied to float32 masters);
  * activations are bfloat16: every convolution, depthwise convolution, dense layer and
    attention product of the student's backbone, its own head or Retro's adapter, and of the
    momentum (key / EMA) copies, takes bfloat16 operands;
  * batch-norm and layer-norm statistics are computed in float32 (flax's float32 reductions)
    and the running statistics stay float32;
  * the embeddings and logits are cast to float32 before any loss, softmax or normalisation
    of an objective, and the teacher keeps its own precision (`teacher.dtype`); Retro's
    pooled adapter output enters the teacher's frozen head in float32.

Who gains: TPUs (whose matrix units take bfloat16 natively) and GPUs with bfloat16 tensor
cores (NVIDIA Ampere and later: A100, H100, L4, ...), where bfloat16 products run faster than
float32 ones and activations take half the memory. A CPU does not gain: keep 'float32'
there (the tests run bfloat16 on CPU for its numbers only).

The exported student (WORKDIR/student) holds the float32 parameters and is rebuilt in float32;
downstream code chooses its own precision.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

# None: layers keep their float32 default, so a float32 run traces exactly as before the key
# existed.
DTYPES: dict[str, Any] = {"float32": None, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str) -> Any:
  """The layers' `dtype` argument for a `student.dtype` name (None for float32).

  Raises:
    ValueError: an unknown name.
  """
  if name not in DTYPES:
    raise ValueError(f"dtype {name!r} is not one of {sorted(DTYPES)}")
  return DTYPES[name]
