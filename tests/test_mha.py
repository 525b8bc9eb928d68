"""One-node multi-head attention (`F.multi_head_attention_forward`: nn.MultiheadAttention, WavLM):
the graph the rewrite leaves, values and every gradient against eager for each mask kind and
layout, dropout's mask in the forward and the backward, and the calls it must leave alone."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from test_rewrite import RewriteCase

import flash_inductor  # noqa: F401  (registers torch.ops.flash)
from flash_inductor.rewrite.matcher import rewrite_graph

E, H, B, L = 16, 4, 2, 6


def _masks(kind: str, gen: torch.Generator) -> dict:
    """Keyword arguments of nn.MultiheadAttention for one mask kind; every query keeps a key.
    Bool masks mean True = masked (nn.MultiheadAttention's convention, SDPA's opposite)."""
    padding = torch.zeros(B, L, dtype=torch.bool)
    padding[1, -2:] = True
    later = torch.ones(L, L, dtype=torch.bool).triu(1)
    per_head = torch.rand(B * H, L, L, generator=gen) > 0.6
    per_head[..., 0] = False
    return {
        "none": {},
        "key_padding_bool": dict(key_padding_mask=padding),
        "key_padding_float": dict(key_padding_mask=torch.randn(B, L, generator=gen)),
        "attn_bool": dict(attn_mask=later),
        "attn_float": dict(attn_mask=torch.randn(L, L, generator=gen)),
        "attn_3d_bool": dict(attn_mask=per_head),
        "attn_3d_float": dict(attn_mask=torch.randn(B * H, L, L, generator=gen)),
        "both_bool": dict(attn_mask=later, key_padding_mask=padding),
        "both_float": dict(attn_mask=torch.randn(L, L, generator=gen),
                           key_padding_mask=torch.randn(B, L, generator=gen)),
        "causal": dict(attn_mask=later, is_causal=True),
        "causal_with_padding": dict(attn_mask=later, key_padding_mask=padding, is_causal=True),
    }[kind]


def _rewritten_against_eager(module: torch.nn.Module, call, *args, train: bool, tol: float = 1e-5):
    """`call(module, *args)` compiled with the rewrite (run eagerly) and eagerly on a copy of the
    module: checks the output and, in training, the gradient of every parameter and every float
    input against eager's; returns the rewrite's reports."""
    ref_module = copy.deepcopy(module)
    module.train(train), ref_module.train(train)
    leaves = [a.detach().requires_grad_(train and a.is_floating_point()) for a in args]
    ref_leaves = [a.detach().clone().requires_grad_(a.requires_grad) for a in leaves]
    reports = []

    def capture(gm, example_inputs):
        reports.extend(rewrite_graph(gm))
        return gm.forward

    torch._dynamo.reset()
    with torch.set_grad_enabled(train):
        out = torch.compile(lambda *a: call(module, *a), backend=capture)(*leaves)
        ref = call(ref_module, *ref_leaves)
    assert rel_err(out, ref) < tol, f"output relative error {rel_err(out, ref):.2e}"
    if train:
        g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
        out.backward(g)
        ref.backward(g)
        for (name, p), q in zip(module.named_parameters(), ref_module.parameters()):
            assert rel_err(p.grad, q.grad) < tol, f"{name}.grad relative error {rel_err(p.grad, q.grad):.2e}"
        for i, (a, b) in enumerate(zip(leaves, ref_leaves)):
            if b.requires_grad:
                assert rel_err(a.grad, b.grad) < tol, f"input {i} grad relative error {rel_err(a.grad, b.grad):.2e}"
    return reports


def _self_attention(need_weights: bool, masks: dict, mask_names: tuple):
    """nn.MultiheadAttention(x, x, x) with the masks passed as tensors; only the output is used."""

    def call(m, x, *mask_tensors):
        kw = dict(masks, **dict(zip(mask_names, mask_tensors)))
        return m(x, x, x, need_weights=need_weights, **kw)[0]

    return call


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("need_weights", [False, True], ids=["sdpa_path", "weights_unused"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("kind", ["none", "key_padding_bool", "key_padding_float", "attn_bool", "attn_float",
                                  "attn_3d_bool", "attn_3d_float", "both_bool", "both_float", "causal",
                                  "causal_with_padding"])
def test_module_rewritten_with_parity(kind, batch_first, need_weights, train):
    """Each mask kind, layout and path of torch's function: values, and in training (no dropout)
    the gradients of every parameter, of the input and of float masks."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    module = torch.nn.MultiheadAttention(E, H, batch_first=batch_first)
    x = torch.randn((B, L, E) if batch_first else (L, B, E), generator=gen)
    masks = _masks(kind, gen)
    tensors = {k: v for k, v in masks.items() if isinstance(v, torch.Tensor)}
    flags = {k: v for k, v in masks.items() if k not in tensors}
    reports = _rewritten_against_eager(module, _self_attention(need_weights, flags, tuple(tensors)), x,
                                       *tensors.values(), train=train)
    assert [r.rewritten for r in reports] == [True], [r.line() for r in reports]
    # torch swaps attn_mask for the causal flag only without padding and without weights
    assert ("causal" in reports[0].spelling) == (kind == "causal" and not need_weights)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_cross_attention_with_other_key_and_value_widths(train):
    """kdim/vdim != embed_dim: separate q/k/v weights, keys of another length than the queries."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    module = torch.nn.MultiheadAttention(E, H, kdim=8, vdim=12, batch_first=True)
    q = torch.randn(B, L, E, generator=gen)
    k, v = torch.randn(B, 9, 8, generator=gen), torch.randn(B, 9, 12, generator=gen)
    padding = torch.zeros(B, 9, dtype=torch.bool)
    padding[0, -3:] = True
    reports = _rewritten_against_eager(module, lambda m, q, k, v, p: m(q, k, v, key_padding_mask=p)[0],
                                       q, k, v, padding, train=train)
    assert [r.spelling for r in reports] == ["mha·in_proj(separate)·key_padding_mask(bool)·out_proj"]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_unbatched_input_without_biases(train):
    """A 2-D [L, E] input (torch adds and drops the batch dim), no projection biases."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    module = torch.nn.MultiheadAttention(E, H, bias=False)
    x, padding = torch.randn(L, E, generator=gen), torch.zeros(L, dtype=torch.bool)
    padding[-1] = True
    reports = _rewritten_against_eager(module, lambda m, x, p: m(x, x, x, key_padding_mask=p, need_weights=False)[0],
                                       x, padding, train=train)
    assert [r.rewritten for r in reports] == [True]


def test_functional_call_with_a_bool_padding_mask_beside_a_float_mask():
    """F.multi_head_attention_forward called directly gets the bool mask itself (nn.Module would
    have converted it, and Dynamo breaks the graph on that conversion's deprecation warning):
    the rewrite converts it to 0/-inf as torch does and adds the float mask."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    module = torch.nn.MultiheadAttention(E, H)
    padding = torch.zeros(B, L, dtype=torch.bool)
    padding[0, :3] = True

    def call(m, x, bias, p):
        return F.multi_head_attention_forward(
            x, x, x, E, H, m.in_proj_weight, m.in_proj_bias, None, None, False, 0.0, m.out_proj.weight,
            m.out_proj.bias, m.training, key_padding_mask=p, need_weights=False, attn_mask=bias)[0]

    reports = _rewritten_against_eager(module, call, torch.randn(L, B, E, generator=gen),
                                       torch.randn(L, L, generator=gen), padding, train=True)
    assert [r.spelling for r in reports] == ["mha·in_proj(packed)·attn_mask(float)·key_padding_mask(bool)·out_proj"]


@pytest.mark.parametrize("need_weights", [False, True], ids=["sdpa_path", "weights_unused"])
def test_rows_with_every_key_masked(need_weights):
    """Eager gives zeros on a fully padded sequence through SDPA and NaN through its softmax, and
    averages V on a row of finfo.min (a float mask): the rewrite restores each."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    module = torch.nn.MultiheadAttention(E, H, batch_first=True).eval()
    torch.nn.init.normal_(module.out_proj.bias)  # out_proj's bias is zero at init: make zeros visible
    x = torch.randn(B, L, E, generator=gen)
    padding = torch.zeros(B, L, dtype=torch.bool)
    padding[1] = True
    floor = torch.zeros(L, L)
    floor[2] = torch.finfo(torch.float32).min
    for masks in (dict(key_padding_mask=padding), dict(attn_mask=floor)):
        reports = []
        torch._dynamo.reset()
        out = torch.compile(lambda x: module(x, x, x, need_weights=need_weights, **masks)[0],
                            backend=lambda gm, ex: (reports.extend(rewrite_graph(gm)), gm.forward)[1])(x)
        ref = module(x, x, x, need_weights=need_weights, **masks)[0]
        assert [r.rewritten for r in reports] == [True]
        torch.testing.assert_close(out, ref, equal_nan=True)
    assert ref.isfinite().all()  # the finfo.min row: an average, not NaN


def test_live_dropout_keeps_eager_probabilities_and_one_mask_for_both_passes():
    """Identity projections on one-hot tokens make the output the dropped probabilities
    themselves: every entry is either 0 or eager's probability / (1 - p), a fraction p of them 0;
    and the value projection's gradient, Σ_b gᵀ·P_dropped, uses that same mask in the backward."""
    p, batch, n = 0.3, 8, E
    torch.manual_seed(0)
    module = torch.nn.MultiheadAttention(E, 1, dropout=p, batch_first=True)
    with torch.no_grad():
        module.in_proj_weight.copy_(torch.eye(E).repeat(3, 1))
        module.in_proj_bias.zero_()
        module.out_proj.weight.copy_(torch.eye(E))
        module.out_proj.bias.zero_()
    x = torch.eye(n).expand(batch, n, E).contiguous()
    probs = module.eval()(x, x, x)[1]  # eager's probabilities, [batch, n, n]
    module.train()
    reports = []
    torch._dynamo.reset()
    out = torch.compile(lambda x: module(x, x, x, need_weights=False)[0],
                        backend=lambda gm, ex: (reports.extend(rewrite_graph(gm)), gm.forward)[1])(x)
    assert [r.spelling for r in reports] == ["mha·in_proj(packed)·dropout·out_proj"]
    kept = out != 0
    dropped_fraction = 1 - kept.double().mean().item()
    assert abs(dropped_fraction - p) < 4 * math.sqrt(p * (1 - p) / kept.numel()), dropped_fraction
    torch.testing.assert_close(out[kept], (probs / (1 - p))[kept])
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(g)
    want = torch.einsum("bie,bij->ej", g, out.detach())  # Σ_b gᵀ·P_dropped, P_dropped = out
    torch.testing.assert_close(module.in_proj_weight.grad[2 * E:], want)


def test_dynamic_shapes_one_compile():
    """dynamic=True: one graph for every length, in inference and in training, where the module's
    dropout rate reaches the graph as a symbol and is specialised with a guard (patterns/dropout.py)."""
    module = torch.nn.MultiheadAttention(E, H, batch_first=True)
    for train, rewritten in ((False, True), (True, True)):
        module.train(train)
        reports = []
        torch._dynamo.reset()
        f = torch.compile(lambda x, p: module(x, x, x, key_padding_mask=p, need_weights=False)[0], dynamic=True,
                          backend=lambda gm, ex: (reports.extend(rewrite_graph(gm)), gm.forward)[1])
        for n in (5, 9, 13):
            x, padding = torch.randn(B, n, E), torch.zeros(B, n, dtype=torch.bool)
            padding[1, -2:] = True
            torch.testing.assert_close(f(x, padding), module(x, x, x, key_padding_mask=padding, need_weights=False)[0])
        assert [r.rewritten for r in reports] == [rewritten], [r.line() for r in reports]


def _wavlm_call(x, position_bias, wq, wk, wv, wo, bq, bv):
    """WavLM's call (transformers' WavLMAttention), its weights and biases passed in. The key bias
    is zeros: it shifts each row of scores by a constant, which softmax cancels, so its gradient
    would be rounding noise in both runs."""
    out, weights = F.multi_head_attention_forward(
        x, x, x, E, H, torch.empty([0]), torch.cat((bq, torch.zeros_like(bq), bv)), None, None, False, 0.0, wo, None,
        True, None, need_weights=True, attn_mask=position_bias, use_separate_proj_weight=True,
        q_proj_weight=wq, k_proj_weight=wk, v_proj_weight=wv)
    weights[:, None].broadcast_to(B, H, L, L)  # WavLM's layer returns this; its caller drops it
    return out


def _wavlm_inputs():
    g = torch.Generator().manual_seed(0)
    return ([torch.randn(L, B, E, generator=g), torch.randn(B * H, L, L, generator=g)]
            + [torch.randn(E, E, generator=g) / 4 for _ in range(4)] + [torch.randn(E, generator=g) for _ in range(2)])


class TestGraphs(RewriteCase):
    def test_padding_mask_becomes_a_keep_mask(self):
        """nn.MultiheadAttention turns the bool padding mask into 0/-inf before the call; the op
        reads the bool mask instead (the fill is erased), and one linear projects q, k and v."""
        module = torch.nn.MultiheadAttention(E, H, batch_first=True)
        padding = torch.zeros(B, L, dtype=torch.bool)
        padding[1, -2:] = True
        _, reports, code = self.rewrite_only(
            lambda x, p: module(x, x, x, key_padding_mask=p, need_weights=False)[0], torch.randn(B, L, E), padding)
        self.assertEqual(reports[0].spelling, "mha·in_proj(packed)·key_padding_mask(bool)·out_proj")
        self.assertExpectedInline(code, """\
query = l_x_.transpose(1, 0)
linear = torch._C._nn.linear(query, l_module_parameters_in_proj_weight_, l_module_parameters_in_proj_bias_)
unflatten = linear.unflatten(-1, (3, 4, 4))
permute = unflatten.permute(2, 1, 3, 0, 4)
getitem_1 = permute[0]
getitem_2 = permute[1]
getitem_3 = permute[2]
unsqueeze = l_p_.unsqueeze(1)
unsqueeze_1 = unsqueeze.unsqueeze(1)
logical_not = torch.logical_not(unsqueeze_1)
fwd_default = torch.ops.flash.fwd.default(getitem_1, getitem_2, getitem_3, logical_not, None, 0, 0.5, 0.0)
getitem_4 = fwd_default[0]
permute_1 = getitem_4.permute(2, 0, 1, 3)
flatten = permute_1.flatten(-2)
linear_1 = torch._C._nn.linear(flatten, l_module_modules_out_proj_parameters_weight_, l_module_modules_out_proj_parameters_bias_)
attn_output_1 = linear_1.transpose(1, 0)
return (attn_output_1,)""")

    def test_wavlm_call_with_weights_it_drops(self):
        """WavLM's spelling: separate q/k/v weights, the biases concatenated, a float [B·H, L, S]
        position bias and need_weights=True with the weights broadcast and then dropped. The
        dead readers go with the call; the bias's values are unknown, so rows the op finds fully
        masked get eager's softmax of the bias (docs/design.md §3)."""

        code, reports = self.run_rewritten(_wavlm_call, *_wavlm_inputs())
        self.assertEqual(reports[0].spelling, "mha·in_proj(separate)·attn_mask(float)·weights(unused)·out_proj")
        self.assertExpectedInline(code, """\
empty = torch.empty([0])
zeros_like = torch.zeros_like(l_bq_)
cat = torch.cat((l_bq_, zeros_like, l_bv_))
chunk = cat.chunk(3)
getitem_3 = chunk[0]
getitem_4 = chunk[1]
getitem_5 = chunk[2]
linear = torch._C._nn.linear(l_x_, l_wq_, getitem_3)
unflatten = linear.unflatten(-1, (4, 4))
permute = unflatten.permute(1, 2, 0, 3)
linear_1 = torch._C._nn.linear(l_x_, l_wk_, getitem_4)
unflatten_1 = linear_1.unflatten(-1, (4, 4))
permute_1 = unflatten_1.permute(1, 2, 0, 3)
linear_2 = torch._C._nn.linear(l_x_, l_wv_, getitem_5)
unflatten_2 = linear_2.unflatten(-1, (4, 4))
permute_2 = unflatten_2.permute(1, 2, 0, 3)
unflatten_3 = l_position_bias_.unflatten(0, (-1, 4))
fwd_default = torch.ops.flash.fwd.default(permute, permute_1, permute_2, unflatten_3, None, 0, 0.5, 0.0)
getitem_6 = fwd_default[0]
getitem_7 = fwd_default[1]
isneginf = torch.isneginf(getitem_7)
unsqueeze = isneginf.unsqueeze(-1)
amax = unflatten_3.amax(-1, keepdim = True)
eq = unflatten_3 == amax
to = eq.to(torch.float32)
matmul = torch.matmul(to, permute_2)
sum_1 = to.sum(-1, keepdim = True)
truediv = matmul / sum_1
isneginf_1 = torch.isneginf(amax)
where = torch.where(isneginf_1, nan, truediv)
where_1 = torch.where(unsqueeze, where, getitem_6)
permute_3 = where_1.permute(2, 0, 1, 3)
flatten = permute_3.flatten(-2)
linear_3 = torch._C._nn.linear(flatten, l_wo_, None)
return (linear_3,)""")

    def test_through_inductor(self):
        """The rewritten call compiled by Inductor (backend="flash"'s path): values and gradients."""
        self.run_rewritten(_wavlm_call, *_wavlm_inputs(), backend="inductor")


class TestLeftEager(RewriteCase):
    def test_weights_used(self):
        module = torch.nn.MultiheadAttention(E, H, batch_first=True)
        self.assert_not_rewritten(lambda x: module(x, x, x), torch.randn(B, L, E), guard="mha_weights_used")

    def test_weights_summed_into_the_output(self):
        module = torch.nn.MultiheadAttention(E, H, batch_first=True)

        def f(x):
            out, weights = module(x, x, x, average_attn_weights=False)
            return out + weights.sum()

        self.assert_not_rewritten(f, torch.randn(B, L, E), guard="mha_weights_used")

    def test_learned_bias_key_and_value(self):
        module = torch.nn.MultiheadAttention(E, H, add_bias_kv=True)
        self.assert_not_rewritten(lambda x: module(x, x, x, need_weights=False)[0], torch.randn(L, B, E),
                                  guard="mha_extra_keys")

    def test_zero_key_and_value(self):
        module = torch.nn.MultiheadAttention(E, H, add_zero_attn=True)
        self.assert_not_rewritten(lambda x: module(x, x, x, need_weights=False)[0], torch.randn(L, B, E),
                                  guard="mha_extra_keys")

    def test_fused_encoder_layer_is_a_site_left_to_torch(self):
        """nn.TransformerEncoderLayer in inference without grad: one native call for the layer."""
        layer = torch.nn.TransformerEncoderLayer(E, H, 32, batch_first=True).eval()
        with torch.no_grad():
            self.assert_not_rewritten(layer, torch.randn(B, L, E), guard="fused_native_call")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("batch_first", [True, False])
def test_gpu_module_runs_our_kernels(batch_first, monkeypatch):
    """nn.MultiheadAttention in bf16 on a GPU under backend="flash": the Triton kernels in
    Inductor's code, a padded batch's output and every parameter's and the input's gradient
    against float64 eager (no dropout: the same function in both)."""
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setenv("FLASH_INDUCTOR_TRITON_AUTOTUNE", "0")
    e, h, n = 256, 4, 300
    module = torch.nn.MultiheadAttention(e, h, batch_first=batch_first, device="cuda", dtype=torch.bfloat16).train()
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn((2, n, e) if batch_first else (n, 2, e), device="cuda", dtype=torch.bfloat16, generator=gen)
    padding = torch.zeros(2, n, dtype=torch.bool, device="cuda")
    padding[1, 200:] = True

    def step(module, x):
        x = x.detach().requires_grad_()
        out = module(x, x, x, key_padding_mask=padding, need_weights=False)[0]
        return (out, *torch.autograd.grad(out, [x, *module.parameters()], torch.ones_like(out)))

    torch._dynamo.reset()
    got, code = run_and_get_code(torch.compile(step, backend="flash"), module, x)
    code = "\n".join(code)
    assert "_attn_fwd" in code and "_attn_bwd_dq" in code and "_attn_bwd_dkdv" in code
    ref = step(copy.deepcopy(module).double(), x.double())
    for i, (g, r) in enumerate(zip(got, ref)):
        assert torch.isfinite(g).all(), i
        assert rel_err(g, r) < 2e-2, f"{i}: {rel_err(g, r):.3g}"
