"""Rewrite coverage over common HuggingFace architectures (flash_inductor.coverage).

Each row: every attention site rewritten, and (without dropout) the output and every
parameter gradient equal to eager within 1e-4 relative; with dropout, rewritten with finite
output and gradients. Rows that the installed transformers cannot build (BLOOM has no sdpa
implementation) are skipped with its own message.
"""

from __future__ import annotations

import pytest
import torch

from flash_inductor.coverage import MODES, check
from flash_inductor.models import COVERAGE


# Beyond the list, one model per spelling family added later: Gemma 2 (soft-capping),
# XGLM (a clamp and 3-D/4-D views), XLM (mask.expand_as(scores)), SqueezeBERT (a key already
# transposed), Mixtral (a router softmax beside attention), GPT-Neo (a finite causal fill, then
# the mask added), MPT (a finite fill after ALiBi, which the rewrite cannot see into), DeBERTa
# (`scores + 0` before a bool mask's fill: it crashed the compile before session 8), BEiT (images,
# a learned relative position bias), wav2vec 2.0 (raw audio in), CLIP (a text and a vision tower),
# WavLM (F.multi_head_attention_forward, one node in Dynamo's graph: flash_inductor/rewrite/mha.py),
# GPT-OSS (attention sinks), Swin V2 (a per-head logit scale; shifted windows through a 5-D view),
# OpenAI GPT (a multiplicative causal mask s·b − 1e4·(1 − b), checked at run time).
BEYOND = ("gemma2", "xglm", "xlm", "squeezebert", "mixtral", "gpt_neo", "mpt", "deberta", "beit", "wav2vec2",
          "clip", "wavlm", "gpt_oss", "swinv2", "openai-gpt", "pix2struct", "musicgen", "granite_swa",
          "gemma4_text")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("model", COVERAGE + BEYOND)
def test_every_attention_layer_rewritten(model, impl, mode):
    row = check(model, impl, mode)
    if row.error.startswith("build:"):
        pytest.skip(row.error)
    assert not row.error, row.error
    assert row.sites > 0, "no attention site was traced"
    assert row.rewritten == row.sites, row.skipped_reasons
    if mode != "train+dropout":
        assert row.max_rel_err < 1e-4, f"max relative error {row.max_rel_err:.2e}"


# SEW-D: its XSoftmax zeroes the probabilities in place and, in training, is an autograd.Function
# (inlined: flash_inductor/rewrite/functions.py). Its dropout on them is another Function with its
# own random mask (StableDropout), replaced by the F.dropout it equals in distribution and gradient.
@pytest.mark.parametrize("mode", MODES)
def test_sew_d_xsoftmax(mode):
    row = check("sew-d", "eager", mode)
    assert not row.error, row.error
    assert row.sites == 2, row.skipped_reasons
    assert row.rewritten == row.sites, row.skipped_reasons
    if mode != "train+dropout":
        assert row.max_rel_err < 1e-4, f"max relative error {row.max_rel_err:.2e}"


def test_sew_d_stable_dropout_is_carried_into_the_op():
    """Each site's op applies the dropout (p = 0.1, the config's); StableDropout elsewhere (on
    the relative embeddings) stays the model's own Function."""
    from flash_inductor.backend import rewrite_only
    from flash_inductor.models import build_any
    from flash_inductor.rewrite.report import recording

    built = build_any("sew-d", attn_implementation="eager", dropout=0.1)
    seen = []

    def capture(gm, example_inputs):
        seen.append(gm)
        return rewrite_only(gm, example_inputs)

    torch._dynamo.reset()
    with recording() as report:
        torch.compile(built.model.train(), backend=capture)(**built.inputs)
    torch._dynamo.reset()
    assert report.rewritten == len(report.sites) == 2
    assert all("softmax·masked_fill(probs, 0)·dropout" in s.line() for s in report.sites)
    ops = [n for gm in seen for n in gm.graph.nodes if n.op == "call_function" and "flash" in str(n.target)]
    # The rate is 1 - 0.9, what the Function's bernoulli_(1 - p) keeps: 0.1 within rounding.
    rates = [[a for a in (*n.args, *n.kwargs.values()) if isinstance(a, float) and abs(a - 0.1) < 1e-12] for n in ops]
    assert len(ops) == 2 and all(rates), [n.format_node() for n in ops]
    functions = [n for gm in seen for n in gm.graph.nodes if "autograd_function_apply" in str(n.target)]
    assert functions, "the relative embeddings' StableDropout was replaced too"
