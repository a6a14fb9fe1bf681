"""Prompts rendered from user and item features: the conditioning half of every text example.

Two layouts (`PromptTemplate.layout`):

- "markers", the project's own models (their tokenizer has these special tokens):

      <bos> <user> (<field> name <value> value)* <item> (<field> name <value> value)* <sep>

- "text", any checkpoint a user brings (no special tokens needed beyond its BOS, if any):

      [bos] "user: name=value | name=value\nitem: name=value | ...\ncopy:\n"

- "chat", a chat model: the same text as one user message, rendered by the checkpoint's own chat
  template (tokenizer_config.json's `chat_template`, Jinja, with the generation prompt), so the
  model sees the turn markup it was tuned on. The template's markup is encoded with its special
  tokens; the message itself never is, so feature values cannot forge a turn.

Requests that bring their own prompt (OpenAI-style) use the same two encoders: `encode_text` (raw
text, the "text" layout's way) and `encode_chat` (a whole conversation through the chat template,
each content plain text, the markup rendered by the one renderer the "chat" layout uses).

and for training `encode_example` appends the target copy and the tokenizer's EOS. Values are rendered
to text (lists joined with ", "), cut to `max_field_chars` characters, then, if the prompt is over its
token budget, shortened together (see `_fit_values`). Budgets count UTF-8 bytes: exactly the tokens of
the project's byte-level tokenizer, and an upper bound for byte-level BPE vocabularies (a token holds
at least one byte), so a prompt never exceeds its budget; every cut falls on a code point boundary.
Special tokens enter prompts by id only: text that says "<eos>" stays text.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from aigc_dist.models.tokenizer import TextTokenizer

# Part of the digest: bump when the token layout changes, so old request ids never match new prompts.
PROMPT_LAYOUT = "v1"
# markers: <bos>, <user>, <item>, <sep>; each field adds <field> + name + <value> + value.
_FIXED_TOKENS = 4
# text: the fixed words, and what each field adds besides its name and value (" | " and "=").
_TEXT_FIXED, _TEXT_PER_FIELD = "user: \nitem: \ncopy:\n", 4

Pairs = list[tuple[str, str]]


class PromptError(ValueError):
    """A row cannot be turned into a prompt (missing required field, budget too small)."""


@dataclass
class PromptTemplate:
    """Which user and item features condition the generator, in which order, and the size limits."""

    user_fields: tuple[str, ...] = ("segment", "locale", "interests")
    """User feature names, in prompt order."""
    item_fields: tuple[str, ...] = ("title", "category", "attributes")
    """Item feature names, in prompt order."""
    required_user_fields: tuple[str, ...] = ("segment",)
    """User fields (among user_fields) that must be present and non-empty; others are skipped when missing.
    The default is what personalization needs, and small so that custom user_fields rarely conflict."""
    required_item_fields: tuple[str, ...] = ("title",)
    """Item fields (among item_fields) that must be present and non-empty; the title grounds the copy."""
    max_field_chars: int = 64
    """Each value is cut to this many characters (code points) before the token budget applies."""
    max_prompt_tokens: int = 192
    """Token budget of the whole prompt, <bos> to <sep> inclusive."""
    layout: Literal["markers", "text", "chat"] = "markers"
    """"markers": the project's special tokens (its own models); "text": plain text any tokenizer
    encodes (checkpoints a user brings, whose vocabulary has no such markers); "chat": that text as a
    user message through the checkpoint's chat template."""

    def __post_init__(self) -> None:
        for name in ("user_fields", "item_fields", "required_user_fields", "required_item_fields"):
            value = tuple(getattr(self, name))
            setattr(self, name, value)
            if any(not isinstance(f, str) or not f for f in value) or len(set(value)) != len(value):
                raise ValueError(f"PromptTemplate.{name} must be distinct non-empty names (got {value})")
        for side in ("user", "item"):
            extra = set(getattr(self, f"required_{side}_fields")) - set(getattr(self, f"{side}_fields"))
            if extra:
                raise ValueError(f"PromptTemplate.required_{side}_fields must be among {side}_fields "
                                 f"(got {sorted(extra)})")
        if self.max_field_chars < 1:
            raise ValueError(f"PromptTemplate.max_field_chars must be >= 1 (got {self.max_field_chars})")
        if self.layout not in ("markers", "text", "chat"):
            raise ValueError(f"PromptTemplate.layout must be 'markers', 'text' or 'chat' (got {self.layout!r})")
        skeleton = _skeleton_tokens([*self.user_fields, *self.item_fields], self.layout)
        if self.max_prompt_tokens < skeleton:
            raise ValueError(f"PromptTemplate.max_prompt_tokens must be >= {skeleton}, the markers and names "
                             f"of all fields (got {self.max_prompt_tokens})")


def _skeleton_tokens(names: list[str], layout: str = "markers") -> int:
    """Prompt tokens (bytes, at most) besides the values of fields `names`."""
    if layout in ("text", "chat"):  # + 1 for a BOS the tokenizer may have (chat: plus the template's markup)
        return 1 + len(_TEXT_FIXED) + sum(_TEXT_PER_FIELD + len(n.encode("utf-8")) for n in names)
    return _FIXED_TOKENS + sum(2 + len(n.encode("utf-8")) for n in names)


def _value_text(value: Any) -> str:
    """Feature value -> prompt text; "" means missing. Lists (interests, attributes) join with ", "."""
    if hasattr(value, "tolist"):  # numpy arrays and scalars, e.g. from pandas
        value = value.tolist()
    if value is None or (isinstance(value, float) and math.isnan(value)):  # pandas writes missing as NaN
        return ""
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value if v is not None)
    return str(value)


def _fields(user: Mapping[str, Any], item: Mapping[str, Any], template: PromptTemplate
            ) -> tuple[Pairs, Pairs]:
    """(name, value text) of the present fields, values cut to max_field_chars; PromptError if required."""
    t, sides = template, []
    for side, features, names, required in (("user", user, t.user_fields, t.required_user_fields),
                                            ("item", item, t.item_fields, t.required_item_fields)):
        pairs = []
        for name in names:
            # Python strings index code points, so this cut never splits a character's UTF-8 bytes.
            text = _value_text(features.get(name))[: template.max_field_chars]
            if text:
                pairs.append((name, text))
            elif name in required:
                raise PromptError(f"missing required {side} field {name!r}")
        sides.append(pairs)
    return sides[0], sides[1]


def _cut_bytes(text: str, max_bytes: int) -> str:
    # Dropping the incomplete trailing sequence keeps the cut on a code point boundary.
    return text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")


def _water_level(lengths: list[int], budget: int) -> int:
    """Largest cap c with sum(min(length, c)) <= budget: short values stay whole, long ones share the rest."""
    remaining = budget
    for i, length in enumerate(sorted(lengths)):
        left = len(lengths) - i
        if length * left > remaining:
            return remaining // left
        remaining -= length
    return max(lengths, default=0)


def _fit_values(user: Pairs, item: Pairs, budget: int, layout: str) -> tuple[Pairs, Pairs]:
    """Shorten values until the prompt fits `budget` tokens (or to empty, if markers and names fill it).

    Every value is cut to the same byte cap, the largest that fits (water-filling): values shorter than
    the cap are untouched, so one long title cannot push out the segment. Markers and names are never cut.
    """
    skeleton = _skeleton_tokens([n for n, _ in user + item], layout)
    lengths = [len(v.encode("utf-8")) for _, v in user + item]
    if sum(lengths) + skeleton <= budget:
        return user, item
    cap = _water_level(lengths, max(0, budget - skeleton))
    return [(n, _cut_bytes(v, cap)) for n, v in user], [(n, _cut_bytes(v, cap)) for n, v in item]


def render_prompt(user: Mapping[str, Any], item: Mapping[str, Any], template: PromptTemplate) -> str:
    """The prompt as one readable line for logs and debugging, with the same values the model sees.

    e.g. "<user> segment=student | locale=en <item> title=Aurora Trail Backpack | category=outdoor".
    """
    u, i = _fit_values(*_fields(user, item, template), template.max_prompt_tokens, template.layout)
    return " ".join(["<user>", " | ".join(f"{n}={v}" for n, v in u),
                     "<item>", " | ".join(f"{n}={v}" for n, v in i)])


def text_prompt(user: Pairs, item: Pairs) -> str:
    """The "text" layout's prompt, without the BOS."""
    def side(pairs: Pairs) -> str:
        return " | ".join(f"{name}={value}" for name, value in pairs)

    return f"user: {side(user)}\nitem: {side(item)}\ncopy:\n"


CHAT_ROLES = ("system", "user", "assistant")


def _chat_slot(k: int) -> str:
    """What stands in for message k's content while the template renders (no template writes NULs)."""
    return f"\x00aigc-dist message {k}\x00"


@functools.lru_cache(maxsize=16)
def _compiled_chat_template(chat_template: str) -> Any:
    import jinja2.sandbox

    def raise_exception(message: str) -> None:
        raise PromptError(f"chat template: {message}")

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: time.strftime(fmt))
    return env.from_string(chat_template)


@functools.lru_cache(maxsize=256)
def _chat_markup(chat_template: str, roles: tuple[str, ...], bos: str, eos: str) -> tuple[str, ...]:
    """The markup around the contents of a conversation whose messages have these roles: len(roles) + 1
    texts (before the first content, between contents, after the last, generation prompt included).

    Rendered as transformers' apply_chat_template does (sandboxed Jinja, add_generation_prompt=True),
    with a placeholder per content, so the markup depends on the roles only and the contents are
    never seen by the template (nor by the special-token parser: callers encode them as plain text).
    PromptError when the template refuses the conversation or does not show each content once, in order.
    """
    import jinja2

    messages = [{"role": role, "content": _chat_slot(k)} for k, role in enumerate(roles)]
    try:
        rendered = _compiled_chat_template(chat_template).render(
            messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos)
    except jinja2.TemplateError as exc:  # a template error, or the sandbox refusing an operation
        raise PromptError(f"chat template: {exc}") from None
    pieces = []
    for k in range(len(roles)):
        if rendered.count(_chat_slot(k)) != 1:
            raise PromptError("chat template: the rendered conversation does not hold each message exactly once")
        before, rendered = rendered.split(_chat_slot(k))
        pieces.append(before)
    return (*pieces, rendered)


def _chat_pieces(tokenizer: TextTokenizer, roles: tuple[str, ...]) -> tuple[str, ...]:
    template = tokenizer.chat_template
    if template is None:
        raise PromptError(f"{tokenizer.source}: tokenizer_config.json has no chat_template for the prompt "
                          "layout 'chat'; use layout 'text'")
    bos, eos = tokenizer.config.get("bos_token") or "", tokenizer.config.get("eos_token") or ""
    return _chat_markup(template, roles, bos if isinstance(bos, str) else "", eos if isinstance(eos, str) else "")


# Cached per tokenizer: every prompt of a chat layout needs the markup's ids twice (budget and encoding),
# and encoding it is two calls into tokenizers.
@functools.lru_cache(maxsize=16)
def _chat_ids(tokenizer: TextTokenizer) -> tuple[tuple[int, ...], tuple[int, ...]]:
    before, after = _chat_pieces(tokenizer, ("user",))
    return tuple(tokenizer.encode_with_special_tokens(before)), tuple(tokenizer.encode_with_special_tokens(after))


def encode_chat(messages: Sequence[Mapping[str, str]], tokenizer: TextTokenizer) -> list[int]:
    """Token ids of a conversation (OpenAI chat messages: role in CHAT_ROLES, content a string) rendered
    by the checkpoint's chat template with the generation prompt: what transformers'
    `apply_chat_template(messages, add_generation_prompt=True, tokenize=True)` gives, except that the
    contents are plain text (its special-token text stays text, so a message cannot forge a turn).

    PromptError when the tokenizer has no chat template or the template refuses the conversation.
    """
    pieces = _chat_pieces(tokenizer, tuple(m["role"] for m in messages))
    ids = tokenizer.encode_with_special_tokens(pieces[0])
    for message, markup in zip(messages, pieces[1:], strict=True):
        ids += tokenizer.encode(message["content"]) + tokenizer.encode_with_special_tokens(markup)
    return ids


def encode_text(text: str, tokenizer: TextTokenizer) -> list[int]:
    """Raw text as a prompt, the "text" layout's way: the tokenizer's BOS (if it has one), then the text
    with no special tokens read from it."""
    bos = tokenizer.bos_id
    return ([] if bos is None else [bos]) + tokenizer.encode(text)


def layout_overhead(tokenizer: TextTokenizer, layout: str) -> int:
    """Prompt tokens a layout adds beyond `_skeleton_tokens`: the chat template's markup."""
    if layout != "chat":
        return 0
    before, after = _chat_ids(tokenizer)
    return len(before) + len(after)


def _encode_pairs(user: Pairs, item: Pairs, tokenizer: TextTokenizer, layout: str) -> list[int]:
    if layout == "chat":
        before, after = _chat_ids(tokenizer)
        return [*before, *tokenizer.encode(text_prompt(user, item)), *after]
    if layout == "text":
        return encode_text(text_prompt(user, item), tokenizer)
    marker = tokenizer.special_id
    field_id, value_id = marker("<field>"), marker("<value>")
    texts = tokenizer.encode_many([t for pair in user + item for t in pair])  # name, value, name, value...
    ids = [marker("<bos>"), marker("<user>")]
    for n, (name, value) in enumerate(zip(texts[::2], texts[1::2], strict=True)):
        if n == len(user):
            ids.append(marker("<item>"))
        ids += [field_id, *name, value_id, *value]
    if len(user) == len(texts) // 2:
        ids.append(marker("<item>"))
    return ids + [marker("<sep>")]


def encode_prompt(user: Mapping[str, Any], item: Mapping[str, Any], template: PromptTemplate,
                  tokenizer: TextTokenizer) -> list[int]:
    """Prompt token ids, BOS to the end of the prompt, at most `template.max_prompt_tokens` long.

    Missing optional fields are skipped; a missing required field raises PromptError naming it.
    """
    budget = template.max_prompt_tokens - layout_overhead(tokenizer, template.layout)
    pairs = _fit_values(*_fields(user, item, template), budget, template.layout)
    return _encode_pairs(*pairs, tokenizer, template.layout)


def _eos_id(tokenizer: TextTokenizer) -> int:
    eos = tokenizer.eos_id
    if eos is None:
        raise PromptError(f"{tokenizer.source}: tokenizer_config.json names no eos_token; training needs one")
    return eos


def encode_example(user: Mapping[str, Any], item: Mapping[str, Any], copy: str, template: PromptTemplate,
                   tokenizer: TextTokenizer, max_seq_len: int) -> tuple[list[int], list[bool]]:
    """A training example: prompt ids + copy ids + <eos>, and a loss mask True on the copy and <eos>.

    Fitting into `max_seq_len` (the loss is on the copy, so the copy is cut last):
      1. the prompt gets what the whole copy and <eos> leave, capped at max_prompt_tokens, and is
         shortened as in encode_prompt (values cut evenly, markers and names kept);
      2. if the prompt at its minimum (empty values) still leaves too little, the copy is cut at a
         code point boundary. <eos> is always the last token, so the model always learns to stop.
    PromptError if max_seq_len cannot hold the prompt's markers and names plus <eos>.
    """
    u, i = _fields(user, item, template)
    overhead = layout_overhead(tokenizer, template.layout)
    skeleton = _skeleton_tokens([n for n, _ in u + i], template.layout) + overhead
    if skeleton + 1 > max_seq_len:
        raise PromptError(f"max_seq_len={max_seq_len} cannot hold the prompt's {skeleton} marker and name "
                          "tokens plus <eos>")
    copy_bytes = len(copy.encode("utf-8"))
    budget = max(skeleton, min(template.max_prompt_tokens, max_seq_len - copy_bytes - 1)) - overhead
    prompt = _encode_pairs(*_fit_values(u, i, budget, template.layout), tokenizer, template.layout)
    copy_ids = tokenizer.encode(_cut_bytes(copy, max_seq_len - len(prompt) - 1))
    ids = prompt + copy_ids + [_eos_id(tokenizer)]
    return ids, [False] * len(prompt) + [True] * (len(copy_ids) + 1)


def template_digest(template: PromptTemplate) -> str:
    """Stable 16-hex-digit hash of the template and the token layout (feeds request ids)."""
    fields = asdict(template)
    if fields["layout"] == "markers":  # the original layout keeps its digest, so its request ids stay valid
        del fields["layout"]
    payload = json.dumps({"layout": PROMPT_LAYOUT, **fields}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]
