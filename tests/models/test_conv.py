"""Conv: nnx.Conv's parameters and numbers, with 1x1 convolutions computed as dots.

Outputs and gradients (input, kernel, bias) are compared with XLA's own convolution (plain
nnx.Conv, i.e. `lax.conv_general_dilated` and its transposes) and with torch's `conv2d`
autograd, for the convolutions our models have: 1x1 at stride 1 and 2 (ResNet's downsample),
with and without bias, and the stems (ResNet's 7x7/2, EfficientNet's and MobileNetV3's 3x3/2);
float32 at a relative error (norm) of at most 1e-5, and bfloat16 (the frozen teacher's
dtype) at 1e-2 of the float32 result, the rounding of bfloat16 inputs and outputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from retro_jax.models import conv as conv_lib
from retro_jax.models.conv import Conv

RTOL = 1e-5
BF16_RTOL = 1e-2

# (in, out, kernel, stride, padding, height, width, bias): small maps, odd and even sizes.
CASES = [
    (8, 16, 1, 1, 0, 7, 6, True),
    (8, 16, 1, 2, 0, 7, 6, False),  # ResNet's downsample: odd rows drop the last one.
    (8, 16, 1, 2, 0, 8, 8, True),
    (3, 16, 7, 2, 3, 16, 15, False),  # ResNet's stem.
    (3, 8, 3, 2, 1, 15, 16, True),  # EfficientNet's and MobileNetV3's stems (no bias there).
]


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def make_pair(cin, cout, k, s, p, bias, **kwargs) -> tuple[Conv, nnx.Conv]:
  """Our Conv and an nnx.Conv with the same arguments and seed (so the same parameters)."""
  args = dict(strides=s, padding=((p, p), (p, p)), use_bias=bias, rngs=nnx.Rngs(0), **kwargs)
  ours = Conv(cin, cout, (k, k), **args)
  args["rngs"] = nnx.Rngs(0)
  reference = nnx.Conv(cin, cout, (k, k), **args)
  if bias:  # nnx initialises the bias to zero; make its gradient path visible in the output.
    ours.bias[...] = reference.bias[...] = jnp.linspace(-1.0, 1.0, cout)
  return ours, reference


def value_and_grads(module: nnx.Conv, x: jax.Array, g: jax.Array):
  """Output, and the input / kernel / bias gradients of <module(x), g> (one compiled call)."""
  graphdef, params = nnx.split(module)

  @jax.jit
  def run(params, x, g):
    y, vjp = jax.vjp(lambda params, x: nnx.merge(graphdef, params)(x), params, x)
    dparams, dx = vjp(g.astype(y.dtype))
    grads = {"x": dx, "kernel": dparams["kernel"][...]}
    if module.bias is not None:
      grads["bias"] = dparams["bias"][...]
    return y, grads

  return run(params, x, g)


def torch_value_and_grads(module: nnx.Conv, x: jax.Array, g: jax.Array, stride: int,
                          padding: int):
  """The same through torch.nn.functional.conv2d's autograd, back in JAX's layouts."""
  xt = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2), requires_grad=True)
  wt = torch.tensor(np.asarray(module.kernel[...]).transpose(3, 2, 0, 1), requires_grad=True)
  bt = (torch.tensor(np.asarray(module.bias[...]), requires_grad=True)
        if module.bias is not None else None)
  yt = torch.nn.functional.conv2d(xt, wt, bt, stride=stride, padding=padding)
  yt.backward(torch.tensor(np.asarray(g).transpose(0, 3, 1, 2)))
  grads = {"x": xt.grad.numpy().transpose(0, 2, 3, 1),
           "kernel": wt.grad.numpy().transpose(2, 3, 1, 0)}
  if bt is not None:
    grads["bias"] = bt.grad.numpy()
  return yt.detach().numpy().transpose(0, 2, 3, 1), grads


def normal(*shape: int, seed: int = 0) -> jax.Array:
  # NumPy's generator: compiling jax.random.normal per shape costs seconds on 2 cores.
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def inputs(cin, h, w, module):
  x = normal(2, h, w, cin, seed=1)
  return x, normal(*jax.eval_shape(module, x).shape, seed=2)


@pytest.mark.parametrize("cin,cout,k,s,p,h,w,bias", CASES)
def test_matches_xla_convolution_and_torch(cin, cout, k, s, p, h, w, bias):
  ours, reference = make_pair(cin, cout, k, s, p, bias)
  x, g = inputs(cin, h, w, ours)
  y, grads = value_and_grads(ours, x, g)
  for name, (y_ref, grads_ref) in {
      "nnx.Conv": value_and_grads(reference, x, g),
      "torch": torch_value_and_grads(reference, x, g, s, p)}.items():
    assert y.shape == y_ref.shape
    assert rel_err(y, y_ref) <= RTOL, f"output vs {name}"
    assert grads.keys() == grads_ref.keys()
    for key in grads:
      assert rel_err(grads[key], grads_ref[key]) <= RTOL, f"{key} gradient vs {name}"


@pytest.mark.parametrize("k,s,p", [(1, 2, 0), (7, 2, 3)])
def test_bfloat16_computation_matches_float32(k, s, p):
  # The frozen teacher runs with dtype=bfloat16: inputs, kernel and output are rounded.
  cin = 3 if k == 7 else 16
  ours, native = make_pair(cin, 32, k, s, p, False, dtype=jnp.bfloat16)
  full, _ = make_pair(cin, 32, k, s, p, False)
  x, g = inputs(cin, 9, 8, ours)
  y, grads = value_and_grads(ours, x, g)
  y_native, grads_native = value_and_grads(native, x, g)
  y_full, grads_full = value_and_grads(full, x, g)
  assert y.dtype == y_native.dtype == jnp.bfloat16
  assert rel_err(y, y_full) <= BF16_RTOL and rel_err(y_native, y_full) <= BF16_RTOL
  for key in grads:
    assert rel_err(grads[key], grads_full[key]) <= BF16_RTOL, key


def test_mixed_precision_input_promotes_like_nnx_conv():
  ours, reference = make_pair(8, 16, 1, 1, 0, True)
  x = normal(1, 5, 5, 8).astype(jnp.bfloat16)
  y, y_ref = ours(x), reference(x)
  assert y.dtype == y_ref.dtype == jnp.float32
  assert rel_err(y, y_ref) <= RTOL


def test_is_an_nnx_conv_with_its_parameters_and_init():
  ours, reference = make_pair(8, 16, 3, 2, 1, True)
  assert isinstance(ours, nnx.Conv)

  def params(module):
    return {path: np.asarray(v) for path, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}

  ours_params, reference_params = params(ours), params(reference)
  assert ours_params.keys() == reference_params.keys() == {("kernel",), ("bias",)}
  for path, value in ours_params.items():
    np.testing.assert_array_equal(value, reference_params[path])
  assert Conv(8, 16, (1, 1), use_bias=False, rngs=nnx.Rngs(0)).bias is None


def lowered_primitives(module, x) -> str:
  return str(jax.make_jaxpr(lambda x: module(x))(x))


def test_pointwise_is_a_dot_and_the_rest_is_xla_convolution():
  x = jnp.ones((2, 8, 8, 8))
  one_by_one = Conv(8, 16, (1, 1), strides=2, padding="SAME", rngs=nnx.Rngs(0))
  jaxpr = lowered_primitives(one_by_one, x)
  assert "dot_general" in jaxpr and "conv_general_dilated" not in jaxpr
  three = Conv(8, 16, (3, 3), rngs=nnx.Rngs(0))
  assert "conv_general_dilated" in lowered_primitives(three, x)
  padded = Conv(8, 16, (1, 1), padding=1, rngs=nnx.Rngs(0))  # Not a plain product: XLA's.
  assert "conv_general_dilated" in lowered_primitives(padded, x)
  one_by_one.implementation = "native"
  assert one_by_one.implementation == "native"
  assert "conv_general_dilated" in lowered_primitives(one_by_one, x)


def test_forward_mode_and_second_order():
  ours, reference = make_pair(8, 16, 1, 2, 0, True)
  x, t = normal(2, 7, 7, 8), normal(2, 7, 7, 8, seed=1)
  _, tangent = jax.jvp(lambda x: ours(x), (x,), (t,))
  _, tangent_ref = jax.jvp(lambda x: reference(x), (x,), (t,))
  assert rel_err(tangent, tangent_ref) <= RTOL

  def grad_of_grad_norm(module):
    inner = jax.grad(lambda x: jnp.sum(jnp.sin(module(x))))
    return jax.grad(lambda x: jnp.sum(inner(x) ** 2))(x)

  assert rel_err(grad_of_grad_norm(ours), grad_of_grad_norm(reference)) <= RTOL


def test_extra_batch_dimensions_like_nnx_conv():
  ours, reference = make_pair(8, 16, 1, 1, 0, True)
  x = normal(3, 2, 5, 5, 8)
  assert rel_err(nnx.jit(ours)(x), nnx.jit(reference)(x)) <= RTOL


def test_rejects_bad_arguments():
  with pytest.raises(ValueError, match="unknown conv implementation"):
    Conv(8, 16, (1, 1), implementation="fast", rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="chooses its convolution"):
    Conv(8, 16, (1, 1), conv_general_dilated=jax.lax.conv_general_dilated, rngs=nnx.Rngs(0))
  assert conv_lib.IMPLEMENTATIONS == ("auto", "native")
