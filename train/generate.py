"""Greedy text generation with a Flax causal language model.

The prompts are rendered (with the chat template when `chat` is set),
tokenized and left-padded into one fixed buffer `[B, P + N]`: P prompt
columns, rounded up to a multiple of `prompt_multiple`, and N =
`max_new_tokens` columns for the reply. A jitted `while_loop` then runs the
whole buffer through the model once per new token. Each pass takes the
argmax at the last filled column and writes it into the next one, until every
row has emitted an EOS id or the buffer is full. Because the buffer never changes
shape, the loop compiles once per (B, P + N).

Left padding keeps the last prompt token of every row in the same column.
Padding is hidden from attention by `attention_mask`, and `positions` count
real tokens only, so a padded row computes the same logits as the same
prompt alone.
"""

import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.train import chat as chat_lib

logger = logging.getLogger(__name__)

Prompt = str | Sequence[Mapping[str, str]]


def eos_token_ids(tokenizer: Any, generation_config: Mapping[str, Any] | None = None) -> tuple[int, ...]:
  """Return the ids that end generation.

  They come from `generation_config["eos_token_id"]` (an id or a list of ids)
  when it is set, else from `tokenizer.eos_token_id`; an empty tuple when
  neither has one.
  """
  eos = None
  if generation_config is not None:
    eos = generation_config.get("eos_token_id")
  if eos is None:
    eos = getattr(tokenizer, "eos_token_id", None)
  if eos is None:
    return ()
  if isinstance(eos, int):
    return (eos,)
  return tuple(int(token) for token in eos)


def encode_prompt(tokenizer: Any, prompt: Prompt, *, chat: bool) -> list[int]:
  """Return the token ids of one prompt.

  With `chat`, a string becomes a single user message and a list of messages
  is used as it is. Both are rendered with the chat template and its
  generation prompt. Without `chat`, the prompt must be a string and is
  tokenized with the tokenizer's usual special tokens.

  Raises:
    ValueError: if the prompt is of the wrong type, the tokenizer has no chat
      template when `chat` is set, or the prompt has no tokens.
  """
  if chat:
    chat_lib.check_chat_template(tokenizer)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    messages = chat_lib.normalize_messages(messages, "Prompt")
    text = chat_lib.render(tokenizer, messages, generation_prompt=True)
    ids = chat_lib.encode(tokenizer, text)
  else:
    if not isinstance(prompt, str):
      raise ValueError(
          f"Prompt {prompt!r:.200} is not a string; pass a string, or set"
          " chat=True to send a list of messages."
      )
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
  if not ids:
    raise ValueError(f"Prompt {prompt!r:.200} has no tokens; pass a non-empty prompt.")
  return list(ids)


def greedy_generate_ids(
    model: Any,
    params: Mapping[str, Any],
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int,
    chat: bool = True,
    generation_config: Mapping[str, Any] | None = None,
    prompt_multiple: int = 32,
) -> list[list[int]]:
  """Generate greedily and return each prompt's new token ids, EOS excluded.

  Args:
    model: a Flax module called as `model.apply({"params": params},
      input_ids, positions=..., attention_mask=...)` that returns logits
      `[B, T, V]`, such as `jaxlora.models.Llama`. It must be hashable,
      because it is a static argument of the jitted loop.
    params: its parameter tree, with or without adapters.
    tokenizer: a transformers tokenizer.
    prompts: strings, or with `chat` also lists of `{role, content}` messages.
    max_new_tokens: N, the most tokens generated per prompt.
    chat: render the prompts with the chat template.
    generation_config: a `generation_config.json` dict; its `eos_token_id`
      takes precedence over the tokenizer's.
    prompt_multiple: the prompt columns are rounded up to a multiple of this,
      so that calls with similar prompt lengths reuse one compiled loop.

  Returns:
    One list of token ids per prompt: the tokens generated before the first
    EOS id, or all N when none came.

  Raises:
    ValueError: for no prompts, `max_new_tokens < 1`, `prompt_multiple < 1`,
      a bad prompt, or a prompt plus N tokens longer than the model's
      `config.max_position_embeddings`.
  """
  if not prompts:
    raise ValueError("prompts is empty; pass at least one prompt.")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1.")
  if prompt_multiple < 1:
    raise ValueError(f"prompt_multiple={prompt_multiple} must be >= 1.")

  encoded = [encode_prompt(tokenizer, prompt, chat=chat) for prompt in prompts]
  _check_length(model, encoded, max_new_tokens)
  eos_ids = eos_token_ids(tokenizer, generation_config)
  if not eos_ids:
    logger.info("No EOS id is known; every prompt gets %d new tokens.", max_new_tokens)
  # Padding is hidden by the attention mask, so any valid id can fill it.
  pad_id = tokenizer.pad_token_id
  if pad_id is None:
    pad_id = eos_ids[0] if eos_ids else 0

  prompt_width = -(-max(len(ids) for ids in encoded) // prompt_multiple) * prompt_multiple
  tokens, attention_mask, positions = _left_padded(
      encoded, prompt_width, prompt_width + max_new_tokens, pad_id
  )
  # -1 matches no token, so an empty EOS list stops nothing.
  eos_array = jnp.asarray(eos_ids or (-1,), dtype=jnp.int32)
  tokens = _generate_loop(
      model, params, jnp.asarray(tokens), jnp.asarray(attention_mask),
      jnp.asarray(positions), jnp.int32(prompt_width), eos_array, jnp.int32(pad_id),
  )

  replies = []
  for row in np.asarray(tokens)[:, prompt_width:].tolist():
    ends = [index for index, token in enumerate(row) if token in eos_ids]
    replies.append(row[:ends[0]] if ends else row)
  return replies


def greedy_generate(
    model: Any,
    params: Mapping[str, Any],
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int,
    chat: bool = True,
    generation_config: Mapping[str, Any] | None = None,
    prompt_multiple: int = 32,
) -> list[str]:
  """Generate greedily and return each prompt's reply as text.

  The arguments are those of `greedy_generate_ids`; the new tokens are
  decoded without special tokens.
  """
  replies = greedy_generate_ids(
      model, params, tokenizer, prompts,
      max_new_tokens=max_new_tokens, chat=chat,
      generation_config=generation_config, prompt_multiple=prompt_multiple,
  )
  return [tokenizer.decode(ids, skip_special_tokens=True) for ids in replies]


def _check_length(model, encoded, max_new_tokens):
  config = getattr(model, "config", None)
  max_positions = getattr(config, "max_position_embeddings", None)
  longest = max(len(ids) for ids in encoded)
  if max_positions is not None and longest + max_new_tokens > max_positions:
    raise ValueError(
        f"The longest prompt has {longest} tokens, and with max_new_tokens="
        f"{max_new_tokens} it exceeds the model's maximum of {max_positions}"
        " positions; shorten the prompt or lower max_new_tokens."
    )


def _left_padded(encoded, prompt_width, width, pad_id):
  """Return `(tokens, attention_mask, positions)`, each `[B, width]` int32.

  Row b has its prompt right-aligned in the first `prompt_width` columns.
  Its positions are 0 over the padding, then count up from 0 at its first
  real token through the reply columns.
  """
  batch = len(encoded)
  tokens = np.full((batch, width), pad_id, dtype=np.int32)
  attention_mask = np.zeros((batch, width), dtype=np.int32)
  positions = np.zeros((batch, width), dtype=np.int32)
  for row, ids in enumerate(encoded):
    start = prompt_width - len(ids)
    tokens[row, start:prompt_width] = ids
    attention_mask[row, start:prompt_width] = 1
    positions[row, start:] = np.arange(width - start)
  return tokens, attention_mask, positions


@functools.partial(jax.jit, static_argnames=("model",))
def _generate_loop(model, params, tokens, attention_mask, positions, start, eos_ids, pad_id):
  """Fill columns `start..` of `tokens` `[B, W]` with greedy tokens.

  A row that has emitted an EOS id gets `pad_id` in its later columns.
  """
  # TODO: a KV cache would make each new token cost one column of attention
  # instead of a forward pass over the whole buffer.
  batch, width = tokens.shape

  def keep_going(state):
    _, _, index, done = state
    return jnp.logical_and(index < width, jnp.logical_not(jnp.all(done)))

  def next_token(state):
    tokens, attention_mask, index, done = state
    logits = model.apply(
        {"params": params}, tokens, positions=positions, attention_mask=attention_mask
    )
    last_BV = jax.lax.dynamic_index_in_dim(logits, index - 1, axis=1, keepdims=False)
    token = jnp.argmax(last_BV, axis=-1).astype(jnp.int32)
    token = jnp.where(done, pad_id, token)
    tokens = tokens.at[:, index].set(token)
    attention_mask = attention_mask.at[:, index].set(jnp.where(done, 0, 1))
    done = jnp.logical_or(done, jnp.isin(token, eos_ids))
    return tokens, attention_mask, index + 1, done

  state = (tokens, attention_mask, start, jnp.zeros((batch,), dtype=bool))
  tokens, _, _, _ = jax.lax.while_loop(keep_going, next_token, state)
  return tokens
