"""Model FLOPs of one training token, the numerator of the utilisation columns.

With N the parameters that take part in a matrix product, N_a the adapter
parameters, L layers, T the sequence length and A the attention width
(query heads times head width):

    full:  6 * N               + 12 * L * T * A
    lora:  4 * N + 6 * N_a     + 12 * L * T * A

A weight costs 2 FLOPs per token in the forward pass (one multiply-add), 2
for the input gradient and 2 for its own gradient. A frozen weight needs no
gradient of its own, hence 4. The attention products QK^T and AV cost
2 * T * A each per token and layer forward, and twice that backward. T is the
whole sequence: the causal mask is not used to halve it. Norms, softmax,
rotary embeddings, the loss and the optimizer update are not counted, nor is
the forward pass that rematerialisation repeats, so the count is the same
whatever the implementation does.
"""

FULL = "full"
LORA = "lora"


def matmul_parameters(*, total: int, embedding: int, tied: bool) -> int:
  """Return N, the parameters that take part in a matrix product for each token.

  Args:
    total: every base parameter (adapters excluded), a tied embedding counted
      once.
    embedding: the size of the token embedding table, V * D.
    tied: whether the output head reuses the embedding. A tied table is the
      head's kernel, so it stays in N; an untied one is only looked up, so it
      is left out (the separate head kernel is in `total`).
  """
  return total if tied else total - embedding


def training_flops_per_token(
    *,
    mode: str,
    matmul_params: int,
    adapter_params: int,
    layers: int,
    seq_len: int,
    attention_width: int,
) -> float:
  """Return the model FLOPs of one training token (forward and backward).

  Args:
    mode: "full" (every weight trains) or "lora" (only adapters train).
    matmul_params: N, from `matmul_parameters`.
    adapter_params: N_a, the trainable adapter parameters (0 in full mode).
    layers: L, the number of decoder layers.
    seq_len: T, the tokens per sequence.
    attention_width: A, query heads times head width.

  Raises:
    ValueError: for an unknown mode.
  """
  attention = 12 * layers * seq_len * attention_width
  if mode == FULL:
    return 6 * matmul_params + attention
  if mode == LORA:
    return 4 * matmul_params + 6 * adapter_params + attention
  raise ValueError(f"mode must be {FULL!r} or {LORA!r}, got {mode!r}.")


FORMULA_TEXT = (
    "full: 6 N + 12 L T A; LoRA: 4 N + 6 N_a + 12 L T A FLOPs per token, where N"
    " is the parameters in matrix products (a tied embedding counted once as"
    " the output head, an untied input embedding left out), N_a the adapter"
    " parameters, L the layers, T the sequence length and A the query heads"
    " times the head width; remat recomputation, norms, softmax, loss and"
    " optimizer are not counted"
)
