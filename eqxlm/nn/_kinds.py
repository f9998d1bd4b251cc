"""What a part declares about itself to the tools, by subclassing: how it is called on a
sequence (`eqxlm.nn.feed_forward`, `eqxlm.inspect`), how its parameters are named
(`eqxlm.params`, `eqxlm.module_paths`) and which internal points `eqxlm.inspect` offers.

Every declaration is an abstract base with no fields, read with `isinstance`, so a part of
the user's own declares the same things the parts of eqxlm do:

    class MyMoE(eqxlm.nn.AbstractSequenceWise, eqxlm.nn.AbstractStacked):
        experts: eqxlm.nn.GatedMLP        # arrays with a leading experts axis
        stacked_field: ClassVar[str] = "experts"
"""

import equinox as eqx


class AbstractSequenceWise(eqx.Module):
    """A module whose `__call__` takes the whole sequence `(seq, hidden)` and must be called
    once on it, never one token at a time: a mixture of experts (it groups the tokens by
    expert), an `eqxlm.inspect.Hook` (it captures and patches the whole block).

    Where a module would otherwise be applied to every token (`eqxlm.nn.feed_forward`, a
    norm's place in a decoder layer, a projection through `eqxlm.nn.project`), a subclass of
    this is called once on all of `x`. As a decoder layer's `mlp`, `eqxlm.inspect` hooks it
    whole (and its declared points), not the modules inside it, which do not run one token at
    a time.
    """


class AbstractTokenAxes(eqx.Module):
    """A module that acts on every token independently and whose `__call__` takes one token
    `(hidden,)` or any leading token axes `(*tokens, hidden)` itself: `eqxlm.nn.GatedMLP`,
    `eqxlm.nn.MLP` and a LoRA adapter, which run a sequence as a few large matrix products.

    Where a module would otherwise be vmapped over every token (`eqxlm.nn.feed_forward`,
    `eqxlm.nn.project`), a subclass of this is called once on all of `x`; the result must
    be the same as token by token. Unlike [`AbstractSequenceWise`][], the modules inside
    stay per-token: an `eqxlm.inspect` hook on one of them runs its parent token by token.
    """


class AbstractTransparent(eqx.Module):
    """A wrapper that adds behaviour around the module in its field `transparent_field` and is
    not part of any name: parameter names (`eqxlm.params`) and module paths
    (`eqxlm.inspect`, `eqxlm.lora`) name what it wraps, so a wrapped model saves, loads and
    is hooked as the unwrapped one. `eqxlm.inspect.Hook` and `eqxlm.training.Remat` are
    wrappers.

    **Class attributes:** `transparent_field` (a `ClassVar[str]`): the field holding the
    wrapped module.
    """

    transparent_field: eqx.AbstractClassVar[str]


class AbstractStacked(eqx.Module):
    """A module holding several copies of one module as a single module whose arrays have a
    leading axis, in its field `stacked_field`: the experts of `eqxlm.nn.SparseMoE`. Parameter
    names index that axis, one checkpoint tensor per copy
    (`mlp.experts.3.gate_proj.weight`), as checkpoints store them.

    (Scanned layers are an `eqxlm.nn.LayerStack`, which names its layers by their place in
    the model instead.)

    **Class attributes:** `stacked_field` (a `ClassVar[str]`): the field holding the stack.
    """

    stacked_field: eqx.AbstractClassVar[str]


class AbstractTapped(eqx.Module):
    """A module with named internal points that `eqxlm.inspect` can capture and patch: an
    attention's `q`, `k`, `v`, `probs`, `z`; a decoder layer's `resid_mid`; a mixture of
    experts' router points. `eqxlm.inspect.hook_names` lists them as `<module path>.<point>`.

    Its `__call__` takes a keyword argument `taps=None` and passes the value at each point
    through [`tap`][]: `x = eqxlm.nn.tap(taps, "scores", x)`. `taps` is None unless a hook
    asked for one of the points (then it is a static callback the hook passes), so an
    unhooked call is unchanged. A module called one token at a time (neither
    [`AbstractSequenceWise`][] nor [`AbstractTokenAxes`][]) is hooked one token at a time:
    its captures come back with a leading `seq` axis, and a patch's `value` has one token's
    shape.

    **Class attributes:** `tap_points` (a `ClassVar[tuple[str, ...]]`): the points' names.
    """

    tap_points: eqx.AbstractClassVar[tuple[str, ...]]
