"""The rewrite, spelling by spelling: the graph it leaves (pinned with expecttest), values and
gradients against eager, and the near-misses it must leave alone."""

from __future__ import annotations

import math
import os
import re

import expecttest
import torch
import torch.nn.functional as F

import flash_inductor  # noqa: F401  (registers torch.ops.flash)
from flash_inductor.rewrite.matcher import rewrite_graph
from flash_inductor.rewrite.report import recording


def _code(gm) -> str:
    """The graph's code without the signature, the placeholder renames and the `x = None` frees."""
    lines = (ln.split(";")[0].strip() for ln in gm.code.strip().splitlines()[1:])
    return "\n".join(ln for ln in lines if ln and not re.fullmatch(r"l_\w+ = L_\w+", ln))


class RewriteCase(expecttest.TestCase):
    def run_rewritten(self, fn, *args, backend="rewrite", grads=True, rtol=None):
        """Compile `fn` with the rewrite; check values (and grads) against eager; return (code, reports)."""
        torch._dynamo.reset()
        captured = {}

        def capture(gm, example_inputs):
            captured["reports"] = rewrite_graph(gm)
            captured["code"] = _code(gm)
            if backend == "inductor":
                from torch._inductor.compile_fx import compile_fx

                return compile_fx(gm, example_inputs)
            return gm.forward

        leaves = [a.detach().requires_grad_(a.is_floating_point() and grads) if isinstance(a, torch.Tensor) else a for a in args]
        ref_leaves = [a.detach().double().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in leaves]
        out = torch.compile(fn, backend=capture, fullgraph=True)(*leaves)
        ref = fn(*ref_leaves)
        dtype = out.dtype
        tol = rtol or {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]
        rel = (out.double() - ref).norm() / ref.norm()
        self.assertLess(rel.item(), tol, f"output relative error {rel.item():.2e}")
        if grads:
            g = torch.randn_like(ref)
            got = torch.autograd.grad(out, [a for a in leaves if isinstance(a, torch.Tensor) and a.requires_grad], g.to(out.dtype), allow_unused=True)
            want = torch.autograd.grad(ref, [a for a in ref_leaves if isinstance(a, torch.Tensor) and a.requires_grad], g, allow_unused=True)
            for i, (x, y) in enumerate(zip(got, want)):
                self.assertEqual(x is None, y is None, f"gradient {i} flows in only one of eager and rewritten")
                if x is None:
                    continue
                e = (x.double() - y).norm() / y.norm().clamp_min(1e-12)
                self.assertLess(e.item(), tol * 4, f"gradient {i} relative error {e.item():.2e}")
        return captured["code"], captured["reports"]

    def assert_grads_beside_patched_rows(self, out, leaves, ref, ref_leaves, dead):
        """Gradients where the rewrite patched rows with no visible key (`dead`, bool, broadcast
        to the output). On those rows eager's dq/dk differentiate scores that the mask absorbed
        (s + finfo.min == finfo.min): an artefact, ours are 0 (docs/design.md §3). So every
        gradient with a zero output gradient there, then V's gradient from those rows alone."""
        dout = torch.randn_like(ref) * ~dead
        for g, w in zip(torch.autograd.grad(out, leaves, dout.float(), retain_graph=True),
                        torch.autograd.grad(ref, ref_leaves, dout, retain_graph=True)):
            self.assertLess(((g.double() - w).norm() / w.norm()).item(), 1e-5)
        rows = torch.zeros_like(ref) + dead
        got_v = torch.autograd.grad(out, leaves[2], rows.float())[0]
        want_v = torch.autograd.grad(ref, ref_leaves[2], rows)[0]
        self.assertLess(((got_v.double() - want_v).norm() / want_v.norm()).item(), 1e-5)

    def rewrite_only(self, fn, *args):
        """(output, reports, code) of `fn` compiled with the rewrite and run once."""
        torch._dynamo.reset()
        seen = {}

        def capture(gm, example_inputs):
            seen["reports"] = rewrite_graph(gm)
            seen["code"] = _code(gm)
            return gm.forward

        out = torch.compile(fn, backend=capture, fullgraph=True)(*args)
        return out, seen["reports"], seen["code"]

    def assert_not_rewritten(self, fn, *args, guard: str):
        torch._dynamo.reset()
        seen = {}

        def capture(gm, example_inputs):
            seen["reports"] = rewrite_graph(gm)
            seen["code"] = gm.code
            return gm.forward

        out = torch.compile(fn, backend=capture, fullgraph=True)(*args)
        torch.testing.assert_close(out, fn(*args))
        reports = seen["reports"]
        self.assertTrue(reports, "no attention site was even considered")
        self.assertFalse(any(r.rewritten for r in reports), [r.line() for r in reports])
        self.assertIn(guard, [r.guard for r in reports])
        self.assertNotIn("flash.fwd", seen["code"])


def qkv(b=2, h=4, nq=7, nk=9, d=16, dtype=torch.float32, hkv=None):
    g = torch.Generator().manual_seed(b * 1000 + nq * 10 + d)
    q = torch.randn(b, h, nq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv or h, nk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv or h, nk, d, generator=g).to(dtype)
    return q, k, v


class TestSpellings(RewriteCase):
    def test_matmul_mul_scale_add_mask(self):
        """transformers' eager_attention_forward (BERT, GPT-2, LLaMA, ... in transformers 5)."""

        def f(q, k, v, mask):
            w = torch.matmul(q, k.transpose(2, 3)) * 0.25
            w = w + mask
            w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
            w = F.dropout(w, p=0.1, training=False)
            return torch.matmul(w, v)

        q, k, v = qkv()
        mask = torch.zeros(2, 1, 7, 9).masked_fill(torch.rand(2, 1, 7, 9) > 0.7, torch.finfo(torch.float32).min)
        code, reps = self.run_rewritten(f, q, k, v, mask)
        self.assertEqual(reps[0].spelling, "matmul·mul(scale)·add(bias)·softmax(fp32)·dropout(off)·matmul")
        self.assertExpectedInline(code, """\
fwd_default = torch.ops.flash.fwd.default(l_q_, l_k_, l_v_, l_mask_, None, 0, 0.25, 0.0)
getitem = fwd_default[0]
getitem_1 = fwd_default[1]
isneginf = torch.isneginf(getitem_1)
unsqueeze = isneginf.unsqueeze(-1)
amax = l_mask_.amax(-1, keepdim = True)
eq = l_mask_ == amax
to_1 = eq.to(torch.float32)
matmul_2 = torch.matmul(to_1, l_v_)
sum_1 = to_1.sum(-1, keepdim = True)
truediv = matmul_2 / sum_1
isneginf_1 = torch.isneginf(amax)
where = torch.where(isneginf_1, nan, truediv)
where_1 = torch.where(unsqueeze, where, getitem)
return (where_1,)""")

    def test_gpt_oss_attention_sinks(self):
        """GPT-OSS: a learned logit per head joins each row's softmax (max-shifted) and its column
        is dropped: the op's output times sigmoid(lse - sink). A row with every key masked is 0 in
        both; the sink's gradient flows through the emitted sigmoid, q's and k's through lse."""

        def f(q, k, v, sinks, mask):
            w = torch.matmul(q, k.transpose(2, 3)) * 0.25
            w = w + mask
            sink = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
            logits = torch.cat([w, sink], dim=-1)
            logits = logits - logits.max(dim=-1, keepdim=True).values
            p = F.softmax(logits, dim=-1, dtype=logits.dtype)[..., :-1]
            p = F.dropout(p, p=0.0, training=True)
            return torch.matmul(p, v)

        q, k, v = qkv()
        g = torch.Generator().manual_seed(5)
        mask = torch.zeros(2, 1, 7, 9).masked_fill(torch.rand(2, 1, 7, 9, generator=g) > 0.7, torch.finfo(torch.float32).min)
        mask[1, :, 3] = torch.finfo(torch.float32).min  # a row with no visible key
        code, reps = self.run_rewritten(f, q, k, v, torch.randn(4, generator=g), mask)
        self.assertEqual(reps[0].spelling,
                         "matmul·mul(scale)·add(bias)·cat(sink)·sub(max)·softmax(fp32)·slice(keys)·dropout(off)·matmul")
        self.assertExpectedInline(code, """\
reshape = l_sinks_.reshape(1, -1, 1, 1)
sink = reshape.expand(2, -1, 7, -1)
fwd_default = torch.ops.flash.fwd.default(l_q_, l_k_, l_v_, l_mask_, None, 0, 0.25, 0.0)
getitem_3 = fwd_default[0]
getitem_4 = fwd_default[1]
unsqueeze = getitem_4.unsqueeze(-1)
sub_1 = unsqueeze - sink
sigmoid = torch.sigmoid(sub_1)
mul_1 = getitem_3 * sigmoid
return (mul_1,)""")

    @staticmethod
    def _granite_swa(q, k, v, mask, sinks):
        """transformers' Granite-SWA eager attention: the sink as sigmoid(logsumexp - sink)."""
        w = torch.matmul(q, k.transpose(2, 3)) * 0.25 + mask
        lse = torch.logsumexp(w, dim=-1)
        sink_scale = (lse - sinks.view(1, -1, 1)).to(torch.float32).sigmoid()
        p = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        p = F.dropout(p, p=0.0, training=True)
        out = torch.matmul(p, v)
        return out * sink_scale.unsqueeze(-1).to(out.dtype)

    def test_granite_swa_sinks_read_the_op_lse(self):
        """Granite-SWA's sinks read logsumexp(scores), which the op returns: the logsumexp
        reads the op's lse, what reads it moves after the op, and the scores are never
        materialised. Left padding leaves rows with no real key: eager's logsumexp there is that
        of the mask row (finfo.min + ln Nk = finfo.min), rebuilt from the mask, so the sink scale
        is 0 on both sides; values and every gradient (mask and sinks included) match."""
        q, k, v = qkv(nk=7)
        keep = torch.ones(2, 1, 7, 7, dtype=torch.bool).tril()
        keep[1, ..., :3] = False  # left padding: rows 0-2 of the second sequence see no key
        mask = torch.where(keep, 0.0, torch.finfo(torch.float32).min)
        sinks = torch.randn(4, generator=torch.Generator().manual_seed(3))
        code, reps = self.run_rewritten(self._granite_swa, q, k, v, mask, sinks)
        self.assertEqual(reps[0].spelling, "matmul·mul(scale)·add(bias)·logsumexp·softmax(fp32)·dropout(off)·matmul")
        self.assertExpectedInline(code, """\
view = l_sinks_.view(1, -1, 1)
fwd_default = torch.ops.flash.fwd.default(l_q_, l_k_, l_v_, l_mask_, None, 0, 0.25, 0.0)
getitem = fwd_default[1]
to_3 = l_mask_.to(torch.float32)
logsumexp_1 = torch.logsumexp(to_3, -1)
isneginf = torch.isneginf(getitem)
where = torch.where(isneginf, logsumexp_1, getitem)
to_4 = where.to(torch.float32)
getitem_1 = fwd_default[0]
getitem_2 = fwd_default[1]
isneginf_1 = torch.isneginf(getitem_2)
unsqueeze_1 = isneginf_1.unsqueeze(-1)
amax = l_mask_.amax(-1, keepdim = True)
eq = l_mask_ == amax
to_5 = eq.to(torch.float32)
matmul_2 = torch.matmul(to_5, l_v_)
sum_1 = to_5.sum(-1, keepdim = True)
truediv = matmul_2 / sum_1
isneginf_2 = torch.isneginf(amax)
where_1 = torch.where(isneginf_2, nan, truediv)
where_2 = torch.where(unsqueeze_1, where_1, getitem_1)
sub = to_4 - view
to = sub.to(torch.float32)
sink_scale = to.sigmoid()
unsqueeze = sink_scale.unsqueeze(-1)
to_2 = unsqueeze.to(torch.float32)
mul_1 = where_2 * to_2
return (mul_1,)""")
        self.assertNotIn("matmul(l_q_", code)

    def test_granite_swa_with_its_mask_built_in_the_graph(self):
        """HF builds the mask in the graph as where(keep, 0, finfo.min): a row the padding masks
        whole holds finfo.min alone in eager, whose logsumexp is finfo.min in float32."""

        def f(q, k, v, keep, sinks):
            return self._granite_swa(q, k, v, torch.where(keep, 0.0, torch.finfo(torch.float32).min), sinks)

        q, k, v = qkv(nk=7)
        keep = torch.ones(2, 1, 7, 7, dtype=torch.bool).tril()
        keep[1, ..., :3] = False
        code, reps = self.run_rewritten(f, q, k, v, keep, torch.randn(4))
        self.assertTrue(reps[0].rewritten)
        self.assertIn("torch.where(isneginf, -3.4028234663852886e+38, getitem)", code)

    def test_logsumexp_read_after_the_values_product(self):
        """A logsumexp taken after P·V already follows the op: it reads the op's lse in place."""

        def f(q, k, v):
            w = torch.matmul(q, k.transpose(2, 3)) * 0.25
            out = torch.matmul(w.softmax(-1), v)
            return out * torch.logsumexp(w, dim=-1, keepdim=True).sigmoid()

        code, reps = self.run_rewritten(f, *qkv())
        self.assertTrue(reps[0].rewritten, reps[0].line())
        self.assertNotIn("matmul", code)

    def test_logsumexp_read_before_a_mutation_is_refused(self):
        """What reads the scores' logsumexp moves after the op; a mutation cannot move."""

        def f(q, k, v, acc):
            w = torch.matmul(q, k.transpose(2, 3)) * 0.25
            acc.add_(torch.logsumexp(w, dim=-1).sum())
            return torch.matmul(w.softmax(-1), v)

        q, k, v = qkv()
        torch._dynamo.reset()
        reports = {}

        def capture(gm, ex):
            reports["r"] = rewrite_graph(gm)
            return gm.forward

        torch.compile(f, backend=capture)(q, k, v, torch.zeros(()))
        self.assertEqual([r.guard for r in reports["r"]], ["lse_reader"])

    def test_sinks_with_gqa_in_bf16(self):
        """GPT-OSS's own dtypes: bf16 logits and sinks (the max-shift keeps them from
        overflowing), grouped KV heads through repeat_kv."""

        def f(q, k, v, sinks):
            k = k[:, :, None].expand(2, 2, 2, 9, 16).reshape(2, 4, 9, 16)
            v = v[:, :, None].expand(2, 2, 2, 9, 16).reshape(2, 4, 9, 16)
            w = torch.matmul(q, k.transpose(2, 3)) * 0.25
            sink = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
            logits = torch.cat([w, sink], dim=-1)
            logits = logits - logits.max(dim=-1, keepdim=True).values
            return torch.matmul(F.softmax(logits, dim=-1, dtype=logits.dtype)[..., :-1], v)

        q, k, v = qkv(hkv=2, dtype=torch.bfloat16)
        _, reps = self.run_rewritten(f, q, k, v, torch.randn(4).bfloat16())
        self.assertIn("gqa", reps[0].spelling)

    def test_max_shifted_scores(self):
        """s - max(s) before the softmax, without sinks: a per-row shift the softmax ignores."""

        def f(q, k, v):
            w = torch.matmul(q, k.transpose(-1, -2)) / 4.0
            w = w - w.amax(-1, keepdim=True)
            return torch.matmul(w.softmax(-1), v)

        code, reps = self.run_rewritten(f, *qkv())
        self.assertEqual(reps[0].spelling, "matmul·truediv(scale)·sub(max)·softmax·matmul")
        self.assertExpectedInline(code, """\
fwd_default = torch.ops.flash.fwd.default(l_q_, l_k_, l_v_, None, None, 0, 0.25, 0.0)
getitem = fwd_default[0]
return (getitem,)""")

    def test_gemma2_logit_softcapping(self):
        """Gemma 2: scale, then cap·tanh(s / cap), then the additive mask."""

        def f(q, k, v, mask):
            w = torch.matmul(q, k.transpose(2, 3)) * 0.25
            w = w / 50.0
            w = torch.tanh(w)
            w = w * 50.0
            w = w + mask
            w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
            return torch.matmul(w, v)

        q, k, v = qkv()
        # Scores large enough that the cap bends them (tanh far from linear).
        q = q * 30
        mask = torch.zeros(2, 1, 7, 9).masked_fill(torch.rand(2, 1, 7, 9) > 0.7, torch.finfo(torch.float32).min)
        code, reps = self.run_rewritten(f, q, k, v, mask)
        self.assertEqual(reps[0].spelling, "matmul·mul(scale)·truediv(scale)·tanh(softcap)·mul(scale)·add(bias)·softmax(fp32)·matmul")
        self.assertExpectedInline(code, """\
fwd_default = torch.ops.flash.fwd.default(l_q_, l_k_, l_v_, l_mask_, None, 0, 0.25, 0.0, 50.0)
getitem = fwd_default[0]
getitem_1 = fwd_default[1]
isneginf = torch.isneginf(getitem_1)
unsqueeze = isneginf.unsqueeze(-1)
amax = l_mask_.amax(-1, keepdim = True)
eq = l_mask_ == amax
to_1 = eq.to(torch.float32)
matmul_2 = torch.matmul(to_1, l_v_)
sum_1 = to_1.sum(-1, keepdim = True)
truediv_1 = matmul_2 / sum_1
isneginf_1 = torch.isneginf(amax)
where = torch.where(isneginf_1, nan, truediv_1)
where_1 = torch.where(unsqueeze, where, getitem)
return (where_1,)""")

    def test_xlm_in_place_fill_with_mask_expanded_as_the_scores(self):
        """XLM: `mask.view(...).expand_as(scores)` reads only the scores' shape, then the scores
        are filled in place with finfo.min and soft-maxed in float32."""

        def f(q, k, v, key_mask):
            scores = torch.matmul(q / 4.0, k.transpose(2, 3))
            mask = (key_mask == 0).view(2, 1, 1, 9).expand_as(scores)
            scores.masked_fill_(mask, torch.finfo(scores.dtype).min)
            weights = F.softmax(scores.float(), dim=-1).type_as(scores)
            return torch.matmul(weights, v)

        q, k, v = qkv()
        key_mask = torch.ones(2, 9)
        key_mask[1, 6:] = 0
        code, reps = self.run_rewritten(f, q, k, v, key_mask)
        self.assertTrue(reps[0].rewritten, reps[0].line())
        self.assertExpectedInline(code, """\
truediv = l_q_ / 4.0
eq = l_key_mask_ == 0
view = eq.view(2, 1, 1, 9)
logical_not = torch.logical_not(view)
logical_not_1 = torch.logical_not(logical_not)
all_1 = logical_not_1.all(-1, keepdim = True)
fwd_default = torch.ops.flash.fwd.default(truediv, l_k_, l_v_, logical_not, None, 0, 1.0, 0.0)
getitem = fwd_default[0]
mean = l_v_.mean(-2, keepdim = True)
where = torch.where(all_1, mean, getitem)
return (where,)""")

    def test_moe_router_softmax_is_not_an_attention_site(self):
        """Mixtral-style: a router's softmax over expert logits (from a Linear) beside attention."""

        def f(q, k, v, router_weight):
            o = torch.matmul((torch.matmul(q, k.transpose(-1, -2)) * 0.25).softmax(-1), v)
            gates = F.softmax(F.linear(o, router_weight), dim=-1, dtype=torch.float32)
            return o * gates.amax(-1, keepdim=True)

        code, reps = self.run_rewritten(f, *qkv(), torch.randn(4, 16))
        self.assertEqual(len(reps), 1)  # the attention site only; the router is not reported
        self.assertTrue(reps[0].rewritten)

    def test_router_weights_mixed_into_the_next_layer_are_not_a_site(self):
        """A router's weights scale the expert output elementwise, which then feeds the next
        layer's q·kᵀ: that product is not P·V (only layout, casts and dropout carry P there)."""

        def f(x, w_router, w_q):
            gates = F.softmax(F.linear(x, w_router), dim=-1)
            h = x * gates.amax(-1, keepdim=True)
            q = F.linear(h, w_q)
            return torch.matmul(q, q.transpose(-1, -2))

        torch._dynamo.reset()
        seen = {}

        def capture(gm, example_inputs):
            seen["reports"] = rewrite_graph(gm)
            return gm.forward

        x = torch.randn(2, 5, 8)
        torch.compile(f, backend=capture, fullgraph=True)(x, torch.randn(4, 8), torch.randn(8, 8))
        self.assertEqual(seen["reports"], [])

    def test_probabilities_zeroed_in_place_where_the_fill_masked(self):
        """SEW-D's XSoftmax: fill with finfo.min, softmax, then `p.masked_fill_(rmask, 0)` with
        the same mask. Exact: zero where softmax already gave 0, and the whole of a fully masked
        row, which the op gives as 0 too (eager's softmax alone would average V there)."""

        def f(q, k, v, keep):
            rmask = ~keep
            s = torch.matmul(q, k.transpose(-1, -2)) / 4.0
            s = s.masked_fill(rmask, torch.tensor(torch.finfo(s.dtype).min))
            p = torch.softmax(s, -1)
            p.masked_fill_(rmask, 0)
            return torch.matmul(F.dropout(p, 0.1, training=False), v)

        q, k, v = qkv()
        keep = torch.rand(2, 1, 7, 9) > 0.4
        keep[1, :, 3] = False  # a fully masked query row
        # No gradients: eager cannot take them through the in-place update of softmax's output
        # (SEW-D runs this only in inference; its training path is an autograd.Function).
        code, reps = self.run_rewritten(f, q, k, v, keep, grads=False)
        self.assertTrue(reps[0].rewritten, reps[0].line())
        self.assertIn("masked_fill(probs, 0)", reps[0].spelling)
        self.assertExpectedInline(code, """\
rmask = ~l_keep_
tensor = torch.tensor(-3.4028234663852886e+38)
logical_not = torch.logical_not(rmask)
fwd_default = torch.ops.flash.fwd.default(l_q_, l_k_, l_v_, logical_not, None, 0, 0.25, 0.0)
getitem = fwd_default[0]
return (getitem,)""")

    def test_probabilities_zeroed_beside_a_bias(self):
        """SEW-D's default config: a relative bias added before the fill. Rows the op reports
        fully masked get eager's own arithmetic: a row the fill masks whole is 0; a row whose
        other keys hold biases <= -1e30 averages V over the largest of them; a row whose other
        keys hold exactly the fill's value shares the normaliser with the zeroed keys."""
        big = torch.finfo(torch.float32).min

        def f(q, k, v, keep, rel):
            rmask = ~keep
            s = torch.matmul(q, k.transpose(-1, -2)) / 4.0 + rel
            s = s.masked_fill(rmask, torch.tensor(big))
            p = torch.softmax(s, -1)
            p.masked_fill_(rmask, 0)
            return torch.matmul(p, v)

        q, k, v = qkv()
        keep = torch.rand(2, 1, 7, 9) > 0.4
        keep[:, :, :, 0] = True
        rel = torch.randn(2, 4, 7, 9)
        keep[0, :, 1] = False  # masked whole by the fill
        rel[0, :, 2] = -1e30  # every kept key of the row "masked" by the bias: eager averages them
        rel[0, :, 2, 0] = -5e29  # ... over its largest
        keep[1, :, 3, 4:] = False  # kept keys at exactly the fill's value
        rel[1, :, 3, :4] = big
        code, reps = self.run_rewritten(f, q, k, v, keep, rel, grads=False)
        self.assertTrue(reps[0].rewritten, reps[0].line())
        self.assertIn("masked_fill(probs, 0)", reps[0].spelling)

    def test_probabilities_zeroed_after_an_inf_fill_beside_a_bias_are_refused(self):
        def f(q, k, v, keep, rel):
            rmask = ~keep
            s = (torch.matmul(q, k.transpose(-1, -2)) + rel).masked_fill(rmask, float("-inf"))
            p = torch.softmax(s, -1)
            p.masked_fill_(rmask, 0)
            return torch.matmul(p, v)

        q, k, v = qkv()
        keep = torch.rand(2, 1, 7, 9) > 0.4
        keep[..., 0] = True
        self.assert_not_rewritten(f, q, k, v, keep, torch.randn(2, 4, 7, 9), guard="probs_fill")

    def test_probabilities_zeroed_by_another_mask_are_refused(self):
        def f(q, k, v, keep, other):
            s = torch.matmul(q, k.transpose(-1, -2)).masked_fill(~keep, torch.finfo(torch.float32).min)
            p = torch.softmax(s, -1)
            p.masked_fill_(other, 0)
            return torch.matmul(p, v)

        q, k, v = qkv()
        self.assert_not_rewritten(f, q, k, v, torch.rand(2, 1, 7, 9) > 0.4, torch.rand(2, 1, 7, 9) > 0.9,
                                  guard="probs_fill")

    def test_xsoftmax_function_is_inlined_and_rewritten(self):
        """SEW-D's XSoftmax in training: an autograd.Function (fill, softmax, zero the filled
        entries in place; backward `_softmax_backward_data` of its output) is autograd's own
        gradient of its forward, so its forward replaces it in the graph and the site is
        rewritten: values and gradients against eager running the Function."""

        class XSoftmax(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, mask):
                rmask = ~(mask.to(torch.bool))
                out = x.masked_fill(rmask, torch.tensor(torch.finfo(x.dtype).min))
                out = torch.softmax(out, -1)
                out.masked_fill_(rmask, 0)
                ctx.save_for_backward(out)
                return out

            @staticmethod
            def backward(ctx, grad):
                (out,) = ctx.saved_tensors
                return torch._softmax_backward_data(grad, out, -1, out.dtype), None

        def f(q, k, v, mask, rel):
            s = torch.matmul(q, k.transpose(-1, -2)) / 4.0 + rel
            return torch.matmul(XSoftmax.apply(s, mask), v)

        q, k, v = qkv()
        mask = (torch.rand(2, 1, 7, 9) > 0.4).int()
        mask[1, :, 2] = 0  # a fully masked row
        rel = torch.randn(2, 4, 7, 9, requires_grad=True)
        code, reps = self.run_rewritten(f, q, k, v, mask, rel)
        self.assertTrue(reps[0].rewritten, reps[0].line())
        self.assertIn("masked_fill(probs, 0)", reps[0].spelling)
        self.assertNotIn("autograd_function_apply", code)

    def test_functions_whose_backward_is_not_autograds_stay_whole(self):
        """Not inlined, reported: a Function zeroing entries the fill did not mask (its saved-output
        backward then differs from autograd's gradient), and one given a second input that
        requires grad (the Function gives it none; inlined, it would get one)."""

        def xsoftmax(zero_other):
            class F_(torch.autograd.Function):
                @staticmethod
                def forward(ctx, x, mask, other):
                    out = torch.softmax(x.masked_fill(~mask, -1e30), -1)
                    out.masked_fill_(other if zero_other else ~mask, 0)
                    ctx.save_for_backward(out)
                    return out

                @staticmethod
                def backward(ctx, grad):
                    (out,) = ctx.saved_tensors
                    return torch._softmax_backward_data(grad, out, -1, out.dtype), None, None

            return F_

        mask = torch.rand(2, 1, 7, 9) > 0.3
        for zero_other, other in ((True, torch.rand(2, 1, 7, 9) > 0.8), (False, torch.rand(2, 1, 7, 9).requires_grad_())):
            fn = xsoftmax(zero_other)

            def f(q, k, v, mask, other):
                return torch.matmul(fn.apply(torch.matmul(q, k.transpose(-1, -2)), mask, other), v)

            q, k, v = (t.requires_grad_() for t in qkv())
            self.assert_not_rewritten(f, q, k, v, mask, other, guard="autograd_function")

    def test_dropout_function_on_probabilities_becomes_the_ops_dropout(self):
        """SEW-D's StableDropout in training: a Function drawing its own keep mask
        (`1 - bernoulli_(1 - p)`, masked_fill, scale forward; the same mask and scale on the
        gradient) is F.dropout in distribution and gradient, so on a softmax's output it is replaced
        by that call and the op carries the rate. A Function whose backward is anything else (here
        it forgets the mask) keeps its own and the site is refused."""

        def stable_dropout(masked_grad):
            class XDropout(torch.autograd.Function):
                @staticmethod
                def forward(ctx, x):
                    mask = (1 - torch.empty_like(x).bernoulli_(1 - 0.25)).to(torch.bool)
                    ctx.save_for_backward(mask)
                    return x.masked_fill(mask, 0) * (1.0 / (1 - 0.25))

                @staticmethod
                def backward(ctx, grad):
                    (mask,) = ctx.saved_tensors
                    if masked_grad:
                        grad = grad.masked_fill(mask, 0)
                    return grad * (1.0 / (1 - 0.25))

            return XDropout

        for masked_grad in (True, False):
            drop = stable_dropout(masked_grad)

            def f(q, k, v):
                return torch.matmul(drop.apply(torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / 4.0, -1)), v)

            # (No comparison of values with eager: the masks are random.)
            q, k, v = (t.requires_grad_() for t in qkv())
            out, (rep,), code = self.rewrite_only(f, q, k, v)
            if not masked_grad:
                self.assertFalse(rep.rewritten)
                self.assertEqual(rep.guard, "probs_to_values", rep.line())
                self.assertIn("autograd_function_apply", code)
                continue
            self.assertTrue(rep.rewritten, rep.line())
            self.assertIn("softmax·dropout", rep.spelling)
            self.assertNotIn("autograd_function_apply", code)
            self.assertIn("0.25", code)  # the op's dropout_p
            out.sum().backward()
            self.assertTrue(torch.isfinite(out).all() and all(torch.isfinite(t.grad).all() for t in (q, k, v)))

    def test_softmax_inside_an_autograd_function_is_reported(self):
        """SEW-D in training: XSoftmax is a torch.autograd.Function, traced as one
        autograd_function_apply node; its softmax is counted and refused by name."""

        class MaskedSoftmax(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, keep):
                p = torch.softmax(x.masked_fill(~keep, -1e30), -1)
                ctx.save_for_backward(p)
                return p

            @staticmethod
            def backward(ctx, g):
                (p,) = ctx.saved_tensors
                return p * (g - (g * p).sum(-1, keepdim=True)), None

        def f(q, k, v, keep):
            return torch.matmul(MaskedSoftmax.apply(torch.matmul(q, k.transpose(-1, -2)), keep), v)

        q, k, v = (t.requires_grad_() for t in qkv())
        self.assert_not_rewritten(f, q, k, v, torch.rand(2, 1, 7, 9) > 0.3, guard="autograd_function")

    def test_banded_scores_are_reported_not_silent(self):
        """Longformer: sliding-window scores gathered into [B, H, N, 2w + 1] (no [N, N] product
        upstream of the softmax), probabilities laid out again and multiplied with windows of
        the values. The op cannot take it; the site is counted and refused by name."""
        w = 2

        def f(q, k, v):
            n = q.shape[-2]
            kp = F.pad(k, (0, 0, w, w))  # keys j - w .. j + w for each query j
            windows = kp.unfold(-2, 2 * w + 1, 1)  # [B, H, N, D, 2w + 1]
            scores = (q.unsqueeze(-2) @ windows).squeeze(-2) * 0.25  # [B, H, N, 2w + 1]
            probs = F.dropout(F.softmax(scores, dim=-1), p=0.1, training=False)
            vwin = F.pad(v, (0, 0, w, w)).unfold(-2, 2 * w + 1, 1)  # [B, H, N, D, 2w + 1]
            return torch.einsum("bhnw,bhndw->bhnd", probs.contiguous(), vwin)

        self.assert_not_rewritten(f, *qkv(nq=9), guard="scores_not_a_product")

    def test_xglm_views_and_clamp_at_finfo_min(self):
        """XGLM: bmm in 3-D, a 4-D view to add the mask, `torch.max(s, finfo.min)`, a view back
        to 3-D before the softmax, and a 4-D/3-D round trip on the probabilities."""

        def f(q3, k3, v3, keep):
            mask = torch.where(keep, 0.0, torch.finfo(torch.float32).min)  # built in-graph, as HF does
            w = torch.bmm(q3 * 0.25, k3.transpose(1, 2))
            w = w.view(2, 4, 7, 9) + mask
            w = torch.max(w, torch.full((), torch.finfo(w.dtype).min, dtype=w.dtype))
            w = w.view(8, 7, 9)
            w = F.softmax(w, dim=-1)
            w = w.view(2, 4, 7, 9).view(8, 7, 9)
            return torch.bmm(F.dropout(w, p=0.1, training=False), v3)

        q, k, v = qkv()
        q3, k3, v3 = (t.reshape(8, t.shape[2], 16) for t in (q, k, v))
        code, reps = self.run_rewritten(f, q3, k3, v3, torch.rand(2, 1, 7, 9) > 0.3)
        self.assertTrue(reps[0].rewritten, reps[0].line())
        self.assertIn("max(floor)", reps[0].spelling)
        self.assertExpectedInline(code, """\
mask = torch.where(l_keep_, 0.0, -3.4028234663852886e+38)
mul = l_q3_ * 0.25
unflatten = mul.unflatten(-3, (2, 4))
unflatten_1 = l_k3_.unflatten(-3, (2, 4))
unflatten_2 = l_v3_.unflatten(-3, (2, 4))
le = mask <= -1e+30
all_1 = le.all(-1, keepdim = True)
fwd_default = torch.ops.flash.fwd.default(unflatten, unflatten_1, unflatten_2, mask, None, 0, 1.0, 0.0)
getitem = fwd_default[0]
mean = unflatten_2.mean(-2, keepdim = True)
where_1 = torch.where(all_1, mean, getitem)
flatten = where_1.flatten(0, 1)
return (flatten,)""")

    def test_key_already_transposed_by_a_view(self):
        """SqueezeBERT: k comes from a conv as [B, C, N], viewed straight to [B, H, D, N]."""

        def f(q, k_conv, v):
            k_t = k_conv.view(2, 4, 16, 9)
            w = torch.matmul(q, k_t) / 4.0
            return torch.matmul(w.softmax(-1), v)

        q, k, v = qkv()
        code, reps = self.run_rewritten(f, q, torch.randn(2, 64, 9), v)
        self.assertTrue(reps[0].rewritten, reps[0].line())
        self.assertExpectedInline(code, """\
k_t = l_k_conv_.view(2, 4, 16, 9)
transpose = k_t.transpose(-1, -2)
fwd_default = torch.ops.flash.fwd.default(l_q_, transpose, l_v_, None, None, 0, 0.25, 0.0)
getitem = fwd_default[0]
return (getitem,)""")

    def test_at_operator_divide_by_sqrt_d(self):
        def f(q, k, v):
            return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.size(-1)), dim=-1) @ v

        code, _ = self.run_rewritten(f, *qkv())
        self.assertExpectedInline(code, """\
fwd_default = torch.ops.flash.fwd.default(l_q_, l_k_, l_v_, None, None, 0, 0.25, 0.0)
getitem = fwd_default[0]
return (getitem,)""")

    def test_bmm_three_d_layout(self):
        """BART / Whisper / OPT: [B*H, N, D] with bmm, bias added in 3-D."""

        def f(q, k, v, bias):
            w = torch.bmm(q * 0.25, k.transpose(1, 2))
            w = w + bias
            return torch.bmm(F.softmax(w, dim=-1), v)

        q, k, v = (t.reshape(8, t.shape[2], 16) for t in qkv())
        bias = torch.randn(8, 7, 9)
        code, reps = self.run_rewritten(f, q, k, v, bias)
        self.assertExpectedInline(code, """\
mul = l_q_ * 0.25
unsqueeze = mul.unsqueeze(1)
unsqueeze_1 = l_k_.unsqueeze(1)
unsqueeze_2 = l_v_.unsqueeze(1)
unsqueeze_3 = l_bias_.unsqueeze(1)
fwd_default = torch.ops.flash.fwd.default(unsqueeze, unsqueeze_1, unsqueeze_2, unsqueeze_3, None, 0, 1.0, 0.0)
getitem = fwd_default[0]
getitem_1 = fwd_default[1]
isneginf = torch.isneginf(getitem_1)
unsqueeze_4 = isneginf.unsqueeze(-1)
amax = unsqueeze_3.amax(-1, keepdim = True)
eq = unsqueeze_3 == amax
to = eq.to(torch.float32)
matmul = torch.matmul(to, unsqueeze_2)
sum_1 = to.sum(-1, keepdim = True)
truediv = matmul / sum_1
isneginf_1 = torch.isneginf(amax)
where = torch.where(isneginf_1, nan, truediv)
where_1 = torch.where(unsqueeze_4, where, getitem)
squeeze = where_1.squeeze(1)
return (squeeze,)""")

    def test_einsum(self):
        def f(q, k, v):
            w = torch.einsum("bhqd,bhkd->bhqk", q, k) * 0.25
            return torch.einsum("bhqk,bhkd->bhqd", w.softmax(-1), v)

        code, _ = self.run_rewritten(f, *qkv())
        self.assertExpectedInline(code, """\
fwd_default = torch.ops.flash.fwd.default(l_q_, l_k_, l_v_, None, None, 0, 0.25, 0.0)
getitem = fwd_default[0]
return (getitem,)""")

    def test_einsum_in_the_projections_layout(self):
        """q, k, v as the projections give them, [B, N, H, D], and the key first: the op reads
        them through permuted views, and the output comes back as the einsum wrote it."""

        def f(q, k, v):
            w = torch.einsum("bkhd,bqhd->bhqk", k, q) * 0.25
            return torch.einsum("bkhd,bhqk->bqhd", v, w.softmax(-1))

        q, k, v = (t.transpose(1, 2) for t in qkv())
        code, reps = self.run_rewritten(f, q, k, v)
        self.assertEqual(reps[0].spelling, "einsum·mul(scale)·softmax·einsum")
        self.assertExpectedInline(code, """\
permute = l_q_.permute(0, 2, 1, 3)
permute_1 = l_k_.permute(0, 2, 1, 3)
permute_2 = l_v_.permute(0, 2, 1, 3)
fwd_default = torch.ops.flash.fwd.default(permute, permute_1, permute_2, None, None, 0, 0.25, 0.0)
getitem = fwd_default[0]
permute_3 = getitem.permute(0, 2, 1, 3)
return (permute_3,)""")

    def test_einsum_scores_with_heads_between_queries_and_keys(self):
        """Scores laid out [B, Nq, H, Nk] (the softmax is still over the keys): the bias added in
        that layout, [Nq, 1, Nk] here, is permuted with them to broadcast against [B, H, Nq, Nk]."""

        def f(q, k, v, bias):
            w = torch.einsum("bqhd,bkhd->bqhk", q, k) + bias
            return torch.einsum("bqhk,bkhd->bqhd", w.softmax(-1), v)

        q, k, v = (t.transpose(1, 2) for t in qkv())
        code, reps = self.run_rewritten(f, q, k, v, torch.randn(7, 1, 9))
        self.assertEqual(reps[0].spelling, "einsum·add(bias)·softmax·einsum")
        self.assertExpectedInline(code, """\
permute = l_q_.permute(0, 2, 1, 3)
permute_1 = l_k_.permute(0, 2, 1, 3)
permute_2 = l_v_.permute(0, 2, 1, 3)
getitem = l_bias_[(None, Ellipsis)]
permute_3 = getitem.permute(0, 2, 1, 3)
fwd_default = torch.ops.flash.fwd.default(permute, permute_1, permute_2, permute_3, None, 0, 1.0, 0.0)
getitem_1 = fwd_default[0]
getitem_2 = fwd_default[1]
isneginf = torch.isneginf(getitem_2)
unsqueeze = isneginf.unsqueeze(-1)
amax = permute_3.amax(-1, keepdim = True)
eq = permute_3 == amax
to = eq.to(torch.float32)
matmul = torch.matmul(to, permute_2)
sum_1 = to.sum(-1, keepdim = True)
truediv = matmul / sum_1
isneginf_1 = torch.isneginf(amax)
where = torch.where(isneginf_1, nan, truediv)
where_1 = torch.where(unsqueeze, where, getitem_1)
permute_4 = where_1.permute(0, 2, 1, 3)
return (permute_4,)""")

    def test_einsum_longt5_local_attention_in_blocks(self):
        """LongT5's local attention: queries in blocks, keys and values the 3 blocks around each
        (`_concatenate_3_blocks`), 5-D einsums over [batch, block, ...], a learned position bias
        plus a local mask with its own block dims, softmax in float32, dropout. The batch and
        block dims merge into the op's batch as views; the bias's too."""
        bl = 3

        def blocks(x):  # [B, N, H, D] -> [B, N / bl, bl, H, D]
            return x.reshape(x.shape[0], -1, bl, *x.shape[2:])

        def three_blocks(x):  # [B, nb, bl, H, D] -> [B, nb, 3·bl, H, D]: each block with its neighbours
            nb = x.shape[1]
            x = F.pad(x, (0, 0, 0, 0, 0, 0, 1, 1))
            return torch.cat([x[:, i:i + nb] for i in range(3)], dim=2)

        def f(q, k, v, pos, keep):
            q, k, v = blocks(q), three_blocks(blocks(k)), three_blocks(blocks(v))
            scores = torch.einsum("...qhd,...khd->...hqk", q, k)
            scores += pos + torch.where(keep, 0.0, -1e10).transpose(1, 2)
            w = F.softmax(scores.float(), dim=-1).type_as(scores)
            w = F.dropout(w, p=0.1, training=False)
            return torch.einsum("...hqk,...khd->...qhd", w.type(v.dtype), v)

        b, n, h, d = 2, 6, 4, 8
        g = torch.Generator().manual_seed(5)
        q, k, v = (torch.randn(b, n, h, d, generator=g) for _ in range(3))
        pos = torch.randn(1, 1, h, bl, 3 * bl, generator=g)
        keep = torch.rand(b, 1, n // bl, bl, 3 * bl, generator=g) > 0.4
        keep[..., range(bl), range(bl, 2 * bl)] = True  # every query sees itself, as in LongT5
        code, reps = self.run_rewritten(f, q, k, v, pos, keep)
        self.assertEqual(reps[0].spelling, "einsum·iadd(bias)·softmax·dropout(off)·einsum")
        self.assertExpectedInline(code, """\
q = l_q_.reshape(2, -1, 3, 4, 8)
reshape_1 = l_k_.reshape(2, -1, 3, 4, 8)
pad = torch._C._nn.pad(reshape_1, (0, 0, 0, 0, 0, 0, 1, 1), 'constant', None)
getitem = pad[(slice(None, None, None), slice(0, 2, None))]
getitem_1 = pad[(slice(None, None, None), slice(1, 3, None))]
getitem_2 = pad[(slice(None, None, None), slice(2, 4, None))]
k = torch.cat([getitem, getitem_1, getitem_2], dim = 2)
reshape_2 = l_v_.reshape(2, -1, 3, 4, 8)
pad_1 = torch._C._nn.pad(reshape_2, (0, 0, 0, 0, 0, 0, 1, 1), 'constant', None)
getitem_3 = pad_1[(slice(None, None, None), slice(0, 2, None))]
getitem_4 = pad_1[(slice(None, None, None), slice(1, 3, None))]
getitem_5 = pad_1[(slice(None, None, None), slice(2, 4, None))]
v = torch.cat([getitem_3, getitem_4, getitem_5], dim = 2)
where = torch.where(l_keep_, 0.0, -10000000000.0)
transpose = where.transpose(1, 2)
add = l_pos_ + transpose
permute = q.permute(0, 1, 3, 2, 4)
flatten = permute.flatten(0, 1)
permute_1 = k.permute(0, 1, 3, 2, 4)
flatten_1 = permute_1.flatten(0, 1)
permute_2 = v.permute(0, 1, 3, 2, 4)
flatten_2 = permute_2.flatten(0, 1)
flatten_3 = add.flatten(0, 1)
fwd_default = torch.ops.flash.fwd.default(flatten, flatten_1, flatten_2, flatten_3, None, 0, 1.0, 0.0)
getitem_6 = fwd_default[0]
getitem_7 = fwd_default[1]
isneginf = torch.isneginf(getitem_7)
unsqueeze = isneginf.unsqueeze(-1)
amax = flatten_3.amax(-1, keepdim = True)
eq = flatten_3 == amax
to = eq.to(torch.float32)
matmul = torch.matmul(to, flatten_2)
sum_1 = to.sum(-1, keepdim = True)
truediv = matmul / sum_1
isneginf_1 = torch.isneginf(amax)
where_1 = torch.where(isneginf_1, nan, truediv)
where_2 = torch.where(unsqueeze, where_1, getitem_6)
unflatten = where_2.unflatten(0, (2, 2))
permute_3 = unflatten.permute(0, 1, 3, 2, 4)
return (permute_3,)""")

    def test_einsum_blocks_with_a_bias_shared_by_the_blocks(self):
        """A bias per batch entry and head but shared by the blocks ([B, 1, H, Nq, Nk] against
        [B, blocks, H, Nq, Nk]): no stride makes batch·blocks one dim of it, so it is expanded
        and copied (as large as the scores eager builds), and the spelling says so."""

        def f(q, k, v, bias):
            w = torch.einsum("...qhd,...khd->...hqk", q, k) * 0.25 + bias
            return torch.einsum("...hqk,...khd->...qhd", w.softmax(-1), v)

        g = torch.Generator().manual_seed(1)
        q = torch.randn(2, 3, 4, 2, 8, generator=g)
        k, v = (torch.randn(2, 3, 5, 2, 8, generator=g) for _ in range(2))
        code, reps = self.run_rewritten(f, q, k, v, torch.randn(2, 1, 2, 4, 5, generator=g))
        self.assertEqual(reps[0].spelling, "einsum·mul(scale)·add(bias)·softmax·einsum·copy(bias)")
        self.assertExpectedInline(code, """\
permute = l_q_.permute(0, 1, 3, 2, 4)
flatten = permute.flatten(0, 1)
permute_1 = l_k_.permute(0, 1, 3, 2, 4)
flatten_1 = permute_1.flatten(0, 1)
permute_2 = l_v_.permute(0, 1, 3, 2, 4)
flatten_2 = permute_2.flatten(0, 1)
expand = l_bias_.expand(2, 3, -1, -1, -1)
flatten_3 = expand.flatten(0, 1)
fwd_default = torch.ops.flash.fwd.default(flatten, flatten_1, flatten_2, flatten_3, None, 0, 0.25, 0.0)
getitem = fwd_default[0]
getitem_1 = fwd_default[1]
isneginf = torch.isneginf(getitem_1)
unsqueeze = isneginf.unsqueeze(-1)
amax = flatten_3.amax(-1, keepdim = True)
eq = flatten_3 == amax
to = eq.to(torch.float32)
matmul = torch.matmul(to, flatten_2)
sum_1 = to.sum(-1, keepdim = True)
truediv = matmul / sum_1
isneginf_1 = torch.isneginf(amax)
where = torch.where(isneginf_1, nan, truediv)
where_1 = torch.where(unsqueeze, where, getitem)
unflatten = where_1.unflatten(0, (2, 3))
permute_3 = unflatten.permute(0, 1, 3, 2, 4)
return (permute_3,)""")

    def test_baddbmm_alibi(self):
        """BLOOM: baddbmm(alibi, q, kᵀ, beta=1, alpha=1/sqrt(d))."""

        def f(q, k, v, alibi):
            w = torch.baddbmm(alibi, q, k.transpose(1, 2), beta=1.0, alpha=0.25)
            return torch.bmm(F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype), v)

        q, k, v = (t.reshape(8, t.shape[2], 16) for t in qkv())
        alibi = torch.randn(8, 1, 9)
        code, reps = self.run_rewritten(f, q, k, v, alibi)
        self.assertEqual(reps[0].spelling, "baddbmm·softmax(fp32)·bmm")
        self.assertExpectedInline(code, """\
unsqueeze = l_q_.unsqueeze(1)
unsqueeze_1 = l_k_.unsqueeze(1)
unsqueeze_2 = l_v_.unsqueeze(1)
unsqueeze_3 = l_alibi_.unsqueeze(1)
fwd_default = torch.ops.flash.fwd.default(unsqueeze, unsqueeze_1, unsqueeze_2, unsqueeze_3, None, 0, 0.25, 0.0)
getitem = fwd_default[0]
getitem_1 = fwd_default[1]
isneginf = torch.isneginf(getitem_1)
unsqueeze_4 = isneginf.unsqueeze(-1)
amax = unsqueeze_3.amax(-1, keepdim = True)
eq = unsqueeze_3 == amax
to_1 = eq.to(torch.float32)
matmul = torch.matmul(to_1, unsqueeze_2)
sum_1 = to_1.sum(-1, keepdim = True)
truediv = matmul / sum_1
isneginf_1 = torch.isneginf(amax)
where = torch.where(isneginf_1, nan, truediv)
where_1 = torch.where(unsqueeze_4, where, getitem)
squeeze = where_1.squeeze(1)
return (squeeze,)""")

    def test_bloom_views_between_3d_and_4d(self):
        """BLOOM: 3-D baddbmm scores viewed as [B, H, Nq, Nk] for the mask, probabilities viewed
        back to 3-D for bmm."""

        def f(q, k, v, alibi, mask):
            scores = alibi.baddbmm(batch1=q, batch2=k.transpose(1, 2), beta=1.0, alpha=0.25)
            w = scores.view(2, 4, 7, -1) + mask
            p = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
            return torch.bmm(p.view(8, 7, -1), v)

        q, k, v = (t.reshape(8, t.shape[2], 16) for t in qkv())
        alibi = torch.randn(8, 1, 9)
        mask = torch.zeros(2, 1, 7, 9).masked_fill(torch.rand(2, 1, 7, 9) > 0.7, torch.finfo(torch.float32).min)
        code, reps = self.run_rewritten(f, q, k, v, alibi, mask)
        self.assertEqual(reps[0].spelling, "baddbmm·view(heads)·add(bias)·softmax(fp32)·view(heads)·bmm")
        self.assertExpectedInline(code, """\
unflatten = l_q_.unflatten(-3, (2, 4))
unflatten_1 = l_k_.unflatten(-3, (2, 4))
unflatten_2 = l_v_.unflatten(-3, (2, 4))
unflatten_3 = l_alibi_.unflatten(-3, (2, 4))
add_1 = unflatten_3 + l_mask_
fwd_default = torch.ops.flash.fwd.default(unflatten, unflatten_1, unflatten_2, add_1, None, 0, 0.25, 0.0)
getitem = fwd_default[0]
getitem_1 = fwd_default[1]
isneginf = torch.isneginf(getitem_1)
unsqueeze = isneginf.unsqueeze(-1)
amax = add_1.amax(-1, keepdim = True)
eq = add_1 == amax
to_1 = eq.to(torch.float32)
matmul = torch.matmul(to_1, unflatten_2)
sum_1 = to_1.sum(-1, keepdim = True)
truediv = matmul / sum_1
isneginf_1 = torch.isneginf(amax)
where = torch.where(isneginf_1, nan, truediv)
where_1 = torch.where(unsqueeze, where, getitem)
flatten = where_1.flatten(0, 1)
return (flatten,)""")

    def test_no_scale_bias_on_the_left(self):
        """T5: queries pre-scaled at init, no scale; position bias added as `bias + scores`."""

        def f(q, k, v, pos):
            w = pos + torch.matmul(q, k.transpose(3, 2))
            return torch.matmul(F.softmax(w.float(), dim=-1).type_as(w), v)

        q, k, v = qkv()
        code, _ = self.run_rewritten(f, q, k, v, torch.randn(1, 4, 7, 9))
        self.assertExpectedInline(code, """\
fwd_default = torch.ops.flash.fwd.default(l_q_, l_k_, l_v_, l_pos_, None, 0, 1.0, 0.0)
getitem = fwd_default[0]
getitem_1 = fwd_default[1]
isneginf = torch.isneginf(getitem_1)
unsqueeze = isneginf.unsqueeze(-1)
amax = l_pos_.amax(-1, keepdim = True)
eq = l_pos_ == amax
to = eq.to(torch.float32)
matmul_2 = torch.matmul(to, l_v_)
sum_1 = to.sum(-1, keepdim = True)
truediv = matmul_2 / sum_1
isneginf_1 = torch.isneginf(amax)
where = torch.where(isneginf_1, nan, truediv)
where_1 = torch.where(unsqueeze, where, getitem)
return (where_1,)""")

    def test_bias_added_before_scale(self):
        def f(q, k, v, bias):
            w = (torch.matmul(q, k.transpose(-1, -2)) + bias) / 4.0
            return torch.matmul(w.softmax(-1), v)

        q, k, v = qkv()
        code, _ = self.run_rewritten(f, q, k, v, torch.randn(2, 4, 7, 9))
        self.assertExpectedInline(code, """\
truediv_1 = l_bias_ / 4.0
fwd_default = torch.ops.flash.fwd.default(l_q_, l_k_, l_v_, truediv_1, None, 0, 0.25, 0.0)
getitem = fwd_default[0]
getitem_1 = fwd_default[1]
isneginf = torch.isneginf(getitem_1)
unsqueeze = isneginf.unsqueeze(-1)
amax = truediv_1.amax(-1, keepdim = True)
eq = truediv_1 == amax
to = eq.to(torch.float32)
matmul_2 = torch.matmul(to, l_v_)
sum_1 = to.sum(-1, keepdim = True)
truediv_2 = matmul_2 / sum_1
isneginf_1 = torch.isneginf(amax)
where = torch.where(isneginf_1, nan, truediv_2)
where_1 = torch.where(unsqueeze, where, getitem)
return (where_1,)""")

    def test_masked_fill_neg_inf_causal(self):
        """GPT-style: a causal tril mask filled with -inf becomes a keep-mask."""

        def f(q, k, v, causal):
            w = torch.matmul(q, k.transpose(-1, -2)) * 0.25
            w = w.masked_fill(causal == 0, float("-inf"))
            return torch.matmul(F.softmax(w, dim=-1), v)

        q, k, v = qkv(nk=7)
        causal = torch.tril(torch.ones(7, 7))
        code, reps = self.run_rewritten(f, q, k, v, causal)
        self.assertIn("masked_fill", reps[0].spelling)
        # The -inf fill becomes a keep-mask; a fully masked row is NaN in eager, so lse = -inf -> NaN.
        self.assertExpectedInline(code, """\
eq = l_causal_ == 0
logical_not = torch.logical_not(eq)
fwd_default = torch.ops.flash.fwd.default(l_q_, l_k_, l_v_, logical_not, None, 0, 0.25, 0.0)
getitem = fwd_default[0]
getitem_1 = fwd_default[1]
isneginf = torch.isneginf(getitem_1)
unsqueeze = isneginf.unsqueeze(-1)
where = torch.where(unsqueeze, nan, getitem)
return (where,)""")

    def test_zero_added_to_the_scores_is_dropped(self):
        """DeBERTa without relative attention: `rel_att: int = 0`, then `scores + rel_att`, then a
        bool mask filled with finfo.min. The `+ 0` is no bias (it used to reach the emitter as
        the int 0 and crash the compile); a non-zero constant is refused, named."""

        def f(q, k, v, keep, shift):
            s = torch.matmul(q / 2.0, k.transpose(-1, -2))
            s = s + shift
            s = s.masked_fill(~keep, torch.finfo(s.dtype).min)
            return torch.matmul(F.softmax(s, dim=-1), v)

        q, k, v = qkv(nk=7)
        keep = torch.rand(2, 1, 1, 7) > 0.3
        keep[..., 0] = True
        code, reps = self.run_rewritten(f, q, k, v, keep, 0)
        self.assertTrue(reps[0].rewritten)
        self.assertExpectedInline(code, """\
truediv = l_q_ / 2.0
invert = ~l_keep_
logical_not = torch.logical_not(invert)
logical_not_1 = torch.logical_not(logical_not)
all_1 = logical_not_1.all(-1, keepdim = True)
fwd_default = torch.ops.flash.fwd.default(truediv, l_k_, l_v_, logical_not, None, 0, 1.0, 0.0)
getitem = fwd_default[0]
mean = l_v_.mean(-2, keepdim = True)
where = torch.where(all_1, mean, getitem)
return (where,)""")
        _, reps = self.run_rewritten(f, q, k, v, keep, 1.5)
        self.assertFalse(reps[0].rewritten)
        self.assertIn("shifted by the constant 1.5", reps[0].line())

        def negated(q, k, v):  # 0 - scores is not the scores
            return torch.matmul(F.softmax(0 - torch.matmul(q, k.transpose(-1, -2)), dim=-1), v)

        _, reps = self.run_rewritten(negated, q, k, v)
        self.assertFalse(reps[0].rewritten)
        self.assertIn("negates or scales the scores", reps[0].line())

    def test_where_finfo_min(self):
        """GPT-2 (transformers 4): torch.where(causal_mask, scores, finfo.min)."""

        def f(q, k, v, keep):
            w = torch.matmul(q, k.transpose(-1, -2)) / 4.0
            w = torch.where(keep, w, torch.finfo(w.dtype).min)
            return torch.matmul(F.softmax(w, dim=-1), v)

        q, k, v = qkv(nk=7)
        keep = torch.tril(torch.ones(7, 7, dtype=torch.bool))
        keep[0, 0] = False  # a fully masked row: eager averages v uniformly, and so must we
        code, _ = self.run_rewritten(f, q, k, v, keep)
        self.assertExpectedInline(code, """\
logical_not = torch.logical_not(l_keep_)
all_1 = logical_not.all(-1, keepdim = True)
fwd_default = torch.ops.flash.fwd.default(l_q_, l_k_, l_v_, l_keep_, None, 0, 0.25, 0.0)
getitem = fwd_default[0]
mean = l_v_.mean(-2, keepdim = True)
where_1 = torch.where(all_1, mean, getitem)
return (where_1,)""")

    def test_hf_additive_mask_with_rows_of_padding_only(self):
        """HF's mask helpers: scores + where(keep, 0, finfo.min), causal and left padding in one
        [B, 1, N, N] mask. The op masks the finfo.min keys; a row with no real key (the first
        rows of a left-padded sequence) is averaged uniformly by eager, and by the fix-up."""

        def f(q, k, v, mask):
            return torch.matmul(F.softmax(torch.matmul(q, k.transpose(-1, -2)) * 0.25 + mask, dim=-1), v)

        q, k, v = qkv(nk=7)
        pad = torch.tensor([[True] * 7, [False] * 3 + [True] * 4])
        keep = torch.tril(torch.ones(7, 7, dtype=torch.bool)) & pad[:, None, None, :]
        build = lambda dtype: torch.where(keep, torch.zeros((), dtype=dtype), torch.finfo(dtype).min)  # noqa: E731

        def f_mask(q, k, v):
            return f(q, k, v, build(q.dtype))

        code, _ = self.run_rewritten(f_mask, q, k, v, grads=False)
        self.assertExpectedInline(code, """\
zeros = torch.zeros((), dtype = torch.float32)
where = torch.where(l_build_closure_0_cell_contents, zeros, -3.4028234663852886e+38)
le = where <= -1e+30
all_1 = le.all(-1, keepdim = True)
fwd_default = torch.ops.flash.fwd.default(l_q_, l_k_, l_v_, where, None, 0, 0.25, 0.0)
getitem = fwd_default[0]
mean = l_v_.mean(-2, keepdim = True)
where_1 = torch.where(all_1, mean, getitem)
return (where_1,)""")
        # Gradients: equal wherever a row has a real key. On a row of padding only, eager's
        # autograd differentiates scores that finfo.min absorbed (s + finfo.min == finfo.min),
        # so its dq/dk there are an artefact; ours are 0. A model's loss never reaches those
        # rows (labels are -100 on padding), so training sees no difference: zero them here.
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        torch._dynamo.reset()
        out = torch.compile(f_mask, backend=lambda gm, ex: (rewrite_graph(gm), gm.forward)[1])(*leaves)
        ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref = f_mask(*ref_leaves)
        dout = torch.randn_like(ref) * (~(~keep).all(-1, keepdim=True))
        for got, want in zip(torch.autograd.grad(out, leaves, dout.float()), torch.autograd.grad(ref, ref_leaves, dout)):
            self.assertLess(((got.double() - want).norm() / want.norm()).item(), 1e-5)

    def test_unknown_mask_with_rows_of_finfo_min_and_neg_inf(self):
        """A float mask the rewrite cannot see into (a graph input, as after a graph break, or a
        position bias plus a mask): a row with no visible key is what eager's softmax makes of
        the bias alone, the mean of V over the keys holding the row's largest value (finfo.min
        absorbs the scores), or NaN when that value is -inf. The op masks such rows (zeros), so
        the rewrite patches them, with values and V's gradient as eager's."""

        def f(q, k, v, mask):
            return torch.matmul(F.softmax(torch.matmul(q, k.transpose(-1, -2)) * 0.25 + mask, dim=-1), v)

        q, k, v = qkv(nk=7, hkv=2)
        q, k, v = q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        mask = torch.randn(2, 4, 7, 7)  # a learned bias...
        mask[0, :, :2] = torch.finfo(torch.float32).min  # ...rows 0-1 of batch 0: every key masked
        mask[1, :, 0, 3:] = float("-inf")  # row 0 of batch 1: finfo.min on keys 0-2, -inf after
        mask[1, :, 0, :3] = torch.finfo(torch.float32).min
        mask[1, :, 1] = float("-inf")  # row 1 of batch 1: all -inf, NaN in eager

        torch._dynamo.reset()
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = torch.compile(f, backend=lambda gm, ex: (rewrite_graph(gm), gm.forward)[1])(*leaves, mask)
        ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref = f(*ref_leaves, mask.double())
        self.assertTrue(torch.equal(out.isnan(), ref.isnan()))
        self.assertTrue(ref[1, :, 1].isnan().all() and ref[0, :, :2].isfinite().all())
        fin = ~ref.isnan()
        self.assertLess(((out.double() - ref)[fin].norm() / ref[fin].norm()).item(), 1e-5)
        torch.testing.assert_close(out[0, :, 0].double(), ref_leaves[2][0].mean(-2).detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[1, :, 0].double(), ref_leaves[2][1, :, :3].mean(-2).detach(), rtol=1e-5, atol=1e-5)
        # Gradients, without the NaN row (it poisons every gradient it reaches, in eager too).
        mask[1, :, 1] = 0.0
        torch._dynamo.reset()
        out = torch.compile(f, backend=lambda gm, ex: (rewrite_graph(gm), gm.forward)[1])(*leaves, mask)
        ref = f(*ref_leaves, mask.double())
        dead = torch.zeros(2, 4, 7, 1, dtype=torch.bool)
        dead[0, :, :2] = dead[1, :, 0] = True
        self.assert_grads_beside_patched_rows(out, leaves, ref, ref_leaves, dead)

    def test_clamp_after_a_mask_input_that_may_hold_neg_inf(self):
        """XGLM in training under transformers 5.17: LayerDrop's graph break hands the mask in as
        a graph input, then `max(s + mask, finfo.min)`. A -inf entry becomes finfo.min: a row with
        a visible key is unchanged, and a row the op finds fully masked is eager's softmax over
        max(mask, finfo.min): the keys holding its largest value, every key when all were -inf."""
        floor = torch.finfo(torch.float32).min

        def f(q, k, v, mask):
            w = torch.matmul(q, k.transpose(-1, -2)) * 0.25 + mask
            w = torch.max(w, torch.full((), floor, dtype=w.dtype))
            return torch.matmul(F.softmax(w, dim=-1), v)

        q, k, v = qkv(nk=7)
        mask = torch.randn(2, 4, 7, 7)
        mask[0, :, :2] = floor  # rows 0-1 of batch 0: every key masked
        mask[1, :, 0, 3:] = float("-inf")  # row 0 of batch 1: finfo.min, then -inf (clamped: all equal)
        mask[1, :, 0, :3] = floor
        mask[1, :, 1] = float("-inf")  # all -inf: eager's clamp makes it uniform, not NaN
        mask[1, :, 1, 4] = -1e31  # ...except one key that beats the floor
        mask[1, :, 2, ::2] = float("-inf")  # a row with visible keys and some -inf ones
        dead = torch.zeros(2, 4, 7, 1, dtype=torch.bool)
        dead[0, :, :2] = dead[1, :, :2] = True

        torch._dynamo.reset()
        seen = {}

        def capture(gm, ex):
            seen["reports"], seen["code"] = rewrite_graph(gm), _code(gm)
            return gm.forward

        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = torch.compile(f, backend=capture)(*leaves, mask)
        self.assertTrue(seen["reports"][0].rewritten, seen["reports"][0].line())
        self.assertExpectedInline(seen["code"], """\
clamp_min = l_mask_.clamp_min(-3.4028234663852886e+38)
fwd_default = torch.ops.flash.fwd.default(l_q_, l_k_, l_v_, l_mask_, None, 0, 0.25, 0.0)
getitem = fwd_default[0]
getitem_1 = fwd_default[1]
isneginf = torch.isneginf(getitem_1)
unsqueeze = isneginf.unsqueeze(-1)
amax = clamp_min.amax(-1, keepdim = True)
eq = clamp_min == amax
to = eq.to(torch.float32)
matmul_2 = torch.matmul(to, l_v_)
sum_1 = to.sum(-1, keepdim = True)
truediv = matmul_2 / sum_1
isneginf_1 = torch.isneginf(amax)
where = torch.where(isneginf_1, nan, truediv)
where_1 = torch.where(unsqueeze, where, getitem)
return (where_1,)""")
        ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref = f(*ref_leaves, mask.double())
        self.assertTrue(ref.isfinite().all() and out.isfinite().all())
        self.assertLess(((out.double() - ref).norm() / ref.norm()).item(), 1e-5)
        torch.testing.assert_close(out[1, :, 0].double(), ref_leaves[2][1].mean(-2).detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[1, :, 1].double(), ref_leaves[2][1, :, 4].detach(), rtol=1e-5, atol=1e-5)
        self.assert_grads_beside_patched_rows(out, leaves, ref, ref_leaves, dead)

    def test_clamp_in_3d_then_split_into_heads(self):
        """The same clamp on [B·H, N, N] scores with a 3-D mask input, viewed to 4-D only for the
        softmax: eager's clamped entries follow the op into the 4-D layout."""
        floor = torch.finfo(torch.float32).min

        def f(q3, k3, v3, mask3):
            w = torch.max(torch.bmm(q3, k3.transpose(1, 2)) * 0.25 + mask3, torch.full((), floor))
            w = F.softmax(w.view(2, 4, 7, 9), dim=-1).view(8, 7, 9)
            return torch.bmm(w, v3)

        q, k, v = qkv()
        q3, k3, v3 = (t.reshape(8, t.shape[2], 16) for t in (q, k, v))
        mask3 = torch.randn(8, 7, 9)
        mask3[:4, :2] = float("-inf")  # batch 0, rows 0-1: uniform after the clamp
        mask3[5, 3, ::2] = float("-inf")
        code, reps = self.run_rewritten(f, q3, k3, v3, mask3, grads=False)
        self.assertTrue(reps[0].rewritten, reps[0].line())
        self.assertIn("clamp_min", code)

    def test_gpt_neo_finite_causal_fill_then_added_mask(self):
        """GPT-Neo: fp32 scores, no scale, where(causal, s, finfo.min), then HF's mask added.
        The op masks the filled keys; with left padding the first rows have no real key, where
        eager's entries are the mask (finfo.min) on the causal keys and fill + mask (-inf) past
        them: it averages V over the causal keys, and the rewrite patches those rows so."""

        def f(q, k, v, causal, mask):
            w = torch.matmul(q.float(), k.float().transpose(-1, -2))
            w = torch.where(causal, w, torch.tensor(torch.finfo(w.dtype).min, dtype=w.dtype))
            return torch.matmul(F.softmax(w + mask, dim=-1), v)

        q, k, v = qkv(nk=7)
        causal = torch.tril(torch.ones(7, 7, dtype=torch.bool))
        pad = torch.tensor([[True] * 7, [False] * 3 + [True] * 4])
        mask = torch.where(causal & pad[:, None, None, :], 0.0, torch.finfo(torch.float32).min)

        code, _ = self.run_rewritten(f, q, k, v, causal, mask, grads=False)
        self.assertIn("torch.ops.flash.fwd.default", code)
        torch._dynamo.reset()
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = torch.compile(f, backend=lambda gm, ex: (rewrite_graph(gm), gm.forward)[1])(*leaves, causal, mask)
        ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref = f(*ref_leaves, causal, mask.double())
        for row in range(3):  # padded rows: the mean of V over keys 0..row, as eager
            torch.testing.assert_close(out[1, :, row].double(), ref_leaves[2][1, :, : row + 1].mean(-2).detach(),
                                       rtol=1e-5, atol=1e-5)
        empty = ~(causal & pad[:, None, None, :]).any(-1, keepdim=True)
        self.assert_grads_beside_patched_rows(out, leaves, ref, ref_leaves, empty)

    @staticmethod
    def _openai_gpt(q, k, v, b, mask):
        """OpenAI GPT's `_attn`: a causal buffer b of 0s and 1s multiplies the scores."""
        w = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(v.size(-1))
        b = b[:, :, : w.size(-2), : w.size(-1)]
        w = w * b + -1e4 * (1 - b)
        return torch.matmul(F.softmax(w + mask, dim=-1), v)

    def test_openai_gpt_multiplicative_causal_mask(self):
        """s·b − 1e4·(1 − b) is a fill of -1e4 where b is 0: the op masks those keys, and the
        graph asserts that b holds only 0 and 1 and that every row scores far enough above -1e4
        for eager's weights there to be exactly 0. With left padding the first rows of the second
        sequence have no real key: eager gives them the softmax of -1e4 plus the mask over the
        real keys past the diagonal (the row's largest entries), and the rewrite patches them so."""
        q, k, v = qkv(nk=7)
        b = torch.tril(torch.ones(9, 9)).view(1, 1, 9, 9)
        pad = torch.tensor([[True] * 7, [False] * 3 + [True] * 4])
        mask = torch.where(pad[:, None, None, :], 0.0, torch.finfo(torch.float32).min)
        learned = torch.tensor([0.0, -1.0, 0.5, -2.0])  # not only 0 / finfo.min: their differences count
        mask[1, ..., 3:] = learned

        code, reps = self.run_rewritten(self._openai_gpt, q, k, v, b, mask, grads=False)
        self.assertEqual(reps[0].spelling, "matmul·truediv(scale)·mul(0/1 mask)·add(fill)·add(bias)·softmax·matmul")
        self.assertExpectedInline(code, """\
b = l_b_[(slice(None, None, None), slice(None, None, None), slice(None, 7, None), slice(None, 7, None))]
ne = torch.ne(b, 0)
where = torch.where(ne, l_mask_, -inf)
to = l_mask_.to(torch.float32)
add_2 = to + -10000.0
to_1 = l_mask_.to(torch.float32)
where_1 = torch.where(ne, to_1, add_2)
fwd_default = torch.ops.flash.fwd.default(l_q_, l_k_, l_v_, where, None, 0, 0.25, 0.0)
eq = torch.eq(b, 0)
eq_1 = torch.eq(b, 1)
logical_or = torch.logical_or(eq, eq_1)
all_1 = logical_or.all()
_assert_async = torch._assert_async(all_1, "flash-inductor, softmax: the scores were multiplied by a mask b (s*b + c*(1 - b)) holding values other than 0 and 1 (compile this model with backend='inductor' to keep eager's arithmetic)")
float_1 = l_mask_.float()
amax = float_1.amax(-1)
add_3 = amax + -9888.054089850944
getitem_1 = fwd_default[1]
isneginf = torch.isneginf(getitem_1)
gt = getitem_1 > add_3
logical_or_1 = torch.logical_or(isneginf, gt)
all_2 = logical_or_1.all()
_assert_async_1 = torch._assert_async(all_2, "flash-inductor, softmax: a row's scores came within 110 of the mask fill -10000, where its masked keys get weight in eager and none in the fused op (compile this model with backend='inductor' to keep eager's arithmetic)")
getitem_2 = fwd_default[0]
getitem_3 = fwd_default[1]
isneginf_1 = torch.isneginf(getitem_3)
unsqueeze = isneginf_1.unsqueeze(-1)
float_2 = where_1.float()
softmax_1 = torch.softmax(float_2, -1)
to_2 = softmax_1.to(torch.float32)
matmul_2 = torch.matmul(to_2, l_v_)
where_2 = torch.where(unsqueeze, matmul_2, getitem_2)
return (where_2,)""")
        torch._dynamo.reset()
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = torch.compile(self._openai_gpt, backend=lambda gm, ex: (rewrite_graph(gm), gm.forward)[1])(
            *leaves, b, mask)
        ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref = self._openai_gpt(*ref_leaves, b.double(), mask.double())
        weights = torch.softmax(learned.double(), -1)
        for row in range(3):  # padded rows: eager's softmax over the real keys 3..6
            torch.testing.assert_close(out[1, :, row].double(), (weights @ ref_leaves[2][1, :, 3:]).detach(),
                                       rtol=1e-5, atol=1e-5)
        empty = torch.zeros(2, 1, 7, 1, dtype=torch.bool)
        empty[1, :, :3] = True
        self.assert_grads_beside_patched_rows(out, leaves, ref, ref_leaves, empty)

    def test_openai_gpt_mask_checked_at_run_time(self):
        """Where the values break what the rewrite assumed, the compiled graph raises, naming
        the site and the limit: a b holding other values than 0 and 1, or a later mask that lifts
        the filled keys back near the row's scores (eager weighs them there)."""
        q, k, v = qkv(nk=7)
        b = torch.tril(torch.ones(7, 7)).view(1, 1, 7, 7)
        zero = torch.zeros(2, 1, 1, 7)
        torch._dynamo.reset()
        compiled = torch.compile(self._openai_gpt, backend=lambda gm, ex: (rewrite_graph(gm), gm.forward)[1])
        torch.testing.assert_close(compiled(q, k, v, b, zero), self._openai_gpt(q, k, v, b, zero))
        half = b.clone()
        half[0, 0, 3, 1] = 0.5
        with self.assertRaisesRegex(RuntimeError, r"mask b \(s\*b \+ c\*\(1 - b\)\) holding values other than 0 and 1"):
            compiled(q, k, v, half, zero)
        lifted = zero.clone()
        lifted[..., 6] = 1e4  # key 6's -1e4 fill becomes 0 on rows 0..5, a real weight in eager
        with self.assertRaisesRegex(RuntimeError, r"came within 110 of the mask fill -10000"):
            compiled(q, k, v, b, lifted)

    def test_mpt_finite_fill_after_a_bias_that_may_hold_neg_inf(self):
        """MPT: scores + a bias the rewrite cannot see into (ALiBi, possibly -inf), then
        masked_fill(finfo.min). A row whose kept keys all hold -inf bias has eager's weight on
        the filled keys (finfo.min beats -inf); a row with nothing kept averages all keys."""

        def f(q, k, v, bias, masked):
            w = torch.matmul(q, k.transpose(-1, -2)) * 0.25 + bias
            return torch.matmul(w.masked_fill(masked, torch.finfo(w.dtype).min).softmax(-1), v)

        q, k, v = qkv(nk=7)
        bias = torch.randn(2, 4, 7, 7)
        masked = torch.zeros(2, 1, 7, 7, dtype=torch.bool)
        masked[0, :, 0] = True  # nothing kept: eager averages all keys
        masked[1, :, 1, 4:] = True  # keys 0-3 kept but their bias is -inf: eager averages keys 4-6
        bias[1, :, 1, :4] = float("-inf")
        torch._dynamo.reset()
        reports = []
        out = torch.compile(f, backend=lambda gm, ex: (reports.extend(rewrite_graph(gm)), gm.forward)[1])(
            q, k, v, bias, masked)
        self.assertTrue(reports and all(r.rewritten for r in reports), reports)
        ref = f(q.double(), k.double(), v.double(), bias.double(), masked)
        torch.testing.assert_close(out[0, :, 0].double(), v[0].double().mean(-2), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[1, :, 1].double(), v[1, :, 4:].double().mean(-2), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)

    def test_hf_mask_added_before_the_scale(self):
        """(s + where(keep, 0, finfo.min)) / 4: the fill is still <= -1e30 after the scale, so a
        row with no real key is averaged by eager and by the fix-up (not NaN)."""

        def f(q, k, v):
            keep = torch.ones(2, 1, 7, 7, dtype=torch.bool)
            keep[1, :, 2] = False  # one row with no real key
            mask = torch.where(keep, torch.zeros((), dtype=q.dtype), torch.finfo(q.dtype).min)
            return torch.matmul(((torch.matmul(q, k.transpose(-1, -2)) + mask) / 4.0).softmax(-1), v)

        q, k, v = qkv(nk=7)
        code, _ = self.run_rewritten(f, q, k, v, grads=False)
        self.assertIn("mean = l_v_.mean(-2, keepdim = True)", code)
        self.assertNotIn("isneginf", code)

    def test_added_zero_neg_inf_mask(self):
        def f(q, k, v, mask):
            return torch.matmul(F.softmax(torch.matmul(q, k.transpose(-1, -2)) * 0.25 + mask, dim=-1), v)

        q, k, v = qkv(nk=7)
        mask = torch.triu(torch.full((7, 7), float("-inf")), diagonal=1)
        code, _ = self.run_rewritten(f, q, k, v, mask)
        self.assertExpectedInline(code, """\
fwd_default = torch.ops.flash.fwd.default(l_q_, l_k_, l_v_, l_mask_, None, 0, 0.25, 0.0)
getitem = fwd_default[0]
getitem_1 = fwd_default[1]
isneginf = torch.isneginf(getitem_1)
unsqueeze = isneginf.unsqueeze(-1)
amax = l_mask_.amax(-1, keepdim = True)
eq = l_mask_ == amax
to = eq.to(torch.float32)
matmul_2 = torch.matmul(to, l_v_)
sum_1 = to.sum(-1, keepdim = True)
truediv = matmul_2 / sum_1
isneginf_1 = torch.isneginf(amax)
where = torch.where(isneginf_1, nan, truediv)
where_1 = torch.where(unsqueeze, where, getitem)
return (where_1,)""")

    def test_in_place_divide(self):
        def f(q, k, v):
            w = torch.matmul(q, k.transpose(-1, -2))
            w.div_(4.0)
            return torch.matmul(w.softmax(-1), v)

        code, reps = self.run_rewritten(f, *qkv(), grads=False)
        self.assertExpectedInline(code, """\
fwd_default = torch.ops.flash.fwd.default(l_q_, l_k_, l_v_, None, None, 0, 0.25, 0.0)
getitem = fwd_default[0]
return (getitem,)""")

    def test_scale_in_zero_dim_tensor(self):
        def f(q, k, v, s):
            return torch.matmul((torch.matmul(q, k.transpose(-1, -2)) * s).softmax(-1), v)

        code, _ = self.run_rewritten(f, *qkv(), torch.tensor(0.25), grads=False)
        self.assertExpectedInline(code, """\
mul_1 = l_q_ * l_s_
fwd_default = torch.ops.flash.fwd.default(mul_1, l_k_, l_v_, None, None, 0, 1.0, 0.0)
getitem = fwd_default[0]
return (getitem,)""")

    def test_scale_constant_along_the_keys_folds_into_q(self):
        """Swinv2's scaled cosine attention: a learned per-head logit scale [H, 1, 1], then the
        relative position bias. s·f = (q·f)·kᵀ when f does not vary with the key; the logit
        scale's gradient then flows through q's product."""

        def f(q, k, v, logit_scale, bias):
            w = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
            w = w * torch.clamp(logit_scale, max=math.log(100.0)).exp() + bias
            return torch.matmul(w.softmax(-1), v)

        q, k, v = qkv()
        code, reps = self.run_rewritten(f, q, k, v, torch.randn(4, 1, 1), torch.randn(4, 7, 9))
        self.assertTrue(reps[0].rewritten)
        self.assertExpectedInline(code, """\
normalize = torch.nn.functional.normalize(l_q_, dim = -1)
normalize_1 = torch.nn.functional.normalize(l_k_, dim = -1)
clamp = torch.clamp(l_logit_scale_, max = 4.605170185988092)
exp = clamp.exp()
mul_1 = normalize * exp
fwd_default = torch.ops.flash.fwd.default(mul_1, normalize_1, l_v_, l_bias_, None, 0, 1.0, 0.0)
getitem = fwd_default[0]
getitem_1 = fwd_default[1]
isneginf = torch.isneginf(getitem_1)
unsqueeze = isneginf.unsqueeze(-1)
amax = l_bias_.amax(-1, keepdim = True)
eq = l_bias_ == amax
to = eq.to(torch.float32)
matmul_2 = torch.matmul(to, l_v_)
sum_1 = to.sum(-1, keepdim = True)
truediv = matmul_2 / sum_1
isneginf_1 = torch.isneginf(amax)
where = torch.where(isneginf_1, nan, truediv)
where_1 = torch.where(unsqueeze, where, getitem)
return (where_1,)""")

    def test_shifted_window_mask_through_a_5d_view(self):
        """Swinv2's shifted windows: scores [B·W, H, N, N] viewed as [B, W, H, N, N], the window
        mask [W, N, N] added over W (twice, as transformers does), viewed back. The op gets the
        mask laid out in 4-D, [B·W, 1, N, N]; values and gradients, the bias's included."""

        def f(q, k, v, bias, mask):
            w = torch.matmul(q, k.transpose(-1, -2)) * 0.25 + bias.unsqueeze(0)
            w = w.view(2, 3, 4, 7, 7) + mask.unsqueeze(1).unsqueeze(0)
            w = w + mask.unsqueeze(1).unsqueeze(0)
            return torch.matmul(w.view(-1, 4, 7, 7).softmax(-1), v)

        g = torch.Generator().manual_seed(9)
        q, k, v = (torch.randn(6, 4, 7, 16, generator=g) for _ in range(3))
        mask = torch.zeros(3, 7, 7).masked_fill(torch.rand(3, 7, 7, generator=g) > 0.6, -100.0)
        code, reps = self.run_rewritten(f, q, k, v, torch.randn(4, 7, 7, generator=g), mask)
        self.assertEqual(reps[0].spelling, "matmul·mul(scale)·add(bias)·view(windows)·add(bias)·add(bias)·view(batch)"
                                           "·softmax·matmul")
        self.assertExpectedInline(code, """\
unsqueeze = l_bias_.unsqueeze(0)
unsqueeze_1 = l_mask_.unsqueeze(1)
unsqueeze_2 = unsqueeze_1.unsqueeze(0)
unsqueeze_3 = l_mask_.unsqueeze(1)
unsqueeze_4 = unsqueeze_3.unsqueeze(0)
reshape = unsqueeze_2.reshape(1, 3, 1, 7, 7)
expand = reshape.expand(2, 3, 1, 7, 7)
reshape_1 = expand.reshape(6, 1, 7, 7)
add_3 = unsqueeze + reshape_1
reshape_2 = unsqueeze_4.reshape(1, 3, 1, 7, 7)
expand_1 = reshape_2.expand(2, 3, 1, 7, 7)
reshape_3 = expand_1.reshape(6, 1, 7, 7)
add_4 = add_3 + reshape_3
fwd_default = torch.ops.flash.fwd.default(l_q_, l_k_, l_v_, add_4, None, 0, 0.25, 0.0)
getitem = fwd_default[0]
getitem_1 = fwd_default[1]
isneginf = torch.isneginf(getitem_1)
unsqueeze_5 = isneginf.unsqueeze(-1)
amax = add_4.amax(-1, keepdim = True)
eq = add_4 == amax
to = eq.to(torch.float32)
matmul_2 = torch.matmul(to, l_v_)
sum_1 = to.sum(-1, keepdim = True)
truediv = matmul_2 / sum_1
isneginf_1 = torch.isneginf(amax)
where = torch.where(isneginf_1, nan, truediv)
where_1 = torch.where(unsqueeze_5, where, getitem)
return (where_1,)""")

    def test_view_of_the_scores_read_for_its_shape(self):
        """ProphetNet reads a view of its scores only for `.shape`; Dynamo keeps the dead view,
        which must not count as a second reader of the scores."""

        def f(q, k, v):
            w = torch.matmul(q, k.transpose(-1, -2)) * 0.25
            heads = w.view(w.shape[0], -1, w.shape[-2], w.shape[-1]).shape[1]
            return torch.matmul(w.softmax(-1), v) * (heads // 4)

        code, reps = self.run_rewritten(f, *qkv())
        self.assertTrue(reps[0].rewritten, reps[0].line())
        self.assertNotIn("view", code)

    def test_key_divided_by_zero_dim_tensor(self):
        """DeBERTa: kᵀ divided by a 0-d scale tensor before a 3-D bmm."""

        def f(q, k, v, scale):
            w = torch.bmm(q, k.transpose(-1, -2) / scale.to(torch.float32))
            return torch.bmm(F.softmax(w, dim=-1), v)

        q, k, v = (t.reshape(8, t.shape[2], 16) for t in qkv())
        code, reps = self.run_rewritten(f, q, k, v, torch.tensor(4.0), grads=False)
        self.assertEqual(reps[0].spelling, "bmm·softmax·bmm")
        self.assertExpectedInline(code, """\
to = l_scale_.to(torch.float32)
truediv_1 = l_q_ / to
unsqueeze = truediv_1.unsqueeze(1)
unsqueeze_1 = l_k_.unsqueeze(1)
unsqueeze_2 = l_v_.unsqueeze(1)
fwd_default = torch.ops.flash.fwd.default(unsqueeze, unsqueeze_1, unsqueeze_2, None, None, 0, 1.0, 0.0)
getitem = fwd_default[0]
squeeze = getitem.squeeze(1)
return (squeeze,)""")

    def test_repeat_kv_gqa(self):
        """LLaMA / Mistral / Qwen2 repeat_kv: the op gets the 2 KV heads, not 4 copies."""

        def repeat_kv(x, n):
            b, h, s, d = x.shape
            return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)

        def f(q, k, v):
            k, v = repeat_kv(k, 2), repeat_kv(v, 2)
            w = torch.matmul(q, k.transpose(2, 3)) * 0.25
            return torch.matmul(F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype), v)

        code, reps = self.run_rewritten(f, *qkv(hkv=2))
        self.assertIn("gqa", reps[0].spelling)
        self.assertExpectedInline(code, """\
fwd_default = torch.ops.flash.fwd.default(l_q_, l_k_, l_v_, None, None, 0, 0.25, 0.0)
getitem_2 = fwd_default[0]
return (getitem_2,)""")

    def test_bf16_with_fp32_softmax(self):
        def f(q, k, v, mask):
            w = torch.matmul(q, k.transpose(2, 3)) * 0.25 + mask
            return torch.matmul(F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype), v)

        q, k, v = qkv(dtype=torch.bfloat16)
        mask = torch.zeros(2, 1, 1, 9).masked_fill(torch.rand(2, 1, 1, 9) > 0.7, -1e4).to(torch.bfloat16)
        code, _ = self.run_rewritten(f, q, k, v, mask)
        self.assertExpectedInline(code, """\
fwd_default = torch.ops.flash.fwd.default(l_q_, l_k_, l_v_, l_mask_, None, 0, 0.25, 0.0)
getitem = fwd_default[0]
getitem_1 = fwd_default[1]
isneginf = torch.isneginf(getitem_1)
unsqueeze = isneginf.unsqueeze(-1)
amax = l_mask_.amax(-1, keepdim = True)
eq = l_mask_ == amax
to_1 = eq.to(torch.bfloat16)
matmul_2 = torch.matmul(to_1, l_v_)
sum_1 = to_1.sum(-1, keepdim = True)
truediv = matmul_2 / sum_1
isneginf_1 = torch.isneginf(amax)
where = torch.where(isneginf_1, nan, truediv)
where_1 = torch.where(unsqueeze, where, getitem)
return (where_1,)""")

    def test_dynamic_shapes_one_compile(self):
        """backend="flash" with dynamic=True: one graph serves every sequence length."""
        from torch._dynamo.utils import counters

        def f(q, k, v, mask):
            w = torch.matmul(q, k.transpose(2, 3)) * 0.25 + mask
            return torch.matmul(F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype), v)

        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(f, backend="flash", dynamic=True)
        for n in (7, 13, 29):
            q, k, v = (t.requires_grad_() for t in qkv(nq=n, nk=n))
            mask = torch.zeros(2, 1, 1, n).masked_fill(torch.rand(2, 1, 1, n) > 0.8, torch.finfo(torch.float32).min)
            out = compiled(q, k, v, mask)
            ref = f(q, k, v, mask)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
            g = torch.randn_like(out)
            for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        self.assertEqual(counters["flash_inductor"]["rewritten"], 1)

    def test_live_dropout_reaches_the_op(self):
        def f(q, k, v):
            w = torch.matmul(q, k.transpose(2, 3)) * 0.25
            return torch.matmul(F.dropout(w.softmax(-1), p=0.3, training=True), v)

        torch._dynamo.reset()
        seen = {}

        def capture(gm, ex):
            seen["reports"] = rewrite_graph(gm)
            seen["code"] = gm.code
            return gm.forward

        q, k, v = qkv(nq=64, nk=64)
        out = torch.compile(f, backend=capture)(q, k, v)
        self.assertIn("flash.fwd.default(l_q_, l_k_, l_v_, None, None, 0, 0.25, 0.3)", seen["code"])
        self.assertEqual(seen["reports"][0].spelling, "matmul·mul(scale)·softmax·dropout·matmul")
        no_drop = flash_inductor.attention(q, k, v, scale=0.25)
        # Dropout changes the output, but keeps it unbiased: the mean over many entries agrees.
        self.assertGreater((out - no_drop).abs().max().item(), 1e-3)
        self.assertLess((out.mean() - no_drop.mean()).abs().item(), 0.05)


    def test_dropout_rate_made_symbolic_is_specialised_with_a_guard(self):
        """Under dynamic=True Dynamo passes a module's float attribute in as a tensor and reads it
        with .item(): the rate reaches the rewrite as a SymFloat. It is rewritten at the rate it
        has, and a guard makes a changed rate recompile (the keep fraction follows it)."""

        class Attention(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.p = 0.1

            def forward(self, q, k, v):
                w = torch.matmul(q, k.transpose(-1, -2)) * 0.25
                return torch.matmul(F.dropout(w.softmax(-1), p=self.p, training=True), v)

        torch._dynamo.reset()
        module = Attention()
        q, k = (torch.randn(1, 2, 64, 16) * 0.01 for _ in range(2))
        identity = torch.eye(64).expand(1, 2, 64, 64)  # the output is the dropped probabilities
        compiled = torch.compile(module, backend="flash", dynamic=True)
        with recording() as rep:
            dropped_01 = (compiled(q, k, identity) == 0).float().mean().item()
            module.p = 0.5
            dropped_05 = (compiled(q, k, identity) == 0).float().mean().item()
        self.assertTrue(rep.sites and all(site.rewritten for site in rep.sites), [s.line() for s in rep.sites])
        self.assertIn("dropout", rep.sites[0].spelling)
        # 8192 draws each: standard deviations 0.003 and 0.006
        self.assertLess(abs(dropped_01 - 0.1), 0.02)
        self.assertLess(abs(dropped_05 - 0.5), 0.03)


class TestSdpa(RewriteCase):
    def test_sdpa_bool_mask(self):
        def f(q, k, v, keep):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)

        q, k, v = qkv()
        keep = torch.rand(2, 1, 7, 9) > 0.3
        keep[0, 0, 3] = False  # fully masked row: zeros in both
        code, reps = self.run_rewritten(f, q, k, v, keep)
        self.assertEqual(reps[0].spelling, "sdpa·mask(bool)")
        self.assertExpectedInline(code, """\
fwd_default = torch.ops.flash.fwd.default(l_q_, l_k_, l_v_, l_keep_, None, 0, 0.25, 0.0)
getitem = fwd_default[0]
return (getitem,)""")

    def test_sdpa_float_mask_scale(self):
        def f(q, k, v, mask):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.5)

        q, k, v = qkv()
        code, _ = self.run_rewritten(f, q, k, v, torch.randn(7, 9))
        self.assertExpectedInline(code, """\
fwd_default = torch.ops.flash.fwd.default(l_q_, l_k_, l_v_, l_mask_, None, 0, 0.5, 0.0)
getitem = fwd_default[0]
getitem_1 = fwd_default[1]
isneginf = torch.isneginf(getitem_1)
unsqueeze = isneginf.unsqueeze(-1)
amax = l_mask_.amax(-1, keepdim = True)
eq = l_mask_ == amax
to = eq.to(torch.float32)
matmul = torch.matmul(to, l_v_)
sum_1 = to.sum(-1, keepdim = True)
truediv = matmul / sum_1
isneginf_1 = torch.isneginf(amax)
where = torch.where(isneginf_1, 0.0, truediv)
where_1 = torch.where(unsqueeze, where, getitem)
return (where_1,)""")

    def test_sdpa_unknown_float_mask_with_rows_of_finfo_min_and_neg_inf(self):
        """SDPA averages a row of finfo.min (all keys), a row mixing finfo.min and -inf (the
        finfo.min keys), and gives zeros on a row of -inf; the op masks all three (zeros)."""

        def f(q, k, v, mask):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

        q, k, v = qkv(nk=7)
        mask = torch.randn(2, 4, 7, 7)
        mask[0, :, :2] = torch.finfo(torch.float32).min
        mask[1, :, 0, :3] = torch.finfo(torch.float32).min
        mask[1, :, 0, 3:] = float("-inf")
        mask[1, :, 1] = float("-inf")
        torch._dynamo.reset()
        out = torch.compile(f, backend=lambda gm, ex: (rewrite_graph(gm), gm.forward)[1])(q, k, v, mask)
        ref = f(q.double(), k.double(), v.double(), mask.double())
        self.assertTrue(torch.equal(ref[1, :, 1], torch.zeros_like(ref[1, :, 1])))
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)

    def test_sdpa_is_causal(self):
        def f(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        code, _ = self.run_rewritten(f, *qkv(nk=7))
        self.assertExpectedInline(code, """\
fwd_default = torch.ops.flash.fwd.default(l_q_, l_k_, l_v_, None, None, 1, 0.25, 0.0)
getitem = fwd_default[0]
return (getitem,)""")

    def test_sdpa_enable_gqa(self):
        def f(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

        code, _ = self.run_rewritten(f, *qkv(hkv=1))
        self.assertExpectedInline(code, """\
fwd_default = torch.ops.flash.fwd.default(l_q_, l_k_, l_v_, None, None, 0, 0.25, 0.0)
getitem = fwd_default[0]
return (getitem,)""")

    def test_sdpa_through_inductor(self):
        def f(q, k, v, mask):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

        q, k, v = qkv()
        self.run_rewritten(f, q, k, v, torch.randn(2, 4, 7, 9), backend="inductor")


class TestBackendOptions(RewriteCase):
    def test_mode_and_options_reach_inductor(self):
        """torch.compile(..., backend="flash", mode=..., options=...) takes what backend="inductor" takes."""
        from flash_inductor.backend import inductor_config

        self.assertEqual(inductor_config("max-autotune-no-cudagraphs")["max_autotune"], True)
        self.assertEqual(inductor_config(None, {"epilogue_fusion": False})["epilogue_fusion"], False)
        # Ours: Inductor's static launcher for our kernels, unless the user says otherwise.
        from torch._inductor import config as inductor_cfg

        if hasattr(inductor_cfg, "static_launch_user_defined_triton_kernels") and inductor_cfg.use_static_cuda_launcher:
            self.assertTrue(inductor_config(None)["static_launch_user_defined_triton_kernels"])
        off = {"static_launch_user_defined_triton_kernels": False}
        self.assertFalse(inductor_config(None, off)["static_launch_user_defined_triton_kernels"])

        def f(q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

        q, k, v = qkv()
        for kwargs in ({"mode": "max-autotune-no-cudagraphs"}, {"options": {"epilogue_fusion": False}}):
            torch._dynamo.reset()
            out = torch.compile(f, backend="flash", **kwargs)(q, k, v)
            torch.testing.assert_close(out, f(q, k, v))

    def test_compiled_graphs_are_cached_on_our_sources(self):
        """Our kernels are lowered inside AOTAutograd's trace, out of sight of Inductor's cache
        keys: a no-op post-grad pass keys them on a hash of our sources and on the settings the
        lowering reads (compile_cache.py). The same sources and settings hit the cache; changed
        ones miss it; a user's own pass still runs."""
        from unittest import mock

        from torch._dynamo.utils import counters
        from torch._inductor import config as inductor_cfg
        from torch._inductor.custom_graph_pass import CustomGraphPass
        from torch._inductor.utils import fresh_cache

        from flash_inductor import compile_cache, dispatch

        def f(q, k, v):
            return torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * 0.125, dim=-1) @ v

        q, k, v = qkv()

        def compile_once(**kwargs):
            torch._dynamo.reset()
            counters.clear()
            torch.testing.assert_close(torch.compile(f, backend="flash", **kwargs)(q, k, v), f(q, k, v))
            return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]

        with fresh_cache(), inductor_cfg.patch(fx_graph_cache=True, fx_graph_remote_cache=False):
            self.assertEqual(compile_once(), (0, 1))
            self.assertEqual(compile_once(), (1, 0))
            with mock.patch.object(compile_cache, "source_fingerprint", lambda: "edited sources"):
                self.assertEqual(compile_once(), (0, 1))
            self.assertEqual(compile_once(), (1, 0))
            # The settings the lowering reads while tracing are part of the key too.
            with mock.patch.dict(os.environ, {"FLASH_INDUCTOR_MASK_TILES": "0"}):
                self.assertEqual(compile_once(), (0, 1))
            with mock.patch.object(dispatch.config, "kernels_in_graph", False):
                self.assertEqual(compile_once(), (0, 1))
            self.assertEqual(compile_once(), (1, 0))

            class Counting(CustomGraphPass):
                calls = 0

                def __call__(self, graph):
                    Counting.calls += 1

                def uuid(self):
                    return "counting"

            compile_once(options={"post_grad_custom_post_pass": Counting()})
            self.assertEqual(Counting.calls, 1)
        self.assertEqual(len(compile_cache.source_fingerprint()), 64)


class TestNearMisses(RewriteCase):
    def test_softmax_over_another_dim(self):
        def f(q, k, v):
            return torch.matmul(torch.matmul(q, k.transpose(-1, -2)).softmax(dim=-2), v)

        self.assert_not_rewritten(f, *qkv(nk=7), guard="softmax_over_keys")

    def test_sink_before_the_scores_is_left_eager(self):
        # The sink column first (and sliced off with [..., 1:]): not GPT-OSS's spelling, so not
        # modelled; still counted as a site and refused by name.
        def f(q, k, v, sinks):
            s = torch.matmul(q, k.transpose(2, 3)) * 0.25
            sink = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
            p = F.softmax(torch.cat([sink, s], dim=-1), dim=-1)[..., 1:]
            return torch.matmul(p, v)

        self.assert_not_rewritten(f, *qkv(), torch.randn(4), guard="softmax_over_keys")

    def test_sink_column_kept_is_left_eager(self):
        # Softmax over the keys and a sink with the sink's column never dropped: P·V would read
        # Nk + 1 columns, so no value product of the keys follows.
        def f(q, k, v, sinks):
            s = torch.matmul(q, k.transpose(2, 3)) * 0.25
            sink = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
            p = F.softmax(torch.cat([s, sink], dim=-1), dim=-1)
            return torch.matmul(p, torch.cat([v, v[:, :, :1]], dim=-2))

        self.assert_not_rewritten(f, *qkv(), torch.randn(4), guard="softmax_over_keys")

    def test_two_logits_beside_the_scores_are_left_eager(self):
        def f(q, k, v, extra):
            s = torch.matmul(q, k.transpose(2, 3)) * 0.25
            p = F.softmax(torch.cat([s, extra], dim=-1), dim=-1)[..., :-2]
            return torch.matmul(p, v)

        self.assert_not_rewritten(f, *qkv(), torch.randn(2, 4, 7, 2), guard="softmax_over_keys")

    def test_mask_fill_on_5d_scores_is_left_eager(self):
        # Only biases and constant scales are laid back from the 5-D view into 4-D.
        def f(q, k, v, masked):
            w = torch.matmul(q, k.transpose(-1, -2)).view(2, 3, 4, 7, 7)
            w = w.masked_fill(masked.unsqueeze(1).unsqueeze(0), float("-inf"))
            return torch.matmul(w.view(-1, 4, 7, 7).softmax(-1), v)

        q, k, v = (torch.randn(6, 4, 7, 16) for _ in range(3))
        self.assert_not_rewritten(f, q, k, v, torch.rand(3, 7, 7) > 0.8, guard="layout_view")

    def test_bias_that_does_not_broadcast_to_scores(self):
        def f(q, k, v, bias):
            return torch.matmul((torch.matmul(q, k.transpose(-1, -2)) + bias).softmax(-1), v)

        q, k, v = qkv(b=1)
        # [3, 1, 4, 7, 9] broadcasts the scores up to 5-D: no longer one attention.
        self.assert_not_rewritten(f, q, k, v, torch.randn(3, 1, 4, 7, 9), guard="bias_broadcasts_to_scores")

    def test_scale_after_softmax(self):
        def f(q, k, v):
            return torch.matmul(torch.matmul(q, k.transpose(-1, -2)).softmax(-1) * 0.5, v)

        self.assert_not_rewritten(f, *qkv(), guard="probs_to_values")

    def test_bias_before_the_softcap(self):
        def f(q, k, v, bias):
            w = torch.tanh((torch.matmul(q, k.transpose(-1, -2)) + bias) / 30.0) * 30.0
            return torch.matmul(w.softmax(-1), v)

        self.assert_not_rewritten(f, *qkv(), torch.randn(7, 9), guard="softcap")

    def test_tanh_scaled_by_a_negative_number(self):
        def f(q, k, v):
            w = torch.tanh(torch.matmul(q, k.transpose(-1, -2)) / 30.0) * -30.0
            return torch.matmul(w.softmax(-1), v)

        self.assert_not_rewritten(f, *qkv(), guard="softcap")

    def test_clamp_at_a_small_floor(self):
        def f(q, k, v):
            return torch.matmul(torch.clamp(torch.matmul(q, k.transpose(-1, -2)), min=-5.0).softmax(-1), v)

        self.assert_not_rewritten(f, *qkv(), guard="clamp")

    def test_clamp_after_a_neg_inf_fill(self):
        def f(q, k, v, m):
            w = torch.matmul(q, k.transpose(-1, -2)).masked_fill(m, float("-inf"))
            return torch.matmul(torch.max(w, torch.full((), torch.finfo(w.dtype).min, dtype=w.dtype)).softmax(-1), v)

        self.assert_not_rewritten(f, *qkv(), torch.rand(7, 9) > 0.5, guard="clamp")

    def test_clamp_after_a_fill_and_a_later_bias(self):
        """where(keep, s, finfo.min) + mask, then a clamp at finfo.min: fill + mask may have
        overflowed to -inf, and the clamp would turn it back; not carried."""

        def f(q, k, v, m, pad):
            mask = torch.where(pad, 0.0, torch.finfo(torch.float32).min)  # finite: HF's helpers
            w = torch.matmul(q, k.transpose(-1, -2)).masked_fill(m, torch.finfo(torch.float32).min) + mask
            return torch.matmul(torch.max(w, torch.full((), torch.finfo(w.dtype).min)).softmax(-1), v)

        self.assert_not_rewritten(f, *qkv(), torch.rand(7, 9) > 0.5, torch.rand(7, 9) > 0.5, guard="clamp")

    def test_mask_filled_with_zero(self):
        def f(q, k, v, m):
            return torch.matmul(torch.matmul(q, k.transpose(-1, -2)).masked_fill(m, 0.0).softmax(-1), v)

        self.assert_not_rewritten(f, *qkv(), torch.rand(7, 9) > 0.5, guard="fill_is_exact")

    def test_fill_after_a_bias_that_followed_a_finite_fill(self):
        def f(q, k, v, m, b):
            w = torch.matmul(q, k.transpose(-1, -2)).masked_fill(m, torch.finfo(torch.float32).min) + b
            return torch.matmul(w.masked_fill(~m, torch.finfo(torch.float32).min).softmax(-1), v)

        self.assert_not_rewritten(f, *qkv(), torch.rand(7, 9) > 0.5, torch.randn(7, 9), guard="fill_is_exact")

    def test_mask_filled_with_small_finite_value(self):
        def f(q, k, v, m):
            return torch.matmul(torch.matmul(q, k.transpose(-1, -2)).masked_fill(m, -1e4).softmax(-1), v)

        self.assert_not_rewritten(f, *qkv(), torch.rand(7, 9) > 0.5, guard="fill_is_exact")

    def test_einsum_values_contracted_over_the_queries(self):
        def f(q, k, v):
            w = torch.einsum("bhqd,bhkd->bhqk", q, k).softmax(-1)
            return torch.einsum("bhqk,bhqd->bhkd", w, v)

        self.assert_not_rewritten(f, *qkv(nk=7), guard="einsum_roles")

    def test_einsum_scores_summed_over_the_heads(self):
        """Heads and head dim contracted together ("bqhd,bkhd->bqk"): one score per batch entry."""

        def f(q, k, v):
            w = torch.einsum("bqhd,bkhd->bqk", q, k).softmax(-1)
            return torch.einsum("bqk,bkhd->bqhd", w, v)

        self.assert_not_rewritten(f, *(t.transpose(1, 2) for t in qkv()), guard="einsum_roles")

    def test_einsum_that_broadcasts_the_keys_batch(self):
        def f(q, k, v):
            return torch.einsum("bhqk,bhkd->bhqd", torch.einsum("bhqd,bhkd->bhqk", q, k).softmax(-1), v)

        q, k, v = qkv()
        self.assert_not_rewritten(f, q, k[:1], v, guard="score_operands")

    def test_einsum_blocks_that_merge_only_by_a_copy(self):
        """Batch and block dims stored block-major: [B, nb] is not one dim of q without a copy."""

        def f(q, k, v):
            q = q.transpose(0, 1)  # [nb, B, ...] storage seen as [B, nb, ...]
            w = torch.einsum("...qhd,...khd->...hqk", q, k).softmax(-1)
            return torch.einsum("...hqk,...khd->...qhd", w, v)

        g = torch.Generator().manual_seed(0)
        q = torch.randn(3, 2, 4, 2, 8, generator=g)
        k, v = (torch.randn(2, 3, 5, 2, 8, generator=g) for _ in range(2))
        self.assert_not_rewritten(f, q, k, v, guard="einsum_batch_view")

    def test_weights_returned(self):
        def f(q, k, v):
            p = torch.matmul(q, k.transpose(-1, -2)).softmax(-1)
            return torch.matmul(p, v), p

        torch._dynamo.reset()
        reports = {}

        def capture(gm, ex):
            reports["r"] = rewrite_graph(gm)
            return gm.forward

        torch.compile(f, backend=capture)(*qkv())
        self.assertEqual([r.guard for r in reports["r"]], ["used_once"])
        # The user is told why (the probabilities must exist anyway) and what lets the site fuse.
        self.assertIn("is an output of this compiled graph", reports["r"][0].reason)
        self.assertIn("attn_implementation='sdpa'", reports["r"][0].reason)

    def test_weights_summed(self):
        def f(q, k, v):
            p = torch.matmul(q, k.transpose(-1, -2)).softmax(-1)
            return torch.matmul(p, v) + p.sum()

        self.assert_not_rewritten(f, *qkv(), guard="used_once")

    def test_multiplicative_mask(self):
        def f(q, k, v, m):
            return torch.matmul((torch.matmul(q, k.transpose(-1, -2)) * m).softmax(-1), v)

        self.assert_not_rewritten(f, *qkv(), torch.rand(7, 9), guard="scale_is_scalar")

    def test_row_scale_on_3d_scores_viewed_to_4d(self):
        """A per-row scale on [B·H, Nq, Nk] scores that the rewrite runs in 4-D: its dims would
        not line up with q's there, so the site stays eager."""

        def f(q, k, v, r, mask):
            w = (torch.bmm(q, k.transpose(1, 2)) * r).view(2, 4, 7, 9) + mask
            return torch.bmm(w.softmax(-1).view(8, 7, 9), v)

        q, k, v = (t.reshape(8, t.shape[2], 16) for t in qkv())
        self.assert_not_rewritten(f, q, k, v, torch.rand(8, 7, 1), torch.randn(2, 1, 7, 9), guard="scale_is_scalar")


if __name__ == "__main__":
    expecttest.run_tests()
