"""Position-wise feed-forward blocks: gated (SwiGLU / GeGLU) and plain two-layer MLPs."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._typing import typecheck
from ._activations import gelu_tanh, silu
from ._kinds import AbstractTokenAxes
from ._linear import make_linear, project


class GatedMLP(AbstractTokenAxes):
    r"""The gated feed-forward block (Llama, Mistral, Qwen, Gemma: SwiGLU / GeGLU).

    $$\mathrm{mlp}(x) = W_{down}\,\big(\mathrm{act}(W_{gate} x) \odot W_{up} x\big)$$

    Mirrors `LlamaMLP`. Checkpoints that fuse `gate_up_proj` (Phi-3) are split on import
    by their family's key map. Takes one token or any leading token axes (a sequence runs as
    three matrix products, not one per token).
    """

    gate_proj: eqx.nn.Linear
    up_proj: eqx.nn.Linear
    down_proj: eqx.nn.Linear
    activation: Callable = eqx.field(static=True)

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        *,
        use_bias: bool = False,
        activation: Callable = silu,
        dtype=jnp.float32,
        key: PRNGKeyArray,
    ):
        """**Arguments:** `hidden_size`, `intermediate_size`, `use_bias`, `activation`
        (default SiLU, HF `hidden_act="silu"`), `dtype`, `key`."""
        k1, k2, k3 = jax.random.split(key, 3)
        self.gate_proj = make_linear(hidden_size, intermediate_size, use_bias, dtype, k1)
        self.up_proj = make_linear(hidden_size, intermediate_size, use_bias, dtype, k2)
        self.down_proj = make_linear(intermediate_size, hidden_size, use_bias, dtype, k3)
        self.activation = activation

    @typecheck
    def __call__(self, x: Float[Array, "*tokens hidden"]) -> Float[Array, "*tokens hidden"]:
        return project(self.down_proj, self.activation(project(self.gate_proj, x)) * project(self.up_proj, x))


class MLP(AbstractTokenAxes):
    r"""The plain two-layer feed-forward block: $W_{down}\,\mathrm{act}(W_{up} x + b) + b$.

    BLOOM (`dense_h_to_4h`/`dense_4h_to_h`), GPT-2 (`c_fc`/`c_proj`), GPT-NeoX, Phi and
    StarCoder2 (`fc1`/`fc2`, `c_fc`/`c_proj`) all compute this; their key maps rename the
    projections to `up_proj`/`down_proj`. One token or any leading token axes.
    """

    up_proj: eqx.nn.Linear
    down_proj: eqx.nn.Linear
    activation: Callable = eqx.field(static=True)

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        *,
        use_bias: bool = True,
        activation: Callable = gelu_tanh,
        dtype=jnp.float32,
        key: PRNGKeyArray,
    ):
        """**Arguments:** `hidden_size`, `intermediate_size`, `use_bias`, `activation`, `dtype`, `key`."""
        k1, k2 = jax.random.split(key)
        self.up_proj = make_linear(hidden_size, intermediate_size, use_bias, dtype, k1)
        self.down_proj = make_linear(intermediate_size, hidden_size, use_bias, dtype, k2)
        self.activation = activation

    @typecheck
    def __call__(self, x: Float[Array, "*tokens hidden"]) -> Float[Array, "*tokens hidden"]:
        return project(self.down_proj, self.activation(project(self.up_proj, x)))
