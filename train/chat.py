"""Chat examples: rendering with the tokenizer's template, and scoring replies.

A chat example is a list of messages `{"role": ..., "content": ...}`. It is
rendered to text with the tokenizer's chat template and tokenized once, as a
whole. The loss then covers the assistant replies only, unless
`train_on_prompt` asks for every token. For each assistant
message, the scored tokens are its content and the template's end-of-turn
token (for SmolLM2, `<|im_end|>`). The whitespace the template writes after
that token is not scored, and neither is any user, system or header token.

The reply boundaries are found in characters, then mapped to tokens exactly:

1. The text before a reply is the template rendered over the earlier messages
   with `add_generation_prompt=True`, which is also the prompt that
   generation feeds the model. The text through a reply is the template
   rendered over the messages up to and including it, with trailing
   whitespace removed. Both must be prefixes of the full text.
2. Each of those prefixes is tokenized alone, and its token ids must be a
   prefix of the full text's ids; their count is the boundary's token index.

Step 2 fails when one token spans the boundary, for example when a reply
starts with a newline that merges with the newline ending the generation
prompt. Such an example cannot be split into prompt and reply tokens that
match what the model sees at generation time, so `tokenize_chat` raises
`UnalignedTurnError` and the caller drops the example and counts it.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import numpy as np

ASSISTANT = "assistant"


class UnalignedTurnError(ValueError):
  """An assistant reply whose boundaries do not fall between two tokens."""


def check_chat_template(tokenizer: Any) -> None:
  """Raise a ValueError if `tokenizer` has no chat template."""
  if getattr(tokenizer, "chat_template", None) is None:
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    raise ValueError(
        f"The tokenizer {name!r} has no chat template, so chat examples"
        " (`messages`) cannot be rendered. Set tokenizer.chat_template to a"
        " Jinja template, use a tokenizer that ships one, or provide `text`"
        " examples instead."
    )


def normalize_messages(messages: Any, label: str) -> list[dict[str, str]]:
  """Return `messages` as a list of `{role, content, ...}` dicts with string values.

  Keys whose value is None are dropped: a JSON dataset gives every message
  all the keys seen in any message, filling the missing ones with None.

  Raises:
    ValueError: if `messages` is not a non-empty list of mappings whose
      `role` and `content` are strings. The message starts with `label`,
      such as "Example 3".
  """
  if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
    raise ValueError(
        f"{label}: `messages` must be a non-empty list of"
        f" {{role, content}} objects, got {messages!r:.200}."
    )

  normalized = []
  for position, message in enumerate(messages):
    if not isinstance(message, Mapping):
      raise ValueError(
          f"{label}, message {position}: expected a {{role, content}}"
          f" object, got {message!r:.200}."
      )
    message = {key: value for key, value in message.items() if value is not None}
    for key in ("role", "content"):
      if not isinstance(message.get(key), str):
        raise ValueError(
            f"{label}, message {position}: `{key}` must be a string,"
            f" got {message.get(key)!r:.200}. Give every message a string role"
            " and content."
        )
    normalized.append(message)
  return normalized


def render(tokenizer: Any, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
  """Return the chat template applied to `messages`, as text."""
  return tokenizer.apply_chat_template(
      messages, tokenize=False, add_generation_prompt=generation_prompt
  )


def encode(tokenizer: Any, text: str) -> list[int]:
  """Return the token ids of rendered chat text.

  Special tokens are not added: the template writes them itself.
  """
  return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_chat(
    tokenizer: Any,
    messages: list[dict[str, str]],
    *,
    train_on_prompt: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
  """Tokenize a conversation and mark the tokens of its assistant replies.

  Args:
    tokenizer: a transformers tokenizer with a chat template.
    messages: normalized messages (see `normalize_messages`).
    train_on_prompt: mark every token, so the reply boundaries are not
      searched and no example is unaligned.

  Returns:
    `(ids, scored)`: token ids `[n]` int32, and `[n]` bool, True at each
    token of an assistant reply's content and its end-of-turn token (every
    token with `train_on_prompt`).

  Raises:
    UnalignedTurnError: if the template renders a prefix of the conversation
      differently from the start of the whole conversation, or a token spans
      the start or end of a reply.
  """
  full_text = render(tokenizer, messages, generation_prompt=False)
  ids = encode(tokenizer, full_text)
  if train_on_prompt:
    return np.asarray(ids, dtype=np.int32), np.ones(len(ids), dtype=bool)
  scored = np.zeros(len(ids), dtype=bool)

  for position, message in enumerate(messages):
    if message["role"] != ASSISTANT:
      continue
    prompt = _rendered_prefix(tokenizer, messages[:position], full_text, True)
    through = _rendered_prefix(tokenizer, messages[:position + 1], full_text, False)
    start_char = len(prompt)
    end_char = max(start_char, len(through.rstrip()))

    start = _token_boundary(tokenizer, full_text, start_char, ids)
    end = _token_boundary(tokenizer, full_text, end_char, ids)
    scored[start:end] = True

  return np.asarray(ids, dtype=np.int32), scored


def _rendered_prefix(tokenizer, messages, full_text, generation_prompt):
  """Render `messages` and check the text is a prefix of `full_text`."""
  try:
    text = render(tokenizer, messages, generation_prompt=generation_prompt)
  except jinja2.TemplateError as error:
    raise UnalignedTurnError(
        f"the chat template fails on the first {len(messages)} messages ({error})"
    ) from error
  if not full_text.startswith(text):
    raise UnalignedTurnError(
        f"the chat template renders the first {len(messages)} messages as"
        f" {text[-80:]!r}, which is not how the whole conversation starts"
    )
  return text


def _token_boundary(tokenizer, full_text, char_index, full_ids):
  """Return the token index where `full_text[:char_index]` ends in `full_ids`."""
  if char_index == len(full_text):
    return len(full_ids)
  prefix_ids = encode(tokenizer, full_text[:char_index])
  if full_ids[:len(prefix_ids)] != prefix_ids:
    around = full_text[max(0, char_index - 20):char_index + 20]
    raise UnalignedTurnError(
        f"a token spans the boundary at character {char_index} between prompt"
        f" and reply (text around it: {around!r})"
    )
  return len(prefix_ids)
