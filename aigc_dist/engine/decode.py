"""Decoding for Llama-family models: sampling, per-request seeds, KV cache, continuous batching.

`decode_stream` does iteration-level scheduling (continuous batching) over a stream of
`DecodeRequest`s. A fixed number of slots each hold one sequence in a `SlotCache`, with its own
length and its own sampling parameters. When a sequence ends, its slot takes the next waiting
request at once (all newcomers of a step are prefilled together), so a few long outputs do not
leave the batch half empty. refill=False is static batching on the same machinery (a batch runs
until its longest row ends, as Hugging Face's `generate()` does): the baseline it is measured against.

Row i draws its random numbers from its own torch.Generator seeded with its request's seed, all up
front, so a request gives the same output for the same seed whatever its batch-mates and whenever it
is scheduled, up to float rounding of its logits across batch shapes. The one reference every fast
path is held to is a full recompute of the sequence per token, in tests/engine/reference.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from aigc_dist.models.llama import LlamaLM, LMConfig, _is_int, attention_mask_4d, rope_table


def row_uniforms(seeds: list[int] | None, n_rows: int, n_steps: int) -> Tensor:
    """Uniform draws [n_rows, n_steps] in [0, 1), row i from its own generator seeded with seeds[i].

    Drawn up front so the decode loop needs no per-row Python work (the cost is n_rows generator
    draws once per request), and on the CPU so a seed gives the same draws on every device.
    """
    if seeds is None:
        seeds = torch.randint(0, 2**62, (n_rows,)).tolist()
    rows = [torch.rand(n_steps, generator=torch.Generator().manual_seed(seed)) for seed in seeds]
    return torch.stack(rows) if rows else torch.zeros(0, n_steps)  # [n_rows, n_steps]


def _per_row(value: float | int | Tensor, n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    if isinstance(value, Tensor):
        return value.to(device, dtype)
    return torch.full((n,), value, device=device, dtype=dtype)


def sample_tokens(
    logits: Tensor,
    uniforms: Tensor,
    temperature: float | Tensor = 1.0,
    top_k: int | Tensor | None = None,
    top_p: float | Tensor | None = None,
) -> Tensor:
    """Next token per row [B] drawn from logits [B, vocab] at temperature, within top_k / top_p.

    Each parameter is one value for every row or a tensor [B] of per-row values (a row with top_k =
    vocab or top_p >= 1 is not filtered), so rows with different parameters share one decode batch.
    Each row inverts its CDF at its own uniform in uniforms [B] (one batched searchsorted), which is
    what lets every row use its own seed without a per-row multinomial call.
    """
    B, vocab = logits.shape
    logits = logits.float() / _per_row(temperature, B, logits.device, torch.float32)[:, None]
    if top_k is not None:
        k = _per_row(top_k, B, logits.device, torch.long).clamp(1, vocab)
        kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)  # [B, vocab]
    if top_p is not None:
        p = _per_row(top_p, B, logits.device, torch.float32)
        p = torch.where(p >= 1.0, float("inf"), p)  # top_p=1 keeps everything, whatever the rounding
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token once the more likely ones already hold top_p of the mass; the first always stays.
        drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= p[:, None]
        probs = probs.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), 0.0)
    cdf = probs.cumsum(dim=-1)  # [B, vocab], flat over removed tokens so they are never picked
    target = uniforms.to(cdf.dtype)[:, None] * cdf[:, -1:]  # [B, 1], scaled: probs no longer sum to 1
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=vocab - 1)


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
                   greedy: bool) -> None:  # fmt: skip
    """ValueError naming the first bad decoding parameter."""
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0 (got {max_new_tokens!r})")
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature must be > 0, or 0 for greedy (got {temperature!r})")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1 (got {top_k!r})")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be None or in (0, 1] (got {top_p!r})")


def check_prompt(config: LMConfig, name: str, prompt: list[int], max_new_tokens: int) -> None:
    """ValueError when a prompt is empty, has ids outside the vocabulary, or does not fit the context."""
    vocab, limit = config.vocab_size, config.max_position_embeddings
    if not prompt:
        raise ValueError(f"{name} is empty; every prompt needs at least one token (e.g. <bos>)")
    if min(prompt) < 0 or max(prompt) >= vocab:
        raise ValueError(f"{name} has token ids outside the model's vocabulary 0..{vocab - 1}")
    if len(prompt) + max_new_tokens > limit:
        raise ValueError(
            f"{name} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} that exceeds "
            f"the model's context of {limit} tokens (max_position_embeddings)"
        )


def _check_seed(name: str, seed: int) -> None:
    if not _is_int(seed) or not 0 <= seed < 2**64:
        raise ValueError(f"{name} must be an int in [0, 2**64) (got {seed!r})")


@dataclass(frozen=True)
class DecodeRequest:
    """One sequence for `decode_stream`: a prompt of token ids and how to continue it."""

    prompt: list[int]
    max_new_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0  # the row's own random numbers; the same seed gives the same output in any batch

    def check(self, config: LMConfig, name: str) -> None:
        check_sampling(self.max_new_tokens, self.temperature, self.top_k, self.top_p, self.temperature == 0)
        check_prompt(config, name, self.prompt, self.max_new_tokens)
        _check_seed(f"{name}: seed", self.seed)


class SlotCache:
    """Keys and values for `slots` independent sequences, each with its own length.

    Slot i holds its sequence's tokens at cache positions 0..lens[i]-1, so a token's position id is its
    cache index and a slot can be emptied and refilled without touching the others. Rows are written in
    place: allocated once (again only if a longer request arrives), never concatenated per step.
    The owner calls `prefill_into` or `decode_at` before each forward to say where `update` writes.
    """

    def __init__(self, config: LMConfig, slots: int, max_len: int, device: torch.device, dtype: torch.dtype):
        shape = (slots, config.num_key_value_heads, max_len, config.head_dim)
        self.config, self.max_len = config, max_len
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.lens = torch.zeros(slots, dtype=torch.long, device=device)  # tokens held per slot
        self.rope = rope_table(config, max_len, device)
        self._slots: Tensor | None = None  # prefill: the slots written (index_copy along dim 0)
        self._span = 0  # decode: keys 0..span-1 are attended to
        self._where: Tensor | None = None  # decode: row of each (slot, head) in the flat [B * H * L, hd] cache
        self._reindex()

    def grow(self, max_len: int) -> None:
        """Room for max_len tokens per slot: a rare reallocation when a longer request arrives (at
        least doubling, capped at the model's context, so a stream of ever longer requests grows it
        a few times only)."""
        if max_len <= self.max_len:
            return
        max_len = min(self.config.max_position_embeddings, max(max_len, 2 * self.max_len))
        for cache in (self.k, self.v):
            for layer, old in enumerate(cache):
                cache[layer] = F.pad(old, (0, 0, 0, max_len - self.max_len))
        self.max_len = max_len
        self.rope = rope_table(self.config, max_len, self.lens.device)
        self._reindex()

    def add(self, extra: int) -> None:
        """`extra` more empty slots at the end, for a live decode whose batch grows."""
        for cache in (self.k, self.v):
            for layer, old in enumerate(cache):
                cache[layer] = torch.cat([old, old.new_zeros((extra, *old.shape[1:]))])
        self.lens = torch.cat([self.lens, self.lens.new_zeros(extra)])
        self._reindex()

    def keep(self, slots: Tensor) -> None:
        """Keep only the given slots, in that order (compacts the batch when it has emptied)."""
        for cache in (self.k, self.v):
            for layer, old in enumerate(cache):
                cache[layer] = old.index_select(0, slots)
        self.lens = self.lens.index_select(0, slots)
        self._reindex()

    def prefill_into(self, slots: Tensor) -> None:
        """The next forward writes whole prompts into these slots (their positions 0..P-1)."""
        self._slots = slots

    def _reindex(self) -> None:
        """What decode steps index, made again when the cache is reallocated: each layer's cache as
        rows [B * H * L, hd] (the views made once here, not per layer and step), and the flat row of
        each (slot, head)'s position 0 [B, H]."""
        hd = self.config.head_dim
        self._k_rows = [k.view(-1, hd) for k in self.k]
        self._v_rows = [v.view(-1, hd) for v in self.v]
        B, H = self.lens.size(0), self.config.num_key_value_heads
        self._first_rows = torch.arange(B * H, device=self.lens.device).view(B, H) * self.max_len

    def decode_at(self, span: int) -> Tensor | None:
        """The next forward appends one token per slot at its length and attends to keys 0..span-1.

        Returns the attention mask for it: additive [B, 1, 1, span], 0 up to each slot's own new token and
        -inf after, or None for a single slot (it sees every key). Additive rather than boolean because
        scaled_dot_product_attention turns a boolean mask into this one in every layer (two small ops per
        layer and step); here it is made once a step. The values are the same, so are the outputs.
        """
        self._slots, self._span = None, span
        self._where = (self._first_rows + self.lens[:, None]).flatten()  # [B * H], once per step
        if self.lens.size(0) == 1:
            return None
        beyond = torch.arange(span, device=self.lens.device) > self.lens[:, None]  # [B, span]
        return torch.zeros(beyond.shape, dtype=self.k[0].dtype, device=beyond.device).masked_fill_(
            beyond, float("-inf"))[:, None, None, :]  # fmt: skip

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Prefill: k, v [n, H, P, hd] into the chosen slots' positions 0..P-1, attend within the prompts.
        Decode: k, v [B, H, 1, hd] at each slot's own length; attend to keys 0..span-1 [B, H, span, hd]."""
        if self._slots is not None:
            P = k.size(2)
            self.k[layer][:, :, :P].index_copy_(0, self._slots, k)
            self.v[layer][:, :, :P].index_copy_(0, self._slots, v)
            return k, v
        B, H, _, hd = k.shape
        self._k_rows[layer].index_copy_(0, self._where, k.reshape(B * H, hd))
        self._v_rows[layer].index_copy_(0, self._where, v.reshape(B * H, hd))
        return self.k[layer].narrow(2, 0, self._span), self.v[layer].narrow(2, 0, self._span)


class _Slots:
    """Per-slot decoding state: tensors [slots, ...] on the device, and host lists updated per event."""

    TENSORS = ("steps", "limit", "active", "temperature", "top_k", "top_p", "uniforms", "out", "logits")

    def __init__(self, n: int, vocab: int, device: torch.device):
        self.vocab = vocab
        self.request: list[int | None] = [None] * n  # index of the request a slot serves
        self.offset: list[int] = [0] * n  # cache length at step t is offset + t (host copy, no sync)
        self.params: list[DecodeRequest | None] = [None] * n  # the request a slot serves (host copy)
        self.steps = torch.zeros(n, dtype=torch.long, device=device)  # tokens generated so far
        self.limit = torch.ones(n, dtype=torch.long, device=device)  # max_new_tokens
        self.active = torch.zeros(n, dtype=torch.bool, device=device)
        self.temperature = torch.zeros(n, device=device)
        self.top_k = torch.full((n,), vocab, dtype=torch.long, device=device)
        self.top_p = torch.ones(n, device=device)
        # [n, longest max_new_tokens so far + 1]: the spare column is where a finished row (steps == limit)
        # writes and reads until its slot is refilled, so the step needs no clamp of its indices.
        self.uniforms = torch.zeros(n, 1, device=device)
        self.out = torch.zeros(n, 1, dtype=torch.long, device=device)
        self.logits = torch.zeros(n, vocab, device=device)  # next-token logits

    def live(self) -> list[int]:
        return [s for s, r in enumerate(self.request) if r is not None]

    def widen(self, max_new: int) -> None:
        """Room for max_new generated tokens per slot (and the spare column)."""
        if self.out.size(1) < max_new + 1:
            self.uniforms = F.pad(self.uniforms, (0, max_new + 1 - self.out.size(1)))
            self.out = F.pad(self.out, (0, max_new + 1 - self.out.size(1)))

    def add(self, extra: int) -> None:
        """`extra` more empty slots at the end (a live decode's batch grows as requests arrive)."""
        empty = {"steps": 0, "limit": 1, "active": False, "temperature": 0.0, "top_k": self.vocab, "top_p": 1.0,
                 "uniforms": 0.0, "out": 0, "logits": 0.0}
        for name in self.TENSORS:
            old = getattr(self, name)
            setattr(self, name, torch.cat([old, torch.full((extra, *old.shape[1:]), empty[name], dtype=old.dtype,
                                                           device=old.device)]))
        self.request += [None] * extra
        self.offset += [0] * extra
        self.params += [None] * extra

    def keep(self, slots: list[int]) -> None:
        """Keep only the given slots, in that order."""
        index = torch.tensor(slots, device=self.steps.device)
        for name in self.TENSORS:
            setattr(self, name, getattr(self, name).index_select(0, index))
        self.request = [self.request[s] for s in slots]
        self.offset = [self.offset[s] for s in slots]
        self.params = [self.params[s] for s in slots]


StepTokens = tuple[int, list[int], bool]
"""(index in `requests`, tokens it generated in this step, whether it ended): `decode_steps`' events."""


def decode_stream(
    model: LlamaLM,
    requests: Iterable[DecodeRequest],
    slots: int,
    eos_ids: Sequence[int] = (),
    refill: bool = True,
    max_len: int | None = None,
    end: set[int] | None = None,
) -> Iterator[tuple[int, list[int]]]:
    """Decode requests through `slots` batch rows; yields (index in `requests`, new tokens) as each ends.

    Results come in the order requests finish, not the order given; tokens exclude the prompt and the
    EOS that ended the request. Requests are pulled from the iterable only when a slot is free, so it
    may be a lazy stream. refill=True: a slot freed by a finished request takes the next one at once
    (continuous batching); when the stream has run dry and half the slots are empty, the batch is
    compacted to the live rows. refill=False: the next `slots` requests start only when the whole
    batch has finished (static batching). max_len: longest prompt + max_new_tokens expected (the
    cache grows if a longer request comes; default: the model's context).
    end: request indices the caller adds to while iterating, to end those requests early: read at the
    start of every step (added while handling a step's results, a request gets no further token), each
    is answered with the tokens it has so far and its slot is free for the same step's admissions; a
    request not started yet ends when it is pulled, with no tokens. Handled indices leave the set. An
    empty set costs no device sync.
    A bad request (empty prompt, too long, bad parameters) raises ValueError when it is pulled.
    """
    return _decode(model, requests, slots, eos_ids, refill, max_len, end, steps=False)


def decode_steps(
    model: LlamaLM,
    requests: Iterable[DecodeRequest],
    slots: int,
    eos_ids: Sequence[int] = (),
    refill: bool = True,
    max_len: int | None = None,
    end: set[int] | None = None,
) -> Iterator[list[StepTokens]]:
    """`decode_stream` reporting every decode step: yields, once a step, a `StepTokens`
    (index, new tokens, ended) for each live request: its one new token ([] for the EOS that ends it),
    ended True on its last event. A request's tokens, concatenated, are what `decode_stream` returns
    for it. Requests ended through `end` (or with max_new_tokens=0) get one event ([], True). Costs
    one device-to-host copy of the step's tokens per step, which `decode_stream` does not pay.
    """
    return _decode(model, requests, slots, eos_ids, refill, max_len, end, steps=True)


def decode_live(
    model: LlamaLM,
    requests: Iterable[DecodeRequest | None],
    max_slots: int,
    eos_ids: Sequence[int] = (),
    max_len: int | None = None,
    end: set[int] | None = None,
) -> Iterator[list[StepTokens]]:
    """`decode_steps` over requests that arrive while it runs (a Serve replica's streams).

    The iterable yields a request, or None for "none waiting now": it is pulled at every step while a
    slot could take one, so a request joins the running batch at the next step, whatever the others'
    progress. When no request is decoding it is pulled once and may block until one comes; its end
    ends the decode once the live requests have. Indices count the requests, not the Nones. The batch
    holds as many slots as live requests need, rounded up to a power of two and at most `max_slots`:
    one stream alone decodes a batch of one, not of `max_slots`.
    """
    return _decode(model, requests, max_slots, eos_ids, True, max_len, end, steps=True, live=True)


_END = object()  # the request stream has ended


def _numbered(requests: Iterable[DecodeRequest | None]) -> Iterator[tuple[int, DecodeRequest] | None]:
    """(index, request) per request, None passed through ("none waiting now", live decodes only)."""
    index = 0
    for request in requests:
        if request is None:
            yield None
            continue
        yield index, request
        index += 1


@torch.inference_mode()
def _decode(
    model: LlamaLM,
    requests: Iterable[DecodeRequest | None],
    slots: int,
    eos_ids: Sequence[int],
    refill: bool,
    max_len: int | None,
    end: set[int] | None,
    steps: bool,
    live: bool = False,
) -> Iterator:
    """The one decode loop: (index, tokens) per ended request, or with steps=True a list of
    `StepTokens` per step. live=True: `decode_live`'s admission at every step and growing batch."""
    if not _is_int(slots) or slots < 1:
        raise ValueError(f"slots must be an int >= 1 (got {slots!r})")
    config, weight = model.config, model.embed_tokens.weight
    device, vocab = weight.device, config.vocab_size
    context = config.max_position_embeddings
    stop = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)  # [E] ids that end a request
    eos = set(eos_ids)
    pending = _numbered(requests)
    max_slots = slots
    state = _Slots(1 if live else slots, vocab, device)
    cache = SlotCache(config, len(state.request), min(max_len or context, context), device, weight.dtype)
    exhausted, step, changed = False, 0, True
    was_training = model.training
    model.eval()  # dropout would make seeded generation irreproducible
    try:
        while True:
            if end:  # the caller ends requests: their slots are free for this step's admissions
                cut = [(s, r) for s, r in enumerate(state.request) if r is not None and r in end]
                for s, index in cut:
                    end.discard(index)
                    state.request[s], changed = None, True
                    state.active[s] = False
                if cut:
                    if steps:
                        yield [(index, [], True) for _, index in cut]
                    else:
                        for s, index in cut:
                            yield index, state.out[s, : int(state.steps[s])].tolist()
            capacity = 0
            if live:  # every step: a request that came during the last one starts now
                capacity = max_slots - sum(r is not None for r in state.request)
            elif changed:
                free = sum(r is None for r in state.request)
                capacity = free if refill or free == len(state.request) else 0
            if not exhausted and capacity:
                admitted, exhausted, started = _admit(model, pending, capacity, max_slots, state, cache, step, end)
                changed |= started
                if steps and admitted:
                    yield [(index, [], True) for index in admitted]
                elif admitted:  # max_new_tokens=0, or ended before it started: nothing to generate
                    for index in admitted:
                        yield index, []
            if changed:  # host bookkeeping only when a request started or ended, not per token
                live_slots = state.live()
                if not live_slots:
                    if exhausted:
                        return
                    continue
                if refill and (exhausted or live) and len(live_slots) <= len(state.request) // 2:
                    state.keep(live_slots)
                    cache.keep(torch.tensor(live_slots, device=device))
                    live_slots = list(range(len(live_slots)))
                offset = max(state.offset[s] for s in live_slots)
                params = [state.params[s] for s in live_slots]
                sampling = any(r.temperature != 0 for r in params)
                # Each filter sorts the logits of every row: skipped when no live row uses it.
                top_k = state.top_k if any((r.top_k or vocab) < vocab for r in params) else None
                top_p = state.top_p if any((r.top_p or 1.0) < 1.0 for r in params) else None
                changed = False
            token = state.logits.argmax(dim=-1)  # [B]
            if sampling:
                greedy = state.temperature == 0
                u = state.uniforms.gather(1, state.steps[:, None])[:, 0]  # [B]
                sampled = sample_tokens(state.logits, u, state.temperature.masked_fill(greedy, 1.0), top_k, top_p)
                token = torch.where(greedy, token, sampled)
            state.out.scatter_(1, state.steps[:, None], token[:, None])
            state.steps += state.active
            done = state.steps >= state.limit
            if len(stop):
                done |= torch.isin(token, stop)
            ended = state.active & done
            state.active ^= ended  # ended rows are active ones: this clears them
            step += 1
            if steps:
                tokens, finished = token.tolist(), set(ended.nonzero().flatten().tolist())
                events = []
                for s, index in enumerate(state.request):
                    if index is None:
                        continue
                    t = tokens[s]
                    if s in finished:
                        state.request[s], changed = None, True
                        events.append((index, [] if t in eos else [t], True))
                    else:
                        events.append((index, [t], False))
                yield events
            else:
                for s in ended.nonzero().flatten().tolist():  # the one host sync of a step
                    n = int(state.steps[s])
                    n -= int(int(state.out[s, n - 1]) in eos)
                    index, state.request[s], changed = state.request[s], None, True
                    yield index, state.out[s, :n].tolist()
            if changed and not any(r is not None for r in state.request):
                continue
            span = offset + step  # the longest live row's length, counting the token it writes now
            mask = cache.decode_at(span)
            x = model.hidden(token[:, None], cache.lens[:, None], mask, cache)  # [B, 1, C]
            state.logits = model.lm_head(x[:, 0]).float()
            cache.lens += state.active
    finally:
        model.train(was_training)


def _admit(
    model: LlamaLM,
    pending: Iterator[tuple[int, DecodeRequest] | None],
    capacity: int,
    max_slots: int,
    state: _Slots,
    cache: SlotCache,
    step: int,
    end: set[int] | None,
) -> tuple[list[int], bool, bool]:
    """Pull up to `capacity` requests into free slots (adding slots, up to max_slots, when there are not
    enough) and prefill them together; (requests with nothing to do, exhausted, any started)."""
    taken: list[tuple[int, DecodeRequest]] = []
    empty, exhausted = [], False
    while len(taken) < capacity:
        item = next(pending, _END)
        if item is None:  # a live stream with nothing waiting
            break
        if item is _END:
            exhausted = True
            break
        index, request = item  # type: ignore[misc]
        request.check(model.config, f"request {index}")
        if request.max_new_tokens == 0 or (end and index in end):
            if end:
                end.discard(index)
            empty.append(index)
        else:
            taken.append((index, request))
    if not taken:
        return empty, exhausted, False
    free = [s for s, r in enumerate(state.request) if r is None]
    if len(taken) > len(free):
        busy = len(state.request) - len(free)
        extra = min(max_slots, 1 << (busy + len(taken) - 1).bit_length()) - len(state.request)
        state.add(extra)
        cache.add(extra)
        free = [s for s, r in enumerate(state.request) if r is None]
    device = cache.lens.device
    cache.grow(min(model.config.max_position_embeddings, max(len(r.prompt) + r.max_new_tokens for _, r in taken)))
    state.widen(max(r.max_new_tokens for _, r in taken))
    placed = [(free[k], index, request) for k, (index, request) in enumerate(taken)]
    slots = torch.tensor([s for s, _, _ in placed], device=device)
    prompts = [r.prompt for _, r in taken]
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    width = max(len(p) for p in prompts)
    idx = torch.tensor([p + [0] * (width - len(p)) for p in prompts], device=device)  # right-padded [n, P]
    mask = None
    if bool((lengths < width).any()):
        mask = attention_mask_4d(torch.arange(width, device=device) < lengths[:, None], width)  # [n, 1, P, P]
    cache.prefill_into(slots)
    positions = torch.arange(width, device=device).expand(len(prompts), width)
    x = model.hidden(idx, positions, mask, cache)  # [n, P, C]
    logits = model.lm_head(x[torch.arange(len(prompts), device=device), lengths - 1]).float()  # [n, vocab]
    cache.lens.index_copy_(0, slots, lengths)
    vocab = model.config.vocab_size
    columns = {
        "steps": torch.zeros(len(placed), dtype=torch.long),
        "limit": torch.tensor([r.max_new_tokens for _, _, r in placed]),
        "active": torch.ones(len(placed), dtype=torch.bool),
        "temperature": torch.tensor([float(r.temperature) for _, _, r in placed]),
        "top_k": torch.tensor([min(r.top_k or vocab, vocab) for _, _, r in placed]),
        "top_p": torch.tensor([float(r.top_p or 1.0) for _, _, r in placed]),
        "logits": logits,
    }
    for name, column in columns.items():
        target = getattr(state, name)
        target.index_copy_(0, slots, column.to(device, target.dtype))
    n_steps = state.uniforms.size(1)
    for slot, index, request in placed:
        state.request[slot], state.params[slot] = index, request
        state.offset[slot] = len(request.prompt) - step  # length at step t: prompt + tokens decoded since
        if request.temperature != 0:
            draws = row_uniforms([request.seed], 1, request.max_new_tokens)[0]
            state.uniforms[slot] = F.pad(draws, (0, n_steps - len(draws))).to(device)
    return empty, exhausted, True
