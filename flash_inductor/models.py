"""HuggingFace models built from their configs with random weights (no download), for the demo,
`explain`, the coverage tests and the end-to-end benchmarks.

`size="tiny"` gives a 2-layer model that compiles in seconds on a CPU (tests); `size="base"`
gives the published architecture's real dimensions (demo, benchmarks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Published dimensions of each architecture (bert-base-uncased, gpt2, t5-small, a 1B LLaMA).
BASE = {
    "bert": dict(model_type="bert", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, vocab_size=30522),
    "gpt2": dict(model_type="gpt2", n_embd=768, n_layer=12, n_head=12, vocab_size=50257),
    "t5": dict(model_type="t5", d_model=512, num_layers=6, num_decoder_layers=6, num_heads=8, d_kv=64,
               d_ff=2048, vocab_size=32128),
    "llama": dict(model_type="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=8, intermediate_size=8192, vocab_size=32000),
    # The end-to-end benchmark's models (issue 5): gpt2-medium, t5-base, bloom-560m.
    "gpt2-medium": dict(model_type="gpt2", n_embd=1024, n_layer=24, n_head=16, vocab_size=50257,
                        n_positions=1024),
    "t5-base": dict(model_type="t5", d_model=768, num_layers=12, num_decoder_layers=12, num_heads=12,
                    d_kv=64, d_ff=3072, vocab_size=32128),
    "bloom": dict(model_type="bloom", hidden_size=1024, n_layer=24, n_head=16, vocab_size=250880),
    # Gemma 2 2B: logit soft-capping (50) on head dim 256, grouped KV heads, sliding windows of 4096.
    "gemma2-2b": dict(model_type="gemma2", hidden_size=2304, num_hidden_layers=26, num_attention_heads=8,
                      num_key_value_heads=4, head_dim=256, intermediate_size=9216, vocab_size=256000,
                      attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4096,
                      query_pre_attn_scalar=256),
}
TINY = {
    "bert": dict(model_type="bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=37, vocab_size=99),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, vocab_size=99, bos_token_id=0,
                 eos_token_id=0),
    "t5": dict(model_type="t5", d_model=32, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=8,
               d_ff=37, vocab_size=99),
    "llama": dict(model_type="llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=37, vocab_size=99),
    "bloom": dict(model_type="bloom", hidden_size=32, n_layer=2, n_head=4, vocab_size=99),
    "gemma2-2b": dict(model_type="gemma2", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, intermediate_size=37, vocab_size=99,
                      attn_logit_softcapping=50.0, sliding_window=4),
}
TINY["gpt2-medium"], TINY["t5-base"] = TINY["gpt2"], TINY["t5"]
# The demo's and the HF tests' models; the others in BASE serve the end-to-end benchmark.
MODELS = ("bert", "gpt2", "t5", "llama")

# The architectures the coverage tool checks (transformers model_type names).
COVERAGE = ("bert", "roberta", "distilbert", "albert", "electra", "gpt2", "gptj", "opt", "bloom", "falcon",
            "llama", "mistral", "qwen2", "gemma", "phi", "t5", "bart", "whisper", "vit")
# Shrinks any of them to 2 layers of width 64 (attributes a config lacks are skipped).
_SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=96, vocab_size=128, max_position_embeddings=64, d_model=64, encoder_layers=2,
              decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=96,
              decoder_ffn_dim=96, num_layers=2, num_decoder_layers=2, num_heads=4, d_ff=96, d_kv=16,
              n_positions=64, head_dim=16, embedding_size=64, rotary_dim=8, num_mel_bins=16,
              max_source_positions=32, max_target_positions=64, image_size=32, patch_size=8,
              pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=0,
              # wav2vec 2.0 / HuBERT: no SpecAugment masks in training (random, and longer than
              # the few frames these inputs have)
              mask_time_prob=0.0, mask_feature_prob=0.0,
              # SigLIP's text head projects to this width (it defaults to the unshrunk 768)
              projection_size=64)
# DeepSeek-V2/V3 (MLA): q·kᵀ over 8 + 8 dims, V of 16; no KV-head sharing; 4 experts
_MLA = dict(num_key_value_heads=4, qk_nope_head_dim=8, qk_rope_head_dim=8, head_dim=8, v_head_dim=16,
            kv_lora_rank=32, q_lora_rank=48, n_routed_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=32, first_k_dense_replace=1, n_group=1, topk_group=1)
# Architectures whose 2-layer shrink needs more than _SMALL: hybrids keep one attention layer of
# the two (their default patterns put none in the first two).
_PER_MODEL = {
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, mamba_dt_rank=8),
    "bamba": dict(attn_layer_indices=[1], mamba_n_heads=4, mamba_d_head=32, mamba_d_state=16, mamba_chunk_size=8),
    "recurrent_gemma": dict(block_types=["recurrent", "attention"], lru_width=64),
    "deepseek_v2": _MLA,
    "deepseek_v3": _MLA,
    "deepseek_v32": _MLA,
    "youtu": _MLA,
    # Swin / Swinv2: 2 stages of 2 blocks (the second shifts its windows), 8x8 patches in windows of 4
    "swin": dict(depths=[2, 2], num_heads=[2, 4], embed_dim=32, window_size=4, patch_size=4),
    "swinv2": dict(depths=[2, 2], num_heads=[2, 4], embed_dim=32, window_size=4, patch_size=4),
    "funnel": dict(block_sizes=[1, 1], block_repeats=[1, 1], architectures=["FunnelModel"]),
    # MiniCPM3: MLA without experts (its config ties head_dim to the rope dims)
    "minicpm3": _MLA,
    # Hybrids keeping one attention layer of the two: Qwen3-Next (gated DeltaNet + gated attention,
    # 4 experts), GraniteMoE-Hybrid (Mamba 2 + attention)
    "qwen3_next": dict(layer_types=["linear_attention", "full_attention"], linear_key_head_dim=16,
                       linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                       num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=32),
    # Qwen 3.5 (text): as Qwen3-Next
    "qwen3_5_text": dict(layer_types=["linear_attention", "full_attention"], linear_key_head_dim=16,
                         linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                         num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                         shared_expert_intermediate_size=32),
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention"], mamba_n_heads=4, mamba_d_head=32,
                             mamba_d_state=16, mamba_chunk_size=8),
    # Gemma 4 (text): one sliding-window layer, one full, each with the default head dim (the
    # published config's per-layer list names layers 5..29), small per-layer inputs
    "gemma4_text": dict(layer_types=["sliding_attention", "full_attention"], per_layer_config={},
                        hidden_size_per_layer_input=16, vocab_size_per_layer_input=128, num_kv_shared_layers=0),
    # OLMo hybrid: one linear-attention layer, one full
    "olmo_hybrid": dict(layer_types=["linear_attention", "full_attention"]),
    # CANINE reads Unicode code points (its config has no vocabulary): ids drawn below 128
    "canine": dict(vocab_size=128),
    # Per-stage lists: PVT (2 stages, spatial reduction 2 then 1), LeViT (2 stages, one subsampling
    # between them, 4x4 then 2x2 tokens), Hiera (2 stages, one query pooling)
    "pvt": dict(num_encoder_blocks=2, depths=[1, 1], hidden_sizes=[32, 64], patch_sizes=[4, 2], strides=[4, 2],
                num_attention_heads=[1, 2], sequence_reduction_ratios=[2, 1], mlp_ratios=[2, 2]),
    "levit": dict(image_size=64, patch_size=16, hidden_sizes=[32, 64], num_attention_heads=[2, 4], depths=[1, 1],
                  key_dim=[8, 8], attention_ratio=[2, 2], mlp_ratio=[2, 2], down_ops=[["Subsample", 8, 2, 4, 2, 2]]),
    "hiera": dict(image_size=[64, 64], patch_size=[7, 7], embed_dim=16, hidden_size=32, depths=[1, 1], num_heads=[1, 2],
                  num_query_pool=1, masked_unit_attention=[True, False]),
    # Audio Spectrogram Transformer: 64 frames of 16 mel bins, 5 patches of 16x16 (stride 10)
    "audio-spectrogram-transformer": dict(max_length=64),
    # Encoder depths under other names
    "moonshine": dict(encoder_num_hidden_layers=2),
    "prophetnet": dict(num_encoder_layers=2),
    # Gemma 3n (text): per-layer lists for 2 layers (one sliding, one full), no KV sharing, small
    # per-layer inputs and LAuReL rank
    "gemma3n_text": dict(layer_types=["sliding_attention", "full_attention"], intermediate_size=[96, 96],
                         activation_sparsity_pattern=[0.0, 0.0], num_kv_shared_layers=0,
                         hidden_size_per_layer_input=16, vocab_size_per_layer_input=128, laurel_rank=8),
    # LayoutLMv3: 4 box coordinates and 2 sizes concatenated make the hidden width (4 * 12 + 2 * 8 = 64)
    "layoutlmv3": dict(coordinate_size=12, shape_size=8),
    # X-MOD: its language adapters need a language when the inputs name none
    "xmod": dict(default_language="en_XX"),
    # PEGASUS-X: local blocks of 4 (7 tokens padded to 2 staggered blocks) and 2 global tokens
    "pegasus_x": dict(block_size=4, num_global_tokens=2),
    # Video: 2 frames (VideoMAE: one tubelet of 2; TimeSformer: divided space-time attention)
    "videomae": dict(num_frames=2),
    "timesformer": dict(num_frames=2),
}
# Config attributes that hold a dropout probability, across these architectures.
_DROPOUT_ATTRS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "resid_pdrop", "embd_pdrop",
                  "attn_pdrop", "dropout_rate", "attention_dropout", "dropout", "activation_dropout",
                  "hidden_dropout", "classifier_dropout", "summary_first_dropout")


def _set_dropout(cfg, p: float | None) -> None:
    """Every dropout rate of the config set to `p` (None keeps the config's own)."""
    if p is None:
        return
    for attr in _DROPOUT_ATTRS:
        if isinstance(getattr(cfg, attr, None), float):
            setattr(cfg, attr, p)


def _padded_text_inputs(cfg, batch: int, seq_len: int, gen: torch.Generator) -> dict:
    """Token ids (no special tokens) and a padding mask: the last sequence is 2/3 real tokens."""
    ids = torch.randint(3, cfg.vocab_size, (batch, seq_len), generator=gen)
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    mask[-1, max(1, (2 * seq_len) // 3):] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if cfg.is_encoder_decoder:
        inputs["decoder_input_ids"] = ids
    return inputs


@dataclass
class Built:
    name: str
    model: torch.nn.Module
    inputs: dict  # keyword inputs: input_ids, attention_mask (with padding), decoder_input_ids
    num_attention_layers: int


def build(
    name: str,
    *,
    size: str = "tiny",
    attn_implementation: str = "eager",
    batch: int = 2,
    seq_len: int = 7,
    dropout: float | None = 0.0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Built:
    """A model with random weights and a padded batch (the last sequence is 2/3 real tokens).

    `dropout=None` keeps the config's own dropout rates; a number sets every rate to it.
    """
    from transformers import AutoConfig, AutoModel

    table = TINY if size == "tiny" else BASE
    if name not in table:
        raise ValueError(f"model={name!r} is not known (choose from {', '.join(table)})")
    kw = dict(table[name])
    model_type = kw.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **kw)
    cfg._attn_implementation = attn_implementation
    _set_dropout(cfg, dropout)
    torch.manual_seed(seed)
    model = AutoModel.from_config(cfg, attn_implementation=attn_implementation).to(device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    inputs = {k: v.to(device) for k, v in _padded_text_inputs(cfg, batch, seq_len, gen).items()}
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None) or cfg.num_layers
    if model_type == "t5":  # encoder self, decoder self and decoder cross attention
        layers = cfg.num_layers + 2 * cfg.num_decoder_layers
    return Built(name, model, inputs, layers)


# Architectures with no AutoModel entry (a decoder or a generation model alone), or whose config
# lives under another model type: (config model type, the model class's name in transformers).
_OTHER_CLASS = {
    "trocr": ("trocr", "TrOCRForCausalLM"),
    "musicgen": ("musicgen_decoder", "MusicgenForCausalLM"),
    "pix2struct": ("pix2struct", "Pix2StructForConditionalGeneration"),
}


def _special_inputs(model_type: str, cfg, batch: int, seq_len: int, gen: torch.Generator) -> dict | None:
    """Inputs of architectures that read neither token ids nor one of the usual modalities."""
    if model_type == "decision_transformer":  # (return, state, action) triples of an episode, padded
        inputs = {"states": torch.randn(batch, seq_len, cfg.state_dim, generator=gen),
                  "actions": torch.randn(batch, seq_len, cfg.act_dim, generator=gen),
                  "returns_to_go": torch.randn(batch, seq_len, 1, generator=gen),
                  "timesteps": torch.arange(seq_len).expand(batch, seq_len).contiguous()}
        inputs["attention_mask"] = _padded_text_inputs(cfg, batch, seq_len, gen)["attention_mask"]
        return inputs
    if model_type == "musicgen":  # one row of ids per codebook: [B · codebooks, N]
        inputs = _padded_text_inputs(cfg, batch * cfg.num_codebooks, seq_len, gen)
        return inputs
    if model_type == "pix2struct":  # flattened patches, each [row, column, pixels...], and a decoder
        v = cfg.vision_config
        rows = torch.arange(seq_len, dtype=torch.float32) // 4 + 1
        cols = torch.arange(seq_len, dtype=torch.float32) % 4 + 1
        pixels = torch.randn(batch, seq_len, v.patch_embed_hidden_size, generator=gen)
        patches = torch.stack([rows, cols], -1).expand(batch, seq_len, 2)
        text = _padded_text_inputs(cfg.text_config, batch, seq_len, gen)
        return {"flattened_patches": torch.cat([patches, pixels], -1), "attention_mask": text["attention_mask"],
                "decoder_input_ids": text["input_ids"]}
    return None


def build_any(model_type: str, *, attn_implementation: str = "eager", dropout: float | None = 0.0,
              batch: int = 2, seq_len: int = 7, seed: int = 0) -> Built:
    """Any transformers architecture, shrunk to 2 small layers, with inputs of its modality."""
    import transformers
    from transformers import AutoConfig, AutoModel, PretrainedConfig

    config_type, class_name = _OTHER_CLASS.get(model_type, (model_type, None))
    cfg = AutoConfig.for_model(config_type)
    # A text + vision pair (CLIP, SigLIP) is shrunk and fed tower by tower.
    text_cfg, vision_cfg = getattr(cfg, "text_config", None), getattr(cfg, "vision_config", None)
    # T5Gemma: an encoder and a decoder config, shrunk alike
    halves = [c for c in (getattr(cfg, "encoder", None), getattr(cfg, "decoder", None))
              if isinstance(c, PretrainedConfig)]
    for c in (cfg, text_cfg, vision_cfg, *halves):
        if c is None:
            continue
        for key, value in _SMALL.items():
            if c is cfg and key in _PER_MODEL.get(model_type, {}):
                continue
            try:
                # Reading may raise too: Gemma 4's per-layer attributes (head_dim) refuse a global read.
                present = hasattr(c, key) or key in getattr(c, "attribute_map", {})
            except Exception:
                continue
            if present:
                try:
                    setattr(c, key, value)
                except (AttributeError, NotImplementedError):  # a derived property (Falcon's head_dim), or
                    pass  # one a config refuses to set (XLNet's max_position_embeddings)
        _set_dropout(c, dropout)
    for key, value in _PER_MODEL.get(model_type, {}).items():
        setattr(cfg, key, value)
    if halves and hasattr(halves[-1], "cross_attention_hidden_size"):  # T5Gemma's decoder reads the encoder's width
        halves[-1].cross_attention_hidden_size = halves[0].hidden_size
    cfg._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    if class_name:
        model = getattr(transformers, class_name)._from_config(cfg, attn_implementation=attn_implementation)
    else:
        model = AutoModel.from_config(cfg, attn_implementation=attn_implementation)
    gen = torch.Generator().manual_seed(seed)
    modality = getattr(model, "main_input_name", "input_ids")
    if (special := _special_inputs(model_type, cfg, batch, seq_len, gen)) is not None:
        inputs = special
    elif text_cfg is not None and vision_cfg is not None:
        inputs = _padded_text_inputs(text_cfg, batch, seq_len, gen)
        channels = getattr(vision_cfg, "num_channels", 3)
        inputs["pixel_values"] = torch.randn(batch, channels, vision_cfg.image_size, vision_cfg.image_size, generator=gen)
    elif model_type == "whisper":
        inputs = {"input_features": torch.randn(batch, cfg.num_mel_bins, 2 * cfg.max_source_positions, generator=gen),
                  "decoder_input_ids": torch.randint(3, cfg.vocab_size, (batch, seq_len), generator=gen)}
    elif modality == "input_features":  # Speech2Text: log-mel frames [B, T, features], 4 per token
        feats = cfg.input_feat_per_channel * getattr(cfg, "input_channels", 1)
        inputs = {"input_features": torch.randn(batch, 4 * seq_len, feats, generator=gen),
                  "decoder_input_ids": torch.randint(3, cfg.vocab_size, (batch, seq_len), generator=gen)}
    elif modality == "pixel_values":  # ViT, DeiT, BEiT, DINOv2, ...
        channels = getattr(cfg, "num_channels", 3)
        # Hiera gives [H, W]; video models add frames: [B, T, C, H, W]
        size = cfg.image_size if isinstance(cfg.image_size, (list, tuple)) else (cfg.image_size,) * 2
        frames = (cfg.num_frames,) if hasattr(cfg, "num_frames") else ()
        inputs = {"pixel_values": torch.randn(batch, *frames, channels, *size, generator=gen)}
    elif model_type == "audio-spectrogram-transformer":  # a spectrogram [B, frames, mel bins]
        inputs = {"input_values": torch.randn(batch, cfg.max_length, cfg.num_mel_bins, generator=gen)}
    elif modality == "input_values":  # wav2vec 2.0, HuBERT, ...: raw audio, about seq_len frames of it
        hop = math.prod(getattr(cfg, "conv_stride", (320,)))
        inputs = {"input_values": torch.randn(batch, hop * (seq_len + 1), generator=gen)}
        if cfg.is_encoder_decoder:  # Moonshine: a decoder reading token ids
            inputs["decoder_input_ids"] = torch.randint(3, cfg.vocab_size, (batch, seq_len), generator=gen)
    else:
        inputs = _padded_text_inputs(cfg, batch, seq_len, gen)
    return Built(model_type, model, inputs, num_attention_layers=-1)


def main_output(out) -> torch.Tensor:
    """The tensor to compare between eager and compiled runs."""
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
