"""Text generation with a key/value cache: greedy and temperature/top-p sampling.

`generate` renders and tokenizes the prompts and decodes the replies, and
`generate_ids` does the work on token ids:

1. The prompts are left-padded into one array `[B, P]`, with P rounded up to
   a multiple of `PROMPT_MULTIPLE` so that prompts of similar lengths share a
   compiled loop.
2. One `decode` call of the model runs the whole prompt (prefill) and fills
   a `KVCache` of P + N - 1 columns, N = `max_new_tokens`.
3. A `jax.lax.while_loop` picks a token per row from the last logits, feeds
   it back through `decode` as one new column, and repeats until every row
   has emitted an EOS id or N tokens are out. A row that is done gets the
   pad id in its later columns.

All three steps run in one jitted function, compiled once per model, (B, P),
N and choice of greedy, sampling, or sampling with top-p.

Left padding keeps the last prompt token of every row in the same column,
so one new column per step serves all rows. The cache's `valid` mask hides
the padding from attention and the positions count real tokens only, so a
padded row gets the same logits as its prompt alone.
"""

import functools
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.models.llama import init_cache
from jaxlora.train import chat as chat_lib

logger = logging.getLogger(__name__)

Prompt = str | Sequence[Mapping[str, str]]

# Prompt columns are rounded up to a multiple of this many tokens.
PROMPT_MULTIPLE = 32


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


def generate(
    model: Any,
    params: Mapping[str, Any],
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    chat: bool | None = None,
    generation_config: Mapping[str, Any] | None = None,
) -> list[str]:
  """Generate a reply to each prompt and return the replies as text.

  Args:
    model: a `jaxlora.models.Llama` or `Gpt2` module (see `generate_ids`).
    params: its parameter tree, with or without adapters.
    tokenizer: a transformers tokenizer.
    prompts: strings, or lists of `{role, content}` messages for a chat
      model.
    max_new_tokens: N, the most tokens generated per prompt.
    temperature: 0 picks the most probable token (greedy); a positive value
      divides the logits before sampling.
    top_p: with sampling, the probability mass of the nucleus sampled from.
      1 samples from every token.
    seed: seed of the sampling key, unused when greedy.
    chat: render the prompts with the chat template. None renders them when
      the tokenizer has a template.
    generation_config: a `generation_config.json` dict; its `eos_token_id`
      takes precedence over the tokenizer's.

  Returns:
    One string per prompt: its new tokens before the first EOS id, decoded
    without special tokens.

  Raises:
    ValueError: for no prompts, a prompt of the wrong type, `chat=True` with
      a tokenizer without a chat template, or an argument `generate_ids`
      rejects.
  """
  if not prompts:
    raise ValueError("prompts is empty; pass at least one prompt.")
  if chat is None:
    chat = getattr(tokenizer, "chat_template", None) is not None

  prompt_ids = [encode_prompt(tokenizer, prompt, chat=chat) for prompt in prompts]
  eos_ids = eos_token_ids(tokenizer, generation_config)
  # Padding is hidden from attention, so any valid id can fill it.
  pad_id = tokenizer.pad_token_id
  if pad_id is None:
    pad_id = eos_ids[0] if eos_ids else 0

  replies = generate_ids(
      model, params, prompt_ids,
      max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id,
      temperature=temperature, top_p=top_p, seed=seed,
  )
  return [tokenizer.decode(ids, skip_special_tokens=True) for ids in replies]


def generate_ids(
    model: Any,
    params: Mapping[str, Any],
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[list[int]]:
  """Generate from token ids and return each prompt's new token ids, EOS excluded.

  Args:
    model: a Flax module with `config` (`num_hidden_layers`,
      `num_key_value_heads`, `head_dim`, `max_position_embeddings`), `dtype`
      and a `decode` method like `jaxlora.models.Llama.decode`. It must be
      hashable, because it is a static argument of the jitted loop.
    params: its parameter tree, with or without adapters.
    prompt_ids: one non-empty list of token ids per prompt.
    max_new_tokens: N, the most tokens generated per prompt.
    eos_ids: ids that end a row; empty to always generate N tokens.
    pad_id: id that fills the padding and the columns after a row's EOS.
    temperature: 0 for greedy decoding, else the divisor of the logits
      before sampling.
    top_p: with sampling, keep only the smallest set of most probable tokens
      whose probabilities sum to at least `top_p` (see `filter_top_p`).
    seed: seed of the sampling key. The same seed, prompts and model give
      the same tokens.

  Returns:
    One list per prompt: the tokens generated before its first EOS id, or
    all N when none came.

  Raises:
    ValueError: for no prompts, an empty prompt, `max_new_tokens < 1`, a
      negative temperature, `top_p` outside (0, 1], or a prompt plus N tokens
      longer than the model's `max_position_embeddings`.
  """
  _check_arguments(prompt_ids, max_new_tokens, temperature, top_p)
  _check_length(model, prompt_ids, max_new_tokens)
  eos_ids = tuple(int(token) for token in eos_ids)
  if not eos_ids:
    logger.info("No EOS id is known; every prompt gets %d new tokens.", max_new_tokens)

  prompt_width = -(-max(len(ids) for ids in prompt_ids) // PROMPT_MULTIPLE) * PROMPT_MULTIPLE
  tokens, attention_mask, positions = _left_padded(prompt_ids, prompt_width, pad_id)
  # -1 matches no token, so an empty EOS list stops nothing.
  eos_array = jnp.asarray(eos_ids or (-1,), dtype=jnp.int32)
  sample = temperature > 0
  new_tokens = _generate_loop(
      model, params, jnp.asarray(tokens), jnp.asarray(attention_mask), jnp.asarray(positions),
      eos_array, jnp.int32(pad_id), jax.random.key(seed),
      jnp.float32(temperature if sample else 1.0), jnp.float32(top_p),
      max_new_tokens=max_new_tokens, sample=sample, nucleus=sample and top_p < 1.0,
  )

  replies = []
  for row in np.asarray(new_tokens).tolist():
    ends = [index for index, token in enumerate(row) if token in eos_ids]
    replies.append(row[:ends[0]] if ends else row)
  return replies


def filter_top_p(logits: jax.Array, top_p: jax.Array | float) -> jax.Array:
  """Set the logits `[..., V]` of the tokens outside the top-p nucleus to -inf.

  The nucleus is the smallest set of most probable tokens whose
  probabilities sum to at least `top_p`, so it always contains the most
  probable token. Tokens tied with the least probable member are kept too.
  """
  sorted_logits = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  in_nucleus = mass_before < top_p
  threshold = jnp.min(jnp.where(in_nucleus, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits >= threshold, logits, -jnp.inf)


def _check_arguments(prompt_ids, max_new_tokens, temperature, top_p):
  if not prompt_ids:
    raise ValueError("prompt_ids is empty; pass at least one prompt.")
  for index, ids in enumerate(prompt_ids):
    if len(ids) == 0:
      raise ValueError(f"Prompt {index} has no tokens; pass a non-empty prompt.")
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1.")
  if not (math.isfinite(temperature) and temperature >= 0):
    raise ValueError(
        f"temperature={temperature!r} must be a finite number >= 0; use 0 for"
        " greedy decoding."
    )
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p={top_p!r} must be in (0, 1]; use 1 to sample from every token.")


def _check_length(model, prompt_ids, max_new_tokens):
  max_positions = model.config.max_position_embeddings
  longest = max(len(ids) for ids in prompt_ids)
  if longest + max_new_tokens > max_positions:
    raise ValueError(
        f"The longest prompt has {longest} tokens, and with max_new_tokens="
        f"{max_new_tokens} it exceeds the model's maximum of {max_positions}"
        " positions; shorten the prompt or lower max_new_tokens."
    )


def _left_padded(prompt_ids, width, pad_id):
  """Return `(tokens, attention_mask, positions)`, each `[B, width]` int32.

  Row b has its prompt right-aligned. Its positions are 0 over the padding,
  then count up from 0 at its first real token.
  """
  batch = len(prompt_ids)
  tokens = np.full((batch, width), pad_id, dtype=np.int32)
  attention_mask = np.zeros((batch, width), dtype=np.int32)
  positions = np.zeros((batch, width), dtype=np.int32)
  for row, ids in enumerate(prompt_ids):
    start = width - len(ids)
    tokens[row, start:] = ids
    attention_mask[row, start:] = 1
    positions[row, start:] = np.arange(len(ids))
  return tokens, attention_mask, positions


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "sample", "nucleus"))
def _generate_loop(
    model, params, tokens, attention_mask, positions, eos_ids, pad_id, key, temperature, top_p,
    *, max_new_tokens, sample, nucleus,
):
  """Return the new tokens `[B, N]` after the prompts `tokens` `[B, P]`."""
  batch, prompt_width = tokens.shape
  decode = functools.partial(model.apply, {"params": params}, method="decode")

  def pick(logits_BV, step):
    if not sample:
      return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / temperature
    if nucleus:
      logits_BV = filter_top_p(logits_BV, top_p)
    step_key = jax.random.fold_in(key, step)
    return jax.random.categorical(step_key, logits_BV, axis=-1).astype(jnp.int32)

  # The last generated token is never fed back, so N - 1 columns follow the prompt.
  cache = init_cache(model.config, batch, prompt_width + max_new_tokens - 1, model.dtype)
  logits, cache = decode(tokens, cache, positions=positions, attention_mask=attention_mask)
  token = pick(logits[:, -1], 0)
  new_tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)
  done = jnp.isin(token, eos_ids)
  # Every row's last prompt column is a real token, so its position + 1 is
  # the position of the first new token.
  first_position = positions[:, -1] + 1

  def keep_going(state):
    step, _, _, done, _ = state
    return jnp.logical_and(step < max_new_tokens, jnp.logical_not(jnp.all(done)))

  def next_token(state):
    step, token, new_tokens, done, cache = state
    position = first_position + step - 1
    logits, cache = decode(token[:, None], cache, positions=position[:, None])
    token = jnp.where(done, pad_id, pick(logits[:, 0], step))
    new_tokens = new_tokens.at[:, step].set(token)
    done = jnp.logical_or(done, jnp.isin(token, eos_ids))
    return step + 1, token, new_tokens, done, cache

  state = (jnp.int32(1), token, new_tokens, done, cache)
  _, _, new_tokens, _, _ = jax.lax.while_loop(keep_going, next_token, state)
  return new_tokens
