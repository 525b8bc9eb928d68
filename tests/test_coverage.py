"""Rewrite coverage over common HuggingFace architectures (flash_inductor.coverage).

Each row: every attention site rewritten, and (without dropout) the output and every
parameter gradient equal to eager within 1e-4 relative; with dropout, rewritten with finite
output and gradients. Rows that the installed transformers cannot build (BLOOM has no sdpa
implementation) are skipped with its own message.
"""

from __future__ import annotations

import pytest

from flash_inductor.coverage import MODES, check
from flash_inductor.models import COVERAGE


# Beyond the list, one model per spelling family added later: Gemma 2 (soft-capping),
# XGLM (a clamp and 3-D/4-D views), XLM (mask.expand_as(scores)), SqueezeBERT (a key already
# transposed), Mixtral (a router softmax beside attention), GPT-Neo (a finite causal fill, then
# the mask added), MPT (a finite fill after ALiBi, which the rewrite cannot see into), DeBERTa
# (`scores + 0` before a bool mask's fill: it crashed the compile before session 8), BEiT (images,
# a learned relative position bias), wav2vec 2.0 (raw audio in), CLIP (a text and a vision tower),
# WavLM (F.multi_head_attention_forward, one node in Dynamo's graph: flash_inductor/rewrite/mha.py),
# GPT-OSS (attention sinks), Swin V2 (a per-head logit scale; shifted windows through a 5-D view).
BEYOND = ("gemma2", "xglm", "xlm", "squeezebert", "mixtral", "gpt_neo", "mpt", "deberta", "beit", "wav2vec2",
          "clip", "wavlm", "gpt_oss", "swinv2")


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
# (inlined: flash_inductor/rewrite/functions.py). Its dropout is another Function with its own
# random mask (StableDropout), left alone and refused by name.
@pytest.mark.parametrize("mode", MODES)
def test_sew_d_xsoftmax(mode):
    row = check("sew-d", "eager", mode)
    assert not row.error, row.error
    assert row.sites == 2, row.skipped_reasons
    if mode == "train+dropout":
        assert row.rewritten == 0 and all("probs_to_values" in r for r in row.skipped_reasons), row.skipped_reasons
        return
    assert row.rewritten == row.sites, row.skipped_reasons
    assert row.max_rel_err < 1e-4, f"max relative error {row.max_rel_err:.2e}"
