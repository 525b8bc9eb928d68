"""The catalogue of attention spellings the rewrite recognises, one small module per family.

Installed as `flash_inductor.patterns`. Each family turns one part of an attention subgraph,
in whatever spelling a model wrote it, into a normalised step, or refuses with a reason:

| module       | recognises                                                        |
| ------------ | ----------------------------------------------------------------- |
| `scores`     | q·kᵀ by matmul / bmm / `@` / einsum / baddbmm; P·V likewise       |
| `einsum`     | which letter of an einsum is batch, heads, N or D, in any order   |
| `scale`      | multiply or divide by a number, symbol or 0-d tensor              |
| `masks`      | additive biases and masks; masked_fill / where fills              |
| `softmax`    | softmax over the key dim, fp32 upcasts and casts around it        |
| `dropout`    | F.dropout / nn.Dropout / torch.dropout on the probabilities       |
| `gqa`        | repeat_kv (expand + reshape) and repeat_interleave on K and V     |
| `sdpa`       | F.scaled_dot_product_attention calls                              |
| `mha`        | F.multi_head_attention_forward (nn.MultiheadAttention, WavLM)     |

The rewrite (flash_inductor.rewrite.matcher) composes them: anchored on a softmax, it walks
back through scale and mask steps to the score product and forward through casts and dropout to
the value product. Families compose, so every combination of spellings is covered without a
pattern per combination.
"""
