"""`eqxlm.inspect`: captures against transformers' hidden states and attentions, patches
against hand-written computations, gradients with respect to activations, and the unhooked
program unchanged; for Llama, BLOOM, Qwen2 (sliding windows) and a scanned model."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf import TINY, hf_model, run_hf, save_hf

import eqxlm
from eqxlm import inspect, nn
from eqxlm.nn import attention_frames, feed_forward

FAMILIES = {
    "llama": ("llama", {}, False),
    "bloom": ("bloom", {}, False),
    "qwen2": ("qwen2", {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1}, False),
    "llama-scanned": ("llama", {}, True),
    "qwen2-scanned": ("qwen2", {}, True),
    "mixtral": ("mixtral", {}, False),  # a mixture of experts: its MLP takes the whole sequence
}
IDS = np.array([3, 17, 5, 40, 22, 9, 1, 33])
OTHER = np.array([8, 2, 71, 14, 60, 5, 19, 44])
run = eqx.filter_jit(inspect.run)  # one compile per hooked model: eager dispatch is several times slower


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def case(request, tmp_path_factory):
    family, overrides, scan = FAMILIES[request.param]
    ref = hf_model(family, **overrides)
    path = save_hf(ref, tmp_path_factory.mktemp(request.param))
    return request.param, ref, eqxlm.from_pretrained(path, scan_layers=scan)


def _layers(model):
    layers = model.model.layers
    return layers.unstack() if isinstance(layers, eqxlm.nn.LayerStack) else layers


def test_captures_equal_transformers_hidden_states_and_attentions(case):
    _, ref, model = case
    n = model.model.num_layers
    names = [f"model.layers.{i}.resid_pre" for i in range(n)] + [f"model.layers.{i}.self_attn.probs" for i in range(n)]
    out, acts = eqx.filter_jit(inspect.run)(inspect.capture(model, names), jnp.asarray(IDS))
    want = run_hf(ref, IDS[None], output_hidden_states=True, output_attentions=True)
    for i in range(n):
        np.testing.assert_allclose(acts[f"model.layers.{i}.resid_pre"], want.hidden_states[i][0].numpy(), atol=1e-5)
        np.testing.assert_allclose(acts[f"model.layers.{i}.self_attn.probs"], want.attentions[i][0].numpy(), atol=1e-5)
    np.testing.assert_allclose(out.logits, want.logits[0].numpy(), atol=1e-4)


def test_unhooked_model_traces_to_the_same_program(case):
    _, _, model = case
    ids = jnp.asarray(IDS)
    plain = jax.make_jaxpr(model)(ids).pretty_print()
    inner = (
        "model.layers.1.mlp:input"
        if isinstance(_layers(model)[1].mlp, nn.AbstractSequenceWise)
        else "model.layers.1.mlp.down_proj:input"
    )
    captured = inspect.capture(model, ["model.layers.0.self_attn.z", inner])
    hooked = inspect.patch(captured, "model.layers.0.resid_mid", add=1.0)
    assert jax.make_jaxpr(inspect.unhook(hooked))(ids).pretty_print() == plain
    assert jax.make_jaxpr(lambda i: inspect.run(model, i)[0])(ids).pretty_print() == plain
    assert jax.make_jaxpr(lambda i: inspect.run(hooked, i))(ids).pretty_print() != plain


def test_patching_a_layer_output_with_another_prompts_value_is_a_two_pass_computation(case):
    _, _, model = case
    _, acts = run(inspect.capture(model, "model.layers.0"), jnp.asarray(OTHER))
    patched = inspect.patch(model, "model.layers.0", value=acts["model.layers.0"])
    got = patched(jnp.asarray(IDS)).logits
    # by hand: the other prompt's layer-0 output, then the remaining layers on this prompt's frames
    spec = model.model.spec
    positions = jnp.arange(len(IDS), dtype=jnp.int32)
    frames, _ = attention_frames(spec.windows, positions, jnp.ones(len(IDS), bool))
    frame_of = dict(zip(spec.windows, frames, strict=True))
    x = acts["model.layers.0"]
    for layer in _layers(model)[1:]:
        x, _, _ = layer(x, frame_of[layer.self_attn.sliding_window])
    want = model.logits(jax.vmap(model.model.norm)(x))
    if isinstance(model.model.layers, eqxlm.nn.LayerStack):  # lax.scan vs the layers one by one: 1e-6 (README)
        np.testing.assert_allclose(got, want, atol=1e-5)
    else:
        np.testing.assert_array_equal(got, want)


def test_ablating_a_head_removes_exactly_its_share_of_the_attention_output(case):
    _, _, model = case
    head, ids = 1, jnp.asarray(IDS)
    names = ["model.layers.0.self_attn.z", "model.layers.0.self_attn", "model.layers.1.resid_pre"]
    _, clean = run(inspect.capture(model, names), ids)
    ablated = inspect.patch(model, "model.layers.0.self_attn.z", fn=lambda z: z.at[:, head].set(0.0))
    _, dirty = run(inspect.capture(ablated, names), ids)
    attn = _layers(model)[0].self_attn
    d = attn.head_dim
    z = clean["model.layers.0.self_attn.z"]
    np.testing.assert_array_equal(dirty["model.layers.0.self_attn.z"][:, head], 0.0)
    np.testing.assert_array_equal(np.delete(dirty["model.layers.0.self_attn.z"], head, 1), np.delete(z, head, 1))
    share = z[:, head] @ attn.o_proj.weight[:, head * d : (head + 1) * d].T
    np.testing.assert_allclose(dirty["model.layers.0.self_attn"], clean["model.layers.0.self_attn"] - share, atol=1e-5)
    assert not np.allclose(dirty["model.layers.1.resid_pre"], clean["model.layers.1.resid_pre"])


def test_gradient_of_a_logit_wrt_an_activation_matches_a_hand_written_function(case):
    _, _, model = case
    ids, token = jnp.asarray(IDS), 7
    _, acts = run(inspect.capture(model, "model.layers.0.resid_mid"), ids)
    h0 = acts["model.layers.0.resid_mid"]

    def through_hooks(model, h):
        return inspect.patch(model, "model.layers.0.resid_mid", value=h)(ids).logits[-1, token]

    def by_hand(model, h):  # the rest of layer 0 (sequential, pre-norm), then the other layers and the head
        spec = model.model.spec
        frames, _ = attention_frames(spec.windows, jnp.arange(len(IDS), dtype=jnp.int32), jnp.ones(len(IDS), bool))
        frame_of = dict(zip(spec.windows, frames, strict=True))
        first, *rest = _layers(model)
        b = jax.vmap(first.post_attention_layernorm)(h)
        x = (b if isinstance(first, eqxlm.nn.NormResidualLayer) else h) + feed_forward(first.mlp, b)
        for layer in rest:
            x, _, _ = layer(x, frame_of[layer.self_attn.sliding_window])
        return model.logits(jax.vmap(model.model.norm)(x))[-1, token]

    # jitted with the model as an argument (eager gradients of a whole model are slow)
    def grad(f):
        return eqx.filter_jit(lambda m, h: jax.grad(lambda x: f(m, x))(h))(model, h0)

    want = grad(by_hand)
    np.testing.assert_allclose(grad(through_hooks), want, atol=1e-5)
    assert float(jnp.abs(want).max()) > 0


def test_queries_and_keys_after_rotary_give_the_captured_probabilities(case):
    _, _, model = case
    point = "model.layers.0.self_attn"
    _, acts = run(inspect.capture(model, [f"{point}.q", f"{point}.k", f"{point}.probs"]), jnp.asarray(IDS))
    q, k = acts[f"{point}.q"], acts[f"{point}.k"]
    k = jnp.repeat(k, q.shape[1] // k.shape[1], axis=1)
    scores = jnp.einsum("shd,thd->hst", q, k) / np.sqrt(q.shape[-1])
    attn = _layers(model)[0].self_attn
    if attn.position_scheme is not None:  # ALiBi (BLOOM) biases the scores; rotary returns None here
        bias = attn.position_scheme.bias(jnp.arange(len(IDS), dtype=jnp.int32))
        scores = scores if bias is None else scores + bias[:, None, :]
    window = attn.sliding_window
    i, j = np.arange(len(IDS))[:, None], np.arange(len(IDS))[None]
    mask = (j <= i) & ((i - j < window) if window else True)
    probs = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
    np.testing.assert_allclose(acts[f"{point}.probs"], probs, atol=1e-5)


def test_mlp_neurons_captured_inside_the_token_wise_block(case):
    _, _, model = case
    point = "model.layers.1.mlp"
    if isinstance(_layers(model)[1].mlp, nn.AbstractSequenceWise):  # a mixture of experts: hooked as a whole
        with pytest.raises(ValueError, match="takes the whole sequence"):
            inspect.capture(model, f"{point}.experts.down_proj:input")
        return
    _, acts = run(inspect.capture(model, [f"{point}.down_proj:input", f"{point}:input"]), jnp.asarray(IDS))
    mlp = _layers(model)[1].mlp
    x = acts[f"{point}:input"]
    project = eqxlm.nn.project
    if isinstance(mlp, eqxlm.nn.GatedMLP):
        want = jax.vmap(lambda t: mlp.activation(project(mlp.gate_proj, t)) * project(mlp.up_proj, t))(x)
    else:
        want = jax.vmap(lambda t: mlp.activation(project(mlp.up_proj, t)))(x)
    # float32 rounding only (the hooked run is jitted, this one eager): values up to ~7, a few ulps
    np.testing.assert_allclose(acts[f"{point}.down_proj:input"], want, atol=1e-6, rtol=1e-6)


def test_vmap_and_jit_over_a_batch(case):
    _, _, model = case
    hooked = inspect.capture(model, "model.layers.1.self_attn.v")
    batch = jnp.asarray(np.stack([IDS, OTHER]))
    _, acts = eqx.filter_jit(jax.vmap(inspect.run, in_axes=(None, 0)))(hooked, batch)
    for row in range(2):
        _, one = run(hooked, batch[row])
        np.testing.assert_allclose(acts["model.layers.1.self_attn.v"][row], one["model.layers.1.self_attn.v"], atol=1e-5)


@pytest.mark.slow  # one to two minutes per family on two shared cores
def test_patches_apply_at_every_step_of_generate(case):
    _, _, model = case
    steer = 3.0 * jnp.sin(jnp.arange(model.config.hidden_size, dtype=jnp.float32))
    patched = inspect.patch(model, "model.layers.0.resid_post", add=steer)
    prompt = jnp.asarray(IDS[None, :5])
    got = np.asarray(eqxlm.generate(patched, prompt, max_new_tokens=6, eos_token_id=[]))
    ids = list(IDS[:5])
    for _ in range(6):  # greedy by hand with full forwards of the patched model (no cache)
        ids.append(int(jnp.argmax(patched(jnp.asarray(ids)).logits[-1])))
    assert got[0].tolist() == ids
    assert got[0].tolist() != np.asarray(eqxlm.generate(model, prompt, max_new_tokens=6, eos_token_id=[]))[0].tolist()


def test_names_checkpoint_names_and_where():
    ref = hf_model("bloom")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        model = eqxlm.from_pretrained(save_hf(ref, tmp))
    ids = jnp.asarray(IDS)
    _, a = run(inspect.capture(model, "transformer.h.1.self_attention.dense"), ids)
    _, b = run(inspect.capture(model, "model.layers.1.self_attn.o_proj"), ids)
    _, c = run(inspect.capture(model, where=lambda m: m.model.layers[1].self_attn.o_proj), ids)
    np.testing.assert_array_equal(a["transformer.h.1.self_attention.dense"], b["model.layers.1.self_attn.o_proj"])
    np.testing.assert_array_equal(c["model.layers.1.self_attn.o_proj"], b["model.layers.1.self_attn.o_proj"])
    with pytest.raises(ValueError, match="query_key_value.*q_proj, k_proj, v_proj"):
        inspect.capture(model, "transformer.h.1.self_attention.query_key_value")
    with pytest.raises(ValueError, match="no module named 'model.layers.1.self_atn'"):
        inspect.capture(model, "model.layers.1.self_atn")
    with pytest.raises(ValueError, match="captured, not patched"):
        inspect.patch(model, "model.layers.1.self_attn.probs", value=0.0)
    with pytest.raises(RuntimeError, match="inspect.run"):
        inspect.capture(model, "model.layers.0")(ids)
    assert "model.layers.1.self_attn.z" in inspect.hook_names(model)


def test_models_configs_and_captures_render_with_treescope_and_print_short():
    import treescope  # in the test extra: a missing install fails, never skips

    model = eqxlm.from_pretrained("eqxlm/default")
    hooked = inspect.capture(model, "model.layers.1.self_attn.probs")
    _, acts = run(hooked, jnp.asarray(IDS))
    for thing in (model, model.config, acts, hooked):
        assert "<" in treescope.render_to_html(thing)
    text = repr(model)
    assert "f32[192,192]" in text and "Array(" not in text and len(text) < 20_000


def test_captures_inside_generate_equal_a_full_forward(case):
    """`inspect.run(eqxlm.generate, hooked, ...)`: the prefill's captures under their names and
    every decode step's under `name@decode` equal one full forward over the prompt and the
    generated tokens (1e-5), in the scanned layout too, with a patch applied at every step."""
    _, _, model = case
    steer = 0.5 * jnp.cos(jnp.arange(model.config.hidden_size, dtype=jnp.float32))
    patched = inspect.patch(model, "model.layers.0.resid_post", add=steer)
    points = ["model.layers.1.resid_pre", "model.layers.0.self_attn.q", "model.layers.1.mlp:input"]
    hooked = inspect.capture(patched, points)
    prompt, n = IDS[None, :5], 6
    tokens, acts = inspect.run(lambda m, ids: eqxlm.generate(m, ids, max_new_tokens=n, eos_token_id=[]), hooked, prompt)
    assert np.asarray(tokens).tolist() == np.asarray(eqxlm.generate(patched, prompt, max_new_tokens=n, eos_token_id=[])).tolist()
    _, full = run(hooked, jnp.asarray(tokens[0, :-1]))  # every position whose value generate computed
    for point in points:
        np.testing.assert_allclose(acts[point][0], full[point][:5], atol=1e-5, err_msg=point)
        decoded = acts[point + "@decode"]
        assert decoded.shape[:3] == (1, n - 1, 1)
        np.testing.assert_allclose(decoded[0, :, 0], full[point][5:], atol=1e-5, err_msg=point + "@decode")


def test_patching_inside_the_token_wise_mlp_applies_per_token(case):
    """Zeroing neuron 3 at `mlp.down_proj:input` (a module the MLP calls one token at a time)
    equals the hand-written MLP with that neuron zeroed; a sequence-shaped value is refused."""
    _, _, model = case
    point = "model.layers.1.mlp"
    mlp = _layers(model)[1].mlp
    if isinstance(mlp, nn.AbstractSequenceWise):  # a mixture of experts: hooked as a whole
        with pytest.raises(ValueError, match="takes the whole sequence"):
            inspect.patch(model, f"{point}.experts.down_proj:input", fn=lambda h: h.at[3].set(0.0))
        return
    patched = inspect.patch(model, f"{point}.down_proj:input", fn=lambda h: h.at[3].set(0.0))
    names = [f"{point}:input", point]
    _, got = run(inspect.capture(patched, names), jnp.asarray(IDS))
    x = got[f"{point}:input"]
    if isinstance(mlp, eqxlm.nn.GatedMLP):
        h = jax.vmap(lambda t: mlp.activation(mlp.gate_proj(t)) * mlp.up_proj(t))(x)
    else:
        h = jax.vmap(lambda t: mlp.activation(mlp.up_proj(t)))(x)
    want = jax.vmap(mlp.down_proj)(h.at[:, 3].set(0.0))
    np.testing.assert_allclose(got[point], want, atol=1e-5)
    _, clean = run(inspect.capture(model, point), jnp.asarray(IDS))
    assert not np.allclose(clean[point], got[point])
    with pytest.raises(ValueError, match="one token's shape"):
        inspect.patch(model, f"{point}.down_proj", value=jnp.zeros((len(IDS), model.config.hidden_size)))


def test_every_offered_name_captures_at_once_and_leaves_the_logits_alone(case):
    """Every name `hook_names` offers, captured together in one run: norms (each layer's, q/k,
    the final one), embeddings and projections included (a norm hooked inside a layer once
    failed its shape check: the layer vmapped the hook per token). The logits stay those of the
    unhooked model, the final norm's capture is transformers' last hidden state, the embedding's
    is the table's rows."""
    _, ref, model = case
    names = inspect.hook_names(model)
    out, acts = run(inspect.capture(model, names), jnp.asarray(IDS))
    plain, _ = run(model, jnp.asarray(IDS))
    # hooks inside an MLP make it run one token at a time (one product per token instead of one
    # per sequence): the same sums, float32 rounding apart
    np.testing.assert_allclose(out.logits, plain.logits, atol=1e-5, rtol=0)
    assert set(acts) == set(names)
    want = run_hf(ref, IDS[None], output_hidden_states=True)
    np.testing.assert_allclose(acts["model.norm"], want.hidden_states[-1][0].numpy(), atol=1e-5)
    np.testing.assert_array_equal(acts["model.embed_tokens"], model.model.embed_tokens.weight[IDS])
    _, ids = run(inspect.capture(model, "model.embed_tokens:input"), jnp.asarray(IDS))
    np.testing.assert_array_equal(ids["model.embed_tokens:input"], IDS)


@pytest.mark.parametrize("family", ["qwen3", "olmo2"])
def test_query_key_norms_capture_and_patch(family, tmp_path):
    """q/k norms per head (Qwen3: captures `(seq, heads, head_dim)`) and over the whole
    projection (OLMo-2: `(seq, heads * head_dim)`); zeroing the key norm's output makes every
    score zero, so the first layer's attention is uniform over the visible keys."""
    model = eqxlm.from_pretrained(save_hf(hf_model(family), tmp_path))
    attn = model.model.layers[0].self_attn
    norms = ["model.layers.0.self_attn.q_norm", "model.layers.0.self_attn.k_norm"]
    _, acts = run(inspect.capture(model, norms), jnp.asarray(IDS))
    per_head = family == "qwen3"
    q_shape = (len(IDS), attn.num_heads, attn.head_dim) if per_head else (len(IDS), attn.num_heads * attn.head_dim)
    assert acts["model.layers.0.self_attn.q_norm"].shape == q_shape
    zeroed = inspect.patch(model, "model.layers.0.self_attn.k_norm", value=0.0)
    patched = inspect.capture(zeroed, "model.layers.0.self_attn.probs")
    _, acts = run(patched, jnp.asarray(IDS))
    uniform = np.tril(np.ones((len(IDS), len(IDS)))) / np.arange(1, len(IDS) + 1)[:, None]
    want = np.broadcast_to(uniform, (attn.num_heads, *uniform.shape))
    np.testing.assert_allclose(acts["model.layers.0.self_attn.probs"], want, atol=1e-6)


def test_norms_with_a_weight_per_head_are_refused_by_name(tmp_path):
    """Cohere's q/k norms run inside the attention's per-head vmap: refused with a message that
    names them and the points to use instead; not offered by `hook_names`."""
    model = eqxlm.from_pretrained(save_hf(hf_model("cohere", use_qk_norm=True), tmp_path))
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_norm: .*one weight per head.*`q` / `k` points"):
        inspect.capture(model, "model.layers.0.self_attn.q_norm")
    assert "model.layers.0.self_attn.q_norm" not in inspect.hook_names(model)
    assert "model.layers.0.self_attn.q" in inspect.hook_names(model)


def test_a_parallel_layer_offers_no_resid_mid_and_refuses_it_by_name():
    """A parallel layer (GPT-NeoX) has no residual stream between attention and MLP: its
    `resid_mid` is neither offered nor silently captured empty; every name it does offer
    captures."""
    model = eqxlm.DecoderLM(eqxlm.GPTNeoXConfig(**TINY["gpt_neox"]), key=jax.random.key(0))
    names = inspect.hook_names(model)
    assert "model.layers.0.resid_pre" in names and "model.layers.0.resid_post" in names
    assert not [n for n in names if n.endswith("resid_mid")]
    with pytest.raises(ValueError, match=r"model.layers.0.resid_mid: model.layers.0 is a ParallelLayer, .*no point 'resid_mid'"):
        inspect.capture(model, "model.layers.0.resid_mid")
    _, acts = run(inspect.capture(model, names), jnp.asarray(IDS))
    assert set(acts) == set(names)


@pytest.mark.parametrize("scan", [False, True])
def test_a_transformation_begun_inside_run_is_refused_and_run_inside_it_captures_exactly(tmp_path, scan):
    model = eqxlm.from_pretrained(save_hf(hf_model("llama"), tmp_path), scan_layers=scan)
    hooked = inspect.capture(model, ["model.norm", "model.layers.1.resid_pre"])  # scanned: a capture from the scan
    batch = jnp.asarray(np.stack([IDS, OTHER]))
    hidden = jax.vmap(lambda ids: model.model(ids).last_hidden_state)(batch)  # unhooked
    embedded = jax.vmap(model.model.embed_tokens)(batch[0])
    message = r"put `run` inside the transformation instead: `jax.vmap\(lambda ids: inspect.run\(hooked, ids\)\)"
    with pytest.raises(RuntimeError, match=message):
        inspect.run(jax.vmap(hooked), batch)
    with pytest.raises(RuntimeError, match=message):
        inspect.run(eqx.filter_jit(lambda m, ids: m(ids)), hooked, batch[0])
    with pytest.raises(RuntimeError, match=message):  # a hooked part called under a plain vmap
        inspect.run(lambda m, h: jax.vmap(m.model.norm)(h), hooked, embedded)
    # the calls the message gives
    _, acts = jax.vmap(lambda ids: inspect.run(hooked, ids))(batch)
    np.testing.assert_allclose(acts["model.norm"], hidden, atol=1e-5)
    _, acts = eqx.filter_jit(inspect.run)(hooked, batch[1])
    np.testing.assert_allclose(acts["model.norm"], hidden[1], atol=1e-5)
    _, acts = jax.vmap(lambda h: inspect.run(hooked.model.norm, h))(embedded)
    np.testing.assert_allclose(acts["model.norm"], jax.vmap(model.model.norm)(embedded), atol=1e-6)
