"""What a part declares about itself, by subclassing the bases of `eqxlm.nn._kinds`, and what
the tools do with each declaration, on parts written here (outside the package): how it is
called on a sequence, how its parameters and module paths are named, which inspect points it
offers."""

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqxlm
from eqxlm import inspect, nn
from eqxlm.module_paths import module_paths

HIDDEN = 4


class Rank(eqx.Module):
    """Returns the rank of the input it was called with, in every entry: 1 per token, 2 for a sequence."""

    def __call__(self, x):
        return jnp.full(x.shape, x.ndim, x.dtype)


class SequenceRank(Rank, nn.AbstractSequenceWise):
    pass


class TokenAxesRank(Rank, nn.AbstractTokenAxes):
    pass


@pytest.mark.parametrize(("part", "rank"), [(Rank(), 1), (SequenceRank(), 2), (TokenAxesRank(), 2)])
def test_a_part_is_called_per_token_unless_it_declares_it_takes_the_sequence_or_any_token_axes(part, rank):
    x = jnp.ones((3, HIDDEN))
    assert (nn.feed_forward(part, x) == rank).all()
    assert (nn.project(part, x) == rank).all()
    assert (nn.project(part, jnp.ones((2, 3, HIDDEN))) == {1: 1, 2: 3}[rank]).all()  # any leading axes


def test_a_hook_calls_a_sequence_wise_part_once_and_others_per_token():
    class Block(eqx.Module):
        per_token: Rank
        whole: SequenceRank

        def __call__(self, x):
            return nn.feed_forward(self.per_token, x) + 10 * nn.feed_forward(self.whole, x)

    out, acts = inspect.run(inspect.capture(Block(Rank(), SequenceRank()), ["per_token", "whole"]), jnp.ones((3, HIDDEN)))
    assert (acts["per_token"] == 1).all() and (acts["whole"] == 2).all() and (out == 21).all()


class Linear(eqx.Module):
    weight: jax.Array

    def __call__(self, x):  # one token or a sequence
        return x @ self.weight.T


class Wrapped(nn.AbstractTransparent):
    """A wrapper that doubles its layer's output, invisible in names."""

    inner: Linear
    transparent_field: ClassVar[str] = "inner"

    def __call__(self, x):
        return 2 * self.inner(x)


class Visible(eqx.Module):  # the same wrapper, undeclared: a module of its own in the names
    inner: Linear

    def __call__(self, x):
        return 2 * self.inner(x)


class Net(eqx.Module):
    proj: eqx.Module

    def __call__(self, x):
        return self.proj(x)


class TokenNet(Net):
    def __call__(self, x):
        return nn.feed_forward(self.proj, x)


def test_a_transparent_wrapper_is_not_part_of_names_and_an_undeclared_one_is():
    weight = jnp.arange(HIDDEN * HIDDEN, dtype=jnp.float32).reshape(HIDDEN, HIDDEN)
    plain, wrapped, visible = Net(Linear(weight)), Net(Wrapped(Linear(weight))), Net(Visible(Linear(weight)))
    assert list(eqxlm.state_dict(wrapped)) == list(eqxlm.state_dict(plain)) == ["proj.weight"]
    assert list(eqxlm.state_dict(visible)) == ["proj.inner.weight"]
    assert set(module_paths(wrapped)) == {"", "proj"} and isinstance(module_paths(wrapped)["proj"], Linear)
    assert set(module_paths(visible)) == {"", "proj", "proj.inner"}
    x = jnp.ones((3, HIDDEN))
    out, acts = inspect.run(inspect.capture(wrapped, ["proj", "proj:input"]), x)  # the wrapper's output and input
    np.testing.assert_array_equal(np.asarray(acts["proj"]), 2 * np.asarray(x @ weight.T))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(acts["proj"]))
    np.testing.assert_array_equal(np.asarray(acts["proj:input"]), np.asarray(x))


def test_a_transparent_wrapper_or_a_stack_must_name_its_field():
    class NoField(nn.AbstractTransparent):
        inner: Linear

    class NoStackField(nn.AbstractStacked):
        copies: Linear

    for cls in (NoField, NoStackField):
        with pytest.raises(TypeError, match="abstract class attributes"):
            cls(Linear(jnp.zeros((2, 2))))


class Ensemble(nn.AbstractStacked):
    """Several linear maps stacked along a leading axis, averaged."""

    copies: Linear
    stacked_field: ClassVar[str] = "copies"

    def __call__(self, x):
        return jnp.mean(jax.vmap(lambda c: c(x))(self.copies), axis=0)


class Unstacked(eqx.Module):  # the same, undeclared: one tensor with a leading axis
    copies: Linear


def test_a_stack_is_named_one_tensor_per_copy_and_an_undeclared_one_as_one_tensor():
    weights = jnp.arange(3 * HIDDEN * HIDDEN, dtype=jnp.float32).reshape(3, HIDDEN, HIDDEN)
    names = eqxlm.state_dict(Net(Ensemble(Linear(weights))))
    assert list(names) == [f"proj.copies.{e}.weight" for e in range(3)]
    np.testing.assert_array_equal(np.asarray(names["proj.copies.2.weight"]), np.asarray(weights[2]))
    assert {k: v.shape for k, v in eqxlm.state_dict(Net(Unstacked(Linear(weights)))).items()} == {
        "proj.copies.weight": (3, HIDDEN, HIDDEN)
    }


class Squash(nn.AbstractTapped):
    """`tanh(W x)` of one token, offering `W x` to `eqxlm.inspect` as `pre`."""

    linear: Linear
    tap_points: ClassVar[tuple[str, ...]] = ("pre",)

    def __call__(self, x, *, taps=None):
        assert x.ndim == 1, "called one token at a time"
        return jnp.tanh(nn.tap(taps, "pre", self.linear(x)))


def test_a_per_token_part_declares_points_captured_and_patched_per_token():
    weight = jax.random.normal(jax.random.key(0), (HIDDEN, HIDDEN))
    model, x = TokenNet(Squash(Linear(weight))), jax.random.normal(jax.random.key(1), (5, HIDDEN))
    assert inspect.hook_names(model) == ["proj", "proj.pre", "proj.linear"]
    pre = x @ weight.T
    out, acts = inspect.run(inspect.capture(model, ["proj.pre", "proj"]), x)
    np.testing.assert_allclose(np.asarray(acts["proj.pre"]), np.asarray(pre), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(acts["proj"]), np.asarray(jnp.tanh(pre)), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(model(x)))
    bias = jnp.arange(HIDDEN, dtype=jnp.float32)  # one token's shape: added at every token
    patched = inspect.patch(model, "proj.pre", add=bias)
    np.testing.assert_allclose(np.asarray(patched(x)), np.asarray(jnp.tanh(pre + bias[None])), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"'pre' is a point of a Squash, and proj.linear is a Linear"):
        inspect.capture(model, "proj.linear.pre")
