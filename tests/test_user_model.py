"""A model of the user's own, built from `eqxlm.nn` parts in this file (no change to the
package): it implements `eqxlm.AbstractCausalLM`, registers its own `model_type`, and then
`generate`, `shard`, a training step and `save_pretrained`/`from_pretrained` all work on it.

The architecture: ALiBi attention with per-head RMSNorm on queries and keys, a plain ReLU
MLP, a parallel residual, learned-free positions, a tied head. Its checkpoint names its
projections differently (`attn.wq` ...), through its own key map.
"""

import dataclasses
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqxlm
from eqxlm import inspect, nn
from eqxlm.params import KeyMap


@dataclasses.dataclass(frozen=True, kw_only=True)
class ToyConfig(eqxlm.BaseConfig):
    model_type: ClassVar[str] = "toy-alibi"
    architecture: ClassVar[str] = "ToyForCausalLM"
    hf_fields: ClassVar[dict[str, str]] = {
        n: n
        for n in ("vocab_size", "hidden_size", "num_layers", "num_heads", "tie_word_embeddings", "bos_token_id", "eos_token_id")
    }
    vocab_size: int = 48
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 4
    tie_word_embeddings: bool = True

    def key_map(self):
        return KeyMap(renames=((r"self_attn\.([qkvo])_proj", r"attn.w\1"),))


class ToyBackbone(eqx.Module):
    embed_tokens: eqx.nn.Embedding
    layers: tuple[nn.ParallelLayer, ...]
    norm: nn.RMSNorm

    def __call__(
        self, input_ids, attention_mask=None, positions=None, cache=None, *, output_hidden_states=False, output_attentions=False
    ):
        valid = jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask.astype(bool)
        start = 0 if cache is None else cache.next_position
        positions = jnp.where(valid, start + jnp.cumsum(valid) - 1, 0).astype(jnp.int32)
        x = self.embed_tokens.weight[input_ids]
        (frame,), cache = nn.attention_frames((None,), positions, valid, cache)
        new_layers = []
        for i, layer in enumerate(self.layers):
            x, _, layer_cache = layer(x, frame, None if cache is None else cache.layers[i])
            new_layers.append(layer_cache)
        x = jax.vmap(self.norm)(x)
        new_cache = None if cache is None else eqx.tree_at(lambda c: c.layers, cache, tuple(new_layers))
        return eqxlm.ModelOutput(last_hidden_state=x, cache=new_cache)


class TiedToyHead:
    """The toy models' `base_model` (their `model`) and tied head."""

    @property
    def base_model(self):
        return self.model

    def logits(self, hidden):
        return hidden @ self.model.embed_tokens.weight.T


class ToyLM(TiedToyHead, eqxlm.AbstractCausalLM):
    model: ToyBackbone
    config: ToyConfig = eqx.field(static=True)
    generation_config: eqxlm.GenerationConfig | None = eqx.field(static=True, default=None)
    remat_types: ClassVar[tuple[type, ...]] = (nn.AbstractDecoderLayer,)

    def __init__(self, config, *, key, dtype=jnp.float32, generation_config=None):
        d, h = config.hidden_size, config.num_heads
        keys = jax.random.split(key, config.num_layers + 1)

        def layer(k):
            k1, k2 = jax.random.split(k)
            attn = nn.Attention(
                d,
                h,
                position_scheme=nn.ALiBi(h),
                qk_norm="head",
                make_norm=lambda n: nn.RMSNorm(n, 1e-5, dtype=dtype),
                dtype=dtype,
                key=k1,
            )
            mlp = nn.MLP(d, 2 * d, activation=jax.nn.relu, dtype=dtype, key=k2)
            return nn.Parallel(norms=1).make(attn, mlp, lambda: nn.RMSNorm(d, 1e-5, dtype=dtype))

        embed = eqx.nn.Embedding(config.vocab_size, d, dtype=dtype, key=keys[0])
        self.model = ToyBackbone(embed, tuple(layer(k) for k in keys[1:]), nn.RMSNorm(d, 1e-5, dtype=dtype))
        self.config = config
        self.generation_config = generation_config

    def init_cache(self, max_length, *, dtype=None):
        dtype = dtype or self.model.embed_tokens.weight.dtype
        head_dim = self.config.hidden_size // self.config.num_heads
        layers = tuple(nn.KVCache.init(max_length, self.config.num_heads, head_dim, dtype=dtype) for _ in self.model.layers)
        zero = jnp.zeros((), jnp.int32)
        return nn.Cache(layers=layers, tables=(nn.SlotTable.init(max_length),), end=zero, next_position=zero, windows=(None,))

    def key_map(self):
        return self.config.key_map()


eqxlm.register(ToyConfig, ToyLM)


@pytest.fixture(scope="module")
def toy():
    return ToyLM(ToyConfig(), key=jax.random.key(0))


# jitted: eager op-by-op dispatch of a model is several times slower for one-off calls
logits_of = eqx.filter_jit(lambda model, ids: model(ids).logits)


def test_generate_with_cache_equals_argmax_over_full_forwards(toy):
    ids = np.array([[5, 9, 3, 17, 2]])
    tokens = np.asarray(eqxlm.generate(toy, ids, max_new_tokens=6, eos_token_id=[]))
    seq = np.zeros(11, np.int32)
    seq[:5] = ids[0]
    for n in range(5, 11):  # causal: the logits at n - 1 see only seq[:n] (the zeros after are never seen)
        seq[n] = int(jnp.argmax(logits_of(toy, jnp.asarray(seq))[n - 1]))
    assert tokens[0].tolist() == seq.tolist()


def test_save_and_load_through_the_registry(toy, tmp_path):
    folder = eqxlm.save_pretrained(toy, tmp_path / "toy")
    names = set(eqxlm.hf_state_dict(toy))
    assert "model.layers.0.attn.wq.weight" in names and "model.layers.1.self_attn.q_norm.weight" in names
    again = eqxlm.from_pretrained(folder)
    assert isinstance(again, ToyLM) and again.config == toy.config
    ids = jnp.arange(7, dtype=jnp.int32)
    np.testing.assert_array_equal(np.asarray(again(ids).logits), np.asarray(toy(ids).logits))
    assert "toy-alibi" in eqxlm.supported_model_types()


def test_shard_and_train_step(toy):
    mesh = eqxlm.sharding.make_mesh((1,), ("data",))
    sharded = eqxlm.shard(toy, mesh)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 48, size=(4, 10)), jnp.int32)
    optimizer = optax.adam(1e-2)
    with jax.numpy_dtype_promotion("standard"):
        state = optimizer.init(eqx.filter(sharded, eqx.is_array))
    model, state, first = eqxlm.training.train_step(sharded, state, ids, optimizer=optimizer, mesh=mesh)
    for _ in range(5):
        model, state, loss = eqxlm.training.train_step(model, state, ids, optimizer=optimizer, mesh=mesh)
    assert float(loss) < float(first)
    remat = eqxlm.training.remat_layers(toy)
    loss = eqx.filter_jit(eqxlm.training.batch_loss)
    a, b = loss(toy, ids), loss(remat, ids)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)


# -- a part with a per-layer scalar parameter and an inspect point, scanned -----------------
class GainMLP(nn.AbstractSequenceWise, nn.AbstractTapped):
    """A residual ReLU MLP whose branch is multiplied by a learned per-layer scalar `gain`
    (shape `()`): stacked over the layers it is a vector, one entry per checkpoint tensor.
    It takes the whole sequence, and offers its scaled branch to `eqxlm.inspect` as `branch`."""

    mlp: nn.MLP
    gain: jax.Array
    tap_points: ClassVar[tuple[str, ...]] = ("branch",)

    def __call__(self, x, *, taps=None):
        return x + nn.tap(taps, "branch", self.gain * jax.vmap(self.mlp)(x))


@dataclasses.dataclass(frozen=True, kw_only=True)
class GainConfig(eqxlm.BaseConfig):
    model_type: ClassVar[str] = "toy-gain"
    architecture: ClassVar[str] = "ToyGainForCausalLM"
    hf_fields: ClassVar[dict[str, str]] = {n: n for n in ("vocab_size", "hidden_size", "num_layers", "tie_word_embeddings")}
    vocab_size: int = 48
    hidden_size: int = 16
    num_layers: int = 3
    tie_word_embeddings: bool = True


class GainBackbone(eqx.Module):
    embed_tokens: eqx.nn.Embedding
    layers: tuple[GainMLP, ...] | nn.LayerStack

    def __call__(
        self, input_ids, attention_mask=None, positions=None, cache=None, *, output_hidden_states=False, output_attentions=False
    ):
        x = self.embed_tokens.weight[input_ids]
        x, _, _, _ = nn.run_layers(self.layers, x, lambda layer, x, c: (layer(x), None, c), None, collect=False)
        return eqxlm.ModelOutput(last_hidden_state=x)


class GainLM(TiedToyHead, eqxlm.AbstractCausalLM):
    model: GainBackbone
    config: GainConfig = eqx.field(static=True)
    generation_config: eqxlm.GenerationConfig | None = eqx.field(static=True, default=None)

    def __init__(self, config, *, key, dtype=jnp.float32, generation_config=None, scan_layers=False):
        d = config.hidden_size
        k_embed, *keys = jax.random.split(key, config.num_layers + 1)

        def layer(i, k):
            mlp = nn.MLP(d, 2 * d, activation=jax.nn.relu, dtype=dtype, key=k)
            return GainMLP(mlp, jnp.asarray(1.0 + 0.25 * i, dtype))

        layers = nn.LayerStack.build(layer, keys) if scan_layers else tuple(layer(i, k) for i, k in enumerate(keys))
        self.model = GainBackbone(eqx.nn.Embedding(config.vocab_size, d, dtype=dtype, key=k_embed), layers)
        self.config = config
        self.generation_config = generation_config

    def init_cache(self, max_length, *, dtype=None):
        raise NotImplementedError


eqxlm.register(GainConfig, GainLM)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_per_layer_scalar_parameter_saves_and_loads_in_both_layouts(scan_layers, tmp_path):
    model = GainLM(GainConfig(), key=jax.random.key(1))
    folder = eqxlm.save_pretrained(model, tmp_path / "gain")
    names = eqxlm.hf_state_dict(model)
    assert names["model.layers.2.gain"].shape == () and float(names["model.layers.2.gain"]) == 1.5
    again = eqxlm.from_pretrained(folder, scan_layers=scan_layers)
    assert isinstance(again.model.layers, nn.LayerStack) == scan_layers
    for name, value in eqxlm.hf_state_dict(again).items():
        np.testing.assert_array_equal(value, names[name], err_msg=name)
    ids = jnp.arange(7, dtype=jnp.int32)
    np.testing.assert_allclose(np.asarray(logits_of(again, ids)), np.asarray(logits_of(model, ids)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_a_users_part_declares_a_point_that_inspect_captures_and_patches(scan_layers):
    unrolled = GainLM(GainConfig(), key=jax.random.key(1))
    model = eqxlm.scan_layers(unrolled) if scan_layers else unrolled  # (`build` would give every layer gain 1)
    assert isinstance(model.model.layers, nn.LayerStack) == scan_layers
    assert {"model.layers.1", "model.layers.1.branch", "model.layers.1.mlp.up_proj"} <= set(inspect.hook_names(model))
    ids = jnp.arange(7, dtype=jnp.int32)

    def by_hand(branch_1=None):  # the layers written out: x + gain * mlp(x)
        x, branches, outputs = model.model.embed_tokens.weight[ids], [], []
        for i, layer in enumerate(unrolled.model.layers):
            branches.append(layer.gain * jax.vmap(layer.mlp)(x) if i != 1 or branch_1 is None else branch_1)
            x = x + branches[-1]
            outputs.append(x)
        return x @ model.model.embed_tokens.weight.T, branches, outputs

    logits, branches, outputs = by_hand()
    hooked = inspect.capture(model, ["model.layers.1.branch", "model.layers.2.branch", "model.layers.1"])
    out, acts = eqx.filter_jit(inspect.run)(hooked, ids)
    wanted = {"model.layers.1.branch": branches[1], "model.layers.2.branch": branches[2], "model.layers.1": outputs[1]}
    for name, want in wanted.items():
        np.testing.assert_allclose(np.asarray(acts[name]), np.asarray(want), rtol=1e-6, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(logits), rtol=1e-5, atol=1e-5)

    value = jnp.asarray(np.random.default_rng(0).normal(size=(7, 16)), jnp.float32)
    patched = inspect.patch(model, "model.layers.1.branch", value=value)
    np.testing.assert_allclose(np.asarray(logits_of(patched, ids)), np.asarray(by_hand(value)[0]), rtol=1e-5, atol=1e-5)
    doubled = inspect.patch(model, "model.layers.1.branch", fn=lambda b: 2 * b)
    np.testing.assert_allclose(np.asarray(logits_of(doubled, ids)), np.asarray(by_hand(2 * branches[1])[0]), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(logits_of(patched, ids)), np.asarray(logits), atol=1e-3)
