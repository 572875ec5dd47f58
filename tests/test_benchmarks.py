"""The PyTorch reference step of benchmarks/retro_step.py computes the authors' loss.

On a tiny batch, one step's loss must equal a NumPy evaluation of the authors' objective from
embeddings computed independently of the reference's forward (the student, adapter, heads and
teacher called directly): InfoNCE against the queue as it was, plus for retro and disco the
summed squared errors, retro's second term pairing student(view 1) with teacher(view 2) and
DisCo's student(view 2) with teacher(view 2). The frozen parts must not move.
"""

from __future__ import annotations

import copy
import importlib.util
import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "retro_step.py"


def _module():
  spec = importlib.util.spec_from_file_location("retro_step", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _log_softmax_first(logits: np.ndarray) -> np.ndarray:
  top = logits.max(axis=1, keepdims=True)
  return logits[:, 0] - (top[:, 0] + np.log(np.exp(logits - top).sum(axis=1)))


@pytest.fixture
def one_torch_thread():
  """One thread: small ops, and a shared CPU makes torch's spinning thread team ~10x slower."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.mark.parametrize("method", ["retro", "disco", "mocov2"])
def test_reference_step_loss_matches_numpy(method, one_torch_thread):
  del one_torch_thread
  rs = _module()
  torch.manual_seed(0)
  model, optimizer = rs.make_reference(method, "resnet18", 4)
  im_q, im_k = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
  before = copy.deepcopy(model)
  queue = model.queue.double().numpy().copy()

  loss = rs.reference_step(model, optimizer, method, "resnet18", im_q, im_k)["loss"]

  normalize = torch.nn.functional.normalize
  with torch.no_grad():  # train mode: batch statistics, as in the step
    student = before.encoder_q
    if method == "retro":  # timm ResNet-18's layer4 map -> adapter -> pool -> teacher's head
      embed = lambda x: student.fc(student.transfer(student.forward_features(x)).mean((2, 3)))
    else:  # the student's own head
      embed = student
    s1, s2 = (normalize(embed(x), dim=1).double().numpy() for x in (im_q, im_k))
    # The key encoder starts as a copy of the student, so its keys are s2.
    if method != "mocov2":
      t1, t2 = (normalize(before.teacher_encoder_q(x), dim=1).double().numpy()
                for x in (im_q, im_k))
  logits = np.concatenate([(s1 * s2).sum(1, keepdims=True), s1 @ queue], axis=1) / 0.2
  info_nce = -_log_softmax_first(logits).mean()
  if method == "mocov2":
    expected = info_nce
  else:
    cross = info_nce + ((t1 - s1) ** 2).sum() + ((t2 - s1) ** 2).sum()
    same = info_nce + ((t1 - s1) ** 2).sum() + ((t2 - s2) ** 2).sum()
    expected, other = (cross, same) if method == "retro" else (same, cross)
    assert abs(other - expected) > 1e-2  # the pairing is what the check tells apart
  np.testing.assert_allclose(loss, expected, rtol=1e-4)
  np.testing.assert_allclose(model.queue[:, :4].T.double().numpy(), s2, atol=1e-4)

  # The teacher (and with it retro's head) is frozen; what trains moved. Retro's head moves by
  # rounding only: it is also both encoders' classifier, so the momentum update rewrites it
  # as x * m + x * (1 - m), as in the authors' code.
  if method != "mocov2":
    for old, new in zip(before.teacher_encoder_q.parameters(),
                        model.teacher_encoder_q.parameters()):
      torch.testing.assert_close(new, old, rtol=1e-6, atol=0)
  moved = model.encoder_q.transfer if method == "retro" else model.encoder_q
  old = dict(before.encoder_q.named_parameters())
  assert any(not torch.equal(old[f"transfer.{n}" if method == "retro" else n], p)
             for n, p in moved.named_parameters())
