"""Generation: sampling with the recurrent cache, streaming text, and a CUDA-graph decode step.

`generate` prefills the prompts (the chunked kernels; on the fla backend FLA's chunk kernel)
and then decodes one token at a time through the model's `Cache`: a GDN layer carries its conv
window [B, C, W-1] and its state S [B, H, K, V], so a decode step costs the same at token 10
and at token 100,000; an attention layer carries its KV cache, which grows with the context; a
sliding-window attention layer a ring buffer of its last `swa_window` tokens, which does not.

    >>> model = build_model("tiny", vocab_size=256)
    >>> generate(model, [[72, 105], [84, 104, 101]], max_new_tokens=4, temperature=0)
    [[...4 ids...], [...4 ids...]]

Prompts of different lengths are left-padded and masked: padded steps leave every GDN state
untouched and attention never looks at them, so a padded sequence decodes exactly as it would
alone. Sampling (`sample_next`) is greedy at temperature 0, otherwise softmax(logits / T)
restricted by top-k and top-p (nucleus), drawn with a seeded `torch.Generator` and no host sync.

`CapturedDecoder` is the fast path: the decode step of a fixed batch on fixed buffers (GDN
states, conv windows, attention KV buffers preallocated to `max_len` with the fill level kept
in a tensor), recorded once as a `torch.cuda.CUDAGraph` and replayed per token, so a token
costs one graph launch instead of a few hundred kernel launches from Python. On the CPU the
same fixed-buffer step runs eagerly: the tests prove it gives the plain path's tokens.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TextIO

import torch

from .config import ConfigError
from .models import Cache, CausalLM

StepCallback = Callable[[int, list[int]], None]


def pad_prompts(prompts: Sequence[Sequence[int]] | torch.Tensor, device: torch.device | str | None = None,
                pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-id lists of any lengths -> (input_ids [B, T] long, attention_mask [B, T] bool or None).

    Shorter prompts are left-padded with `pad_id` and masked (False); the mask is None when all
    prompts have the same length. A [B, T] tensor is taken as it is (no padding).
    """
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2 or prompts.shape[1] == 0:
            raise ConfigError(f"prompts as a tensor must be [B, T] with T >= 1; got shape {list(prompts.shape)}")
        return prompts.to(device=device, dtype=torch.long), None
    if len(prompts) == 0 or any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token; prepend a BOS or separator id to empty prompts")
    longest = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), longest, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        input_ids[row, longest - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.long)
        mask[row, longest - len(prompt):] = True
    attention_mask = None if bool(mask.all()) else mask.to(device)
    return input_ids.to(device), attention_mask


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """logits [B, V] with the tokens outside top-k and outside the top-p nucleus set to -inf.

    top_k keeps the k largest logits (ties with the k-th kept too). top_p keeps the smallest set
    of most likely tokens whose probability reaches p: a token stays when the probability of
    the tokens ranked above it is below p, so the most likely token always stays. Probabilities
    for top-p are taken after top-k, as in Hugging Face's processors.
        probs [0.5, 0.3, 0.2, 0.0]: top_k=2 -> [0.5, 0.3]; top_p=0.6 -> [0.5, 0.3]; top_p=0.4 -> [0.5]
    """
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_above = probs.cumsum(dim=-1) - probs
        drop = torch.empty_like(mass_above, dtype=torch.bool).scatter_(-1, order, mass_above >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ConfigError(f"temperature={temperature}; use 0 for greedy decoding or a positive value to sample")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k={top_k}; use a positive integer or None")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"top_p={top_p}; use a value in (0, 1] or None")


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> next token ids [B] long.

    temperature 0: argmax. Otherwise a draw from softmax(filter_logits(logits / temperature)),
    made as argmax(probs / E) with E ~ Exponential(1) from `generator` (on the logits' device):
    the same distribution as torch.multinomial, without a host sync, so a decode loop on the
    GPU never waits for the CPU. Same generator state, same logits -> same tokens.
    """
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise).argmax(dim=-1)


@torch.no_grad()
def prefill(model: CausalLM, input_ids: torch.Tensor, cache: Cache, attention_mask: torch.Tensor | None = None,
            max_tokens_per_call: int | None = None) -> torch.Tensor:
    """Run the prompts through the model into `cache` (updated in place); returns the logits of
    the last position [B, vocab] fp32.

    input_ids [B, T]; attention_mask [B, T] (False at left padding). `max_tokens_per_call`
    bounds B x T per forward call (long contexts go in pieces of T, each a multiple of 64 steps
    where possible: the chunked kernels carry the state from piece to piece), which bounds the
    memory of the per-call logits and attention masks; None runs the prompt in one call.
    """
    B, T = input_ids.shape
    piece = T if max_tokens_per_call is None else max(1, max_tokens_per_call // B)
    if piece < T and piece >= 64:
        piece -= piece % 64
    logits = None
    for start in range(0, T, piece):
        end = min(start + piece, T)
        mask = None if attention_mask is None else attention_mask[:, start:end]
        logits = model(input_ids[:, start:end], cache=cache, attention_mask=mask)[:, -1]
    return logits


class TextStreamer:
    """Prints one sequence's text as it is generated (a notebook cell or a terminal).

    Pass it as `generate(..., stream=TextStreamer(tokenizer))`. `tokenizer` is anything with
    `.decode(ids) -> str` (every gdn_lab tokenizer). It decodes the tokens so far and prints
    what is new; while the text ends in an incomplete UTF-8 sequence (a byte tokenizer midway
    through a character decodes to U+FFFD) it waits for the next token. `row` picks the
    sequence of a batch; `prompt` is printed first; `.text` holds the generated text.
    """

    def __init__(self, tokenizer, row: int = 0, prompt: str | None = None, file: TextIO | None = None):
        self.tokenizer, self.row, self.file = tokenizer, row, file
        self.token_ids: list[int] = []
        self.text = ""
        self._printed = 0
        if prompt:
            self._write(prompt)

    def _write(self, text: str) -> None:
        print(text, end="", flush=True, file=self.file or sys.stdout)

    def __call__(self, step: int, tokens: list[int]) -> None:
        self.token_ids.append(tokens[self.row])
        self.text = self.tokenizer.decode(self.token_ids)
        if not self.text.endswith("\ufffd"):
            self._write(self.text[self._printed:])
            self._printed = len(self.text)

    def end(self) -> None:
        """Print whatever is still held back, then a newline (`generate` calls it when done)."""
        self._write(self.text[self._printed:] + "\n")
        self._printed = len(self.text)


class CapturedDecoder:
    """The decode step of `model` for `batch_size` sequences of up to `max_len` tokens, on
    fixed buffers, captured once as a CUDA graph and replayed for every token.

    Buffers (none changes shape or address): the model's `Cache` made with `max_len` (per GDN
    layer conv [B, C, W-1] and state [B, H, K, V] fp32; per attention layer k, v
    [B, Hkv, max_len, hd], valid [B, max_len], its conv window [B, C, W-1] (width 0 without
    `attn_conv_size`), and the fill level and RoPE positions as tensors, so the step works at
    any position < max_len; per sliding-window layer the same with a ring of `swa_window` slots in
    place of max_len), the input `tokens` [B] and the output `logits` [B, vocab] fp32.
    The layers update these in place under no_grad.

    `prefill(input_ids, attention_mask)` resets the buffers and runs the prompt eagerly with
    the chunked kernels straight into them; `step(tokens)` writes the tokens, replays the
    graph and returns `logits` (overwritten by the next step: sample from it before then).
    `use_graph` defaults to True on CUDA; elsewhere (or with False) the same step runs
    eagerly on the same buffers. Capturing warms the step up on a side stream first (Triton
    autotuning, cuBLAS workspaces) and records the graph once; the model's weights must not
    be replaced afterwards (in-place updates are seen by the graph).
    """

    def __init__(self, model: CausalLM, batch_size: int, max_len: int, use_graph: bool | None = None,
                 warmup_steps: int = 3):
        if batch_size < 1 or max_len < 2:
            raise ConfigError(f"CapturedDecoder needs batch_size >= 1 and max_len >= 2; got {batch_size}, {max_len}")
        self.model, self.batch_size, self.max_len = model, batch_size, max_len
        self.device = model.device
        self.use_graph = self.device.type == "cuda" if use_graph is None else use_graph
        if self.use_graph and self.device.type != "cuda":
            raise ConfigError(f"CUDA graphs need the model on a CUDA device; it is on {self.device}: use_graph=False")
        self.cache = model.new_cache(batch_size, max_len=max_len)
        self.tokens = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.logits = torch.zeros(batch_size, model.config.vocab_size, dtype=torch.float32, device=self.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        if self.use_graph:
            self._capture(warmup_steps)

    @property
    def position(self) -> int:
        """Tokens in the buffers (prompt, padding included, plus decoded tokens)."""
        return self.cache.seen_tokens

    @torch.no_grad()
    def _run_step(self) -> None:
        self.logits.copy_(self.model(self.tokens[:, None], cache=self.cache)[:, -1])

    def _capture(self, warmup_steps: int) -> None:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(warmup_steps):
                self.reset()
                self._run_step()
            self.reset()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._run_step()
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """Empty every buffer: zero GDN states, no filled KV slots, position 0."""
        for state in self.cache.states:
            for tensor in vars(state).values():
                if isinstance(tensor, torch.Tensor):
                    tensor.zero_()
        self.cache.seen_tokens = 0

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                max_tokens_per_call: int | None = None) -> torch.Tensor:
        """Reset, then run input_ids [B, T] (attention_mask [B, T], False at left padding) into
        the buffers with the chunked kernels; returns the last position's logits [B, vocab]."""
        B, T = input_ids.shape
        if B != self.batch_size:
            raise ConfigError(f"this CapturedDecoder holds batch_size={self.batch_size} sequences; got {B} prompts")
        if T >= self.max_len:
            raise ConfigError(f"a {T}-token prompt leaves no room to decode in max_len={self.max_len}; "
                              f"make the decoder with max_len > prompt length + new tokens")
        self.reset()
        logits = prefill(self.model, input_ids, self.cache, attention_mask, max_tokens_per_call)
        self.logits.copy_(logits)
        return self.logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B] long -> logits [B, vocab] fp32 of the next position (the `logits` buffer)."""
        if self.cache.seen_tokens >= self.max_len:
            raise ConfigError(f"the decoder is full at max_len={self.max_len} tokens; make it with a larger max_len")
        self.tokens.copy_(tokens)
        if self.graph is None:
            self._run_step()
        else:
            self.graph.replay()
            self.cache.seen_tokens += 1  # a replay runs the kernels only: advance the host-side count here
        return self.logits


@torch.no_grad()
def generate(model: CausalLM, prompts: Sequence[Sequence[int]] | torch.Tensor, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             stream: StepCallback | TextStreamer | None = None, captured: bool | CapturedDecoder = False,
             eos_id: int | None = None, max_tokens_per_call: int | None = None) -> list[list[int]]:
    """Continue each prompt by up to `max_new_tokens` tokens; returns the new ids per prompt.

    prompts: token-id lists (any lengths: left-padded and masked) or a [B, T] tensor.
    temperature 0 is greedy; otherwise sampling with optional top_k / top_p (`sample_next`),
    from a `torch.Generator` seeded with `seed` (same seed, same model -> same tokens).
    stream: `callback(step, tokens)` with the B new ids after every step (e.g. a
    `TextStreamer`, whose `end()` is called at the end); streaming and `eos_id` read the
    tokens on the host every step, otherwise the loop never syncs with the GPU.
    eos_id: a sequence stops after emitting it (its list ends with eos_id); the loop stops
    when every sequence has. captured: True decodes with a `CapturedDecoder` made for this
    call (a CUDA graph on the GPU, the fixed-buffer step eagerly on the CPU); pass a
    CapturedDecoder to reuse its graph across calls. max_tokens_per_call: see `prefill`.
    """
    _check_sampling(temperature, top_k, top_p)
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens={max_new_tokens}; use 0 or more")
    device = model.device
    input_ids, attention_mask = pad_prompts(prompts, device)
    B, T = input_ids.shape
    if max_new_tokens == 0:
        return [[] for _ in range(B)]
    generator = torch.Generator(device=device).manual_seed(seed)

    if captured:
        decoder = captured if isinstance(captured, CapturedDecoder) else CapturedDecoder(
            model, B, T + max_new_tokens)
        if decoder.model is not model:
            raise ConfigError("this CapturedDecoder was made for another model; make one for this model")
        if T + max_new_tokens > decoder.max_len:
            raise ConfigError(f"{T} prompt + {max_new_tokens} new tokens exceed the decoder's max_len="
                              f"{decoder.max_len}; make a CapturedDecoder with a larger max_len")
        logits = decoder.prefill(input_ids, attention_mask, max_tokens_per_call)
        step = decoder.step
    else:
        cache = model.new_cache(B)
        logits = prefill(model, input_ids, cache, attention_mask, max_tokens_per_call)

        def step(tokens: torch.Tensor) -> torch.Tensor:
            return model(tokens[:, None], cache=cache)[:, -1]

    new_tokens = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    produced = max_new_tokens
    for i in range(max_new_tokens):
        tokens = sample_next(logits, temperature, top_k, top_p, generator)
        if eos_id is not None:
            tokens = tokens.masked_fill(finished, eos_id)
            finished |= tokens == eos_id
        new_tokens[:, i] = tokens
        if stream is not None:
            stream(i, tokens.tolist())
        if eos_id is not None and bool(finished.all()):
            produced = i + 1
            break
        if i + 1 < max_new_tokens:
            logits = step(tokens)
    if stream is not None and hasattr(stream, "end"):
        stream.end()

    outputs = new_tokens[:, :produced].tolist()
    if eos_id is not None:
        outputs = [row[:row.index(eos_id) + 1] if eos_id in row else row for row in outputs]
    return outputs
