"""DepthwiseConv: same parameters and same numbers as nnx.Conv's grouped convolution and torch.

Every implementation is compared, forward and both gradients (input and kernel), with
`nnx.Conv(feature_group_count=C)` and with the real `torch.nn.Conv2d(groups=C)`, for strides
1, 2 (and 3), kernels 3 and 5, odd, even and non-square spatial sizes, in float32 at a relative
error of at most 1e-5.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from retro_jax.models import depthwise
from retro_jax.models.depthwise import DepthwiseConv

RTOL = 1e-5
CHANNELS = 8

# (kernel, stride, padding or None for kernel // 2, height, width). Each case costs a few
# seconds of XLA compilation on 2 cores, so the quick set covers strides 1 and 2, kernels 3 and
# 5, odd, even and non-square sizes; the slow set adds the rarer combinations.
CASES = [
    (3, 1, None, 9, 8),
    (3, 2, None, 8, 10),
    (5, 1, None, 7, 7),
    (5, 2, None, 11, 10),
    pytest.param(3, 1, None, 8, 8, marks=pytest.mark.slow),
    pytest.param(3, 2, None, 9, 9, marks=pytest.mark.slow),
    pytest.param(5, 2, None, 10, 9, marks=pytest.mark.slow),
    pytest.param(3, 2, 0, 9, 8, marks=pytest.mark.slow),
    pytest.param(3, 3, 1, 10, 11, marks=pytest.mark.slow),
    pytest.param(5, 1, 4, 6, 6, marks=pytest.mark.slow),
]


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def make_layers(kernel: int, stride: int, padding: int | None) -> dict[str, nnx.Module]:
  """DepthwiseConv (with bias) in each implementation, and the nnx.Conv with its parameters."""
  layers = {}
  for implementation in ("shifted", "grouped"):
    layers[implementation] = DepthwiseConv(CHANNELS, kernel, stride, padding, use_bias=True,
                                           implementation=implementation, rngs=nnx.Rngs(0))
    layers[implementation].bias[...] = jnp.linspace(-1.0, 1.0, CHANNELS)
  p = layers["shifted"].padding
  conv = nnx.Conv(CHANNELS, CHANNELS, (kernel, kernel), strides=stride,
                  padding=((p, p), (p, p)), feature_group_count=CHANNELS, use_bias=True,
                  rngs=nnx.Rngs(1))
  conv.kernel[...] = layers["shifted"].kernel[...]
  conv.bias[...] = layers["shifted"].bias[...]
  layers["nnx.Conv"] = conv
  return layers


def values_and_grads(layers: dict[str, nnx.Module], x: jax.Array, cotangent_key: jax.Array):
  """Per layer: output, and the gradients of <output, cotangent> wrt x, kernel and bias."""
  split = {name: nnx.split(layer, nnx.Param) for name, layer in layers.items()}

  @jax.jit  # One compilation for all layers: XLA compiles are the slow part of this test.
  def run(x, params):
    results = {}
    for name, (graphdef, _) in split.items():
      y, vjp = jax.vjp(lambda x, p, g=graphdef: nnx.merge(g, p)(x), x, params[name])
      dx, dparams = vjp(jax.random.normal(cotangent_key, y.shape))
      results[name] = (y, dx, dparams["kernel"][...], dparams["bias"][...])
    return results

  return run(x, {name: params for name, (_, params) in split.items()})


def torch_values_and_grads(layer: DepthwiseConv, x: jax.Array, cotangent: jax.Array):
  """The same quantities from torch.nn.Conv2d(groups=C) holding the layer's parameters."""
  conv = torch.nn.Conv2d(CHANNELS, CHANNELS, layer.kernel_size, layer.stride, layer.padding,
                         groups=CHANNELS)
  with torch.no_grad():
    # nnx (kh, kw, 1, C) <- torch (C, 1, kh, kw).
    conv.weight.copy_(torch.from_numpy(np.array(layer.kernel[...]).transpose(3, 2, 0, 1)))
    conv.bias.copy_(torch.from_numpy(np.array(layer.bias[...])))
  x_t = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()).requires_grad_(True)
  y = conv(x_t)
  y.backward(torch.from_numpy(np.asarray(cotangent).transpose(0, 3, 1, 2).copy()))
  return (y.detach().numpy().transpose(0, 2, 3, 1), x_t.grad.numpy().transpose(0, 2, 3, 1),
          conv.weight.grad.numpy().transpose(2, 3, 1, 0), conv.bias.grad.numpy())


@pytest.mark.parametrize("kernel,stride,padding,height,width", CASES)
def test_matches_nnx_grouped_conv_and_torch(kernel, stride, padding, height, width):
  layers = make_layers(kernel, stride, padding)
  x = np.random.default_rng(0).standard_normal((2, height, width, CHANNELS), np.float32)
  results = values_and_grads(layers, x, jax.random.key(3))
  y_shape = results["nnx.Conv"][0].shape
  results["torch"] = torch_values_and_grads(
      layers["shifted"], x, jax.random.normal(jax.random.key(3), y_shape))
  for implementation in ("shifted", "grouped"):
    for reference in ("nnx.Conv", "torch"):
      ours, theirs = results[implementation], results[reference]
      assert ours[0].shape == theirs[0].shape == y_shape
      for name, a, b in zip(("output", "dx", "dkernel", "dbias"), ours, theirs):
        assert rel_err(a, b) <= RTOL, (
            f"{implementation} vs {reference}, {name}: {rel_err(a, b):.2e}")


def test_second_order_gradient_matches_grouped():
  # The custom VJP's backward is itself differentiable: reverse over reverse works.
  x = jax.random.normal(jax.random.key(0), (2, 9, 8, CHANNELS))
  w = jax.random.normal(jax.random.key(1), (3, 3, 1, CHANNELS))

  def grad_norm(impl):
    def f(x, w):
      inner = jax.grad(lambda x, w: jnp.sum(
          jnp.sin(depthwise.depthwise_conv(x, w, 2, 1, impl))), argnums=(0, 1))(x, w)
      return sum(jnp.sum(g ** 2) for g in inner)
    return jax.jit(jax.grad(f, argnums=(0, 1)))(x, w)

  for a, b in zip(grad_norm("shifted"), grad_norm("grouped")):
    assert rel_err(a, b) <= RTOL


def test_kernel_gradient_over_batch_chunks(monkeypatch):
  # Large layers sum the kernel gradient chunk by chunk of the batch (a lax.scan); small
  # test inputs fit one chunk, so force one image per chunk.
  monkeypatch.setattr(depthwise, "_KERNEL_GRAD_CHUNK_BYTES", 1)
  x = jax.random.normal(jax.random.key(0), (2, 9, 8, CHANNELS))
  w = jax.random.normal(jax.random.key(1), (3, 3, 1, CHANNELS))

  def grads(impl):
    loss = lambda x, w: jnp.sum(jnp.sin(depthwise.depthwise_conv(x, w, 2, 1, impl)))
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)

  lowered = jax.jit(lambda x, g: depthwise._kernel_grad(  # pylint: disable=protected-access
      x, g, 3, 3, 2, 1)).lower(x, jnp.ones((2, 5, 4, CHANNELS))).as_text()
  assert "while" in lowered  # The scan is there.
  for a, b in zip(grads("shifted"), grads("grouped")):
    assert rel_err(a, b) <= RTOL


def test_parameter_layout_equals_nnx_conv():
  dw = DepthwiseConv(24, 5, 2, use_bias=True, rngs=nnx.Rngs(0))
  conv = nnx.Conv(24, 24, (5, 5), strides=2, padding=((2, 2), (2, 2)), feature_group_count=24,
                  use_bias=True, rngs=nnx.Rngs(0))

  def layout(module):
    return {path: (v.shape, v.dtype)
            for path, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}

  assert layout(dw) == layout(conv) == {
      ("bias",): ((24,), jnp.float32), ("kernel",): ((5, 5, 1, 24), jnp.float32)}
  assert layout(DepthwiseConv(24, 3, rngs=nnx.Rngs(0))) == {
      ("kernel",): ((3, 3, 1, 24), jnp.float32)}


def test_default_padding_is_torch_same_padding():
  assert DepthwiseConv(4, 3, rngs=nnx.Rngs(0)).padding == 1
  assert DepthwiseConv(4, 5, 2, rngs=nnx.Rngs(0)).padding == 2
  assert DepthwiseConv(4, 5, 2, 0, rngs=nnx.Rngs(0)).padding == 0


def test_init_is_torchvision_kaiming_normal_fan_out():
  channels, k = 512, 3
  kernel = np.asarray(DepthwiseConv(channels, k, rngs=nnx.Rngs(0)).kernel[...])
  weight = torch.empty(channels, 1, k, k)
  torch.nn.init.kaiming_normal_(weight, mode="fan_out")  # What torchvision does.
  _, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(weight)  # pylint: disable=protected-access
  expected_std = np.sqrt(2.0 / fan_out)
  assert fan_out == channels * k * k
  assert abs(kernel.std() / expected_std - 1) < 0.05
  assert abs(weight.std().item() / expected_std - 1) < 0.05
  assert abs(kernel.mean()) < 0.1 * expected_std
  # Untruncated like torch: a normal sample of 4608 values has some beyond 2 std.
  assert np.abs(kernel).max() > 2.5 * expected_std


def test_auto_is_shifted_on_cpu():
  assert jax.default_backend() == "cpu"
  assert depthwise.resolve_implementation("auto") == "shifted"
  x = jnp.ones((1, 8, 8, 4))
  w = jnp.ones((3, 3, 1, 4))
  auto = str(jax.make_jaxpr(lambda x, w: depthwise.depthwise_conv(x, w, 1, 1))(x, w))
  grouped = str(jax.make_jaxpr(
      lambda x, w: depthwise.depthwise_conv(x, w, 1, 1, "grouped"))(x, w))
  assert "conv_general_dilated" not in auto and "custom_vjp" in auto
  assert "conv_general_dilated" in grouped


def test_implementation_can_be_switched_on_a_built_module():
  dw = DepthwiseConv(4, 3, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (1, 6, 6, 4))
  shifted = dw(x)
  dw.implementation = "grouped"
  assert rel_err(dw(x), shifted) <= RTOL


def test_jit_and_nnx_grad_through_module():
  dw = DepthwiseConv(CHANNELS, 3, 2, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, CHANNELS))

  @nnx.jit
  def grads(module, x):
    return nnx.grad(lambda m: jnp.sum(m(x) ** 2))(module)

  g = grads(dw, x)
  dw.implementation = "grouped"
  reference = grads(dw, x)
  assert rel_err(g["kernel"][...], reference["kernel"][...]) <= RTOL


def test_mixed_precision_input_promotes_like_nnx_conv():
  layers = make_layers(3, 1, None)
  x = jax.random.normal(jax.random.key(0), (1, 6, 6, CHANNELS)).astype(jnp.bfloat16)
  y, reference = layers["shifted"](x), layers["nnx.Conv"](x)
  assert y.dtype == reference.dtype == jnp.float32
  assert rel_err(y, reference) <= RTOL


@pytest.mark.parametrize("implementation", ["shifted", "grouped"])
def test_bfloat16_dtype_computes_in_bfloat16_and_keeps_float32_parameters(implementation):
  # bfloat16 keeps 8 significant bits (relative rounding up to 2^-9 per value): the output and
  # the kernel gradient measured 2.6e-3 to 4.3e-3 from float32 here (stride 2, batch 4 of
  # 16x16); 1e-2 leaves margin. The kernel gradient, a sum over batch and map, is accumulated
  # in float32 (without that the shifted path's row sums in bfloat16 drift further).
  x = jax.random.normal(jax.random.key(1), (4, 16, 16, CHANNELS))
  half = DepthwiseConv(CHANNELS, 3, 2, implementation=implementation, dtype=jnp.bfloat16,
                       rngs=nnx.Rngs(0))
  full = DepthwiseConv(CHANNELS, 3, 2, implementation="grouped", rngs=nnx.Rngs(0))
  assert half.kernel[...].dtype == jnp.float32
  forward = nnx.jit(lambda layer, x: layer(x))
  kernel_grad = nnx.jit(nnx.grad(lambda layer, x: jnp.sum(jnp.sin(layer(x).astype(jnp.float32)))))
  y = forward(half, x)
  assert y.dtype == jnp.bfloat16
  assert rel_err(y.astype(jnp.float32), forward(full, x)) <= 1e-2
  grad = kernel_grad(half, x).kernel[...]
  assert grad.dtype == jnp.float32
  assert rel_err(grad, kernel_grad(full, x).kernel[...]) <= 1e-2


def test_rejects_bad_arguments():
  with pytest.raises(ValueError, match="unknown depthwise implementation"):
    DepthwiseConv(4, 3, implementation="fast", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="expected 4 input channels"):
    DepthwiseConv(4, 3, rngs=nnx.Rngs(0))(jnp.ones((1, 5, 5, 3)))
