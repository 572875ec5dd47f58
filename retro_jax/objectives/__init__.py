"""Training objectives: the math only, one module per method.

Each module gives a frozen `Config` of hyperparameters (defaults from the reference recipes),
the extra state it keeps as a plain pytree (`init_state`), and a pure

    loss(state, <model outputs>, ..., *, config) -> (loss, metrics, new_state)

to be differentiated with `jax.value_and_grad(..., has_aux=True)`. Nothing here knows about
devices, optimisers or checkpoints; batches are global arrays (sharded or not, same numbers).

  contrastive  L2 normalisation, MoCo InfoNCE with a queue, queue update, EMA helpers
  mocov2       MoCo-v2 (student alone)                    state: queue
  disco        MoCo-v2 + consistency to a frozen teacher   state: queue
  retro        DisCo's loss through the teacher's frozen head (`frozen_head_apply`); queue
  dino         DINO (centring, sharpening, temperature warm-up, cross-view pairs); centre
  rob_dino     RoB-DINO: frozen DINO teacher, same-view pairing     state: none
  rob_msn      RoB-MSN: frozen MSN teacher's prototype probabilities; state: none
  rob_ibot     RoB-iBOT: frozen iBOT teacher's CLS and masked-patch targets; state: centres
  rob_swav     RoB-SwAV: Sinkhorn codes of a frozen SwAV teacher, swapped prediction; none
"""

from retro_jax.objectives import contrastive
from retro_jax.objectives import dino
from retro_jax.objectives import disco
from retro_jax.objectives import mocov2
from retro_jax.objectives import retro
from retro_jax.objectives import rob_dino
from retro_jax.objectives import rob_ibot
from retro_jax.objectives import rob_msn
from retro_jax.objectives import rob_swav

__all__ = ["contrastive", "dino", "disco", "mocov2", "retro", "rob_dino", "rob_ibot", "rob_msn",
           "rob_swav"]
