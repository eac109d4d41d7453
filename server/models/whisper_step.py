"""Greedy Whisper decoding of many sequences at once, one token per step, sequences joining and
leaving between steps: the model math under `server.batching.continuous`.

`BatchedDecoder` holds the per-sequence decoder state of up to `capacity` sequences in slots:
the cross-attention keys and values (computed once per sequence from its encoder output) and
a self-attention KV cache. The sequences being decoded always occupy slots 0..n-1 (a leaving
sequence's slot is filled by moving the last one into it), so every step works on views of
the slot tensors, with no gather. Rows of different lengths share one step: each row writes
its new key and value at its own position and attends with a mask over the positions it has
filled; each row gets its own position id (Whisper's decoder has learned position
embeddings). The math reuses the model's own modules (embeddings, projections, layer norms,
MLP, proj_out) in the operation order of transformers' `WhisperAttention` with
`scaled_dot_product_attention`, so that one sequence alone gives bit-for-bit the logits of
`generate`.

`GreedyRuntime` adds what `generate` does around the logits in greedy short-form mode: the
prompt from the generation config, the suppress rules, the stop condition (end-of-text or
max_new_tokens), and the no-speech probability and confidence `WhisperModel` reports. A
draft of the transcript (`DecodeOptions.draft`: a stream's last interim tokens) is verified in the
prompt's prefill pass, as in speculative decoding: the tokens greedy decoding agrees with are
kept and only the rest is decoded step by step, with the same result.

Only the model worker thread uses these.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from server.models.attention import attend, plain_products
from server.models.base import DecodeOptions, WindowResult, Word
from server.models.device import device_errors
from server.models.runaway import is_looping, trim_loop
from server.models.shapes import padded_keys, padded_length
from server.models.static_step import StepChoice, StepRunner, choose_step
from server.models.whisper_align import frames_of, group_words, token_times
from server.models.whisper_language import DETECT, detect_languages, with_language
from server.models.whisper_tokens import (
    confidence,
    language_in,
    languages_by_id,
    no_speech_id,
    no_speech_probs,
)


@dataclass(frozen=True)
class Suppression:
    """Greedy logit rules of Whisper's `generate` in short-form mode: `suppress_tokens` at
    every position, `begin_suppress_tokens` at the first generated position."""

    always: torch.Tensor  # (vocab,) bool
    at_begin: torch.Tensor  # (vocab,) bool

    @classmethod
    def from_generation_config(cls, gen: Any, vocab_size: int, device: torch.device) -> Suppression:
        def mask(ids: list[int] | None) -> torch.Tensor:
            out = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            valid = [i for i in ids or [] if 0 <= i < vocab_size]
            if valid:
                out[torch.as_tensor(valid, device=device)] = True
            return out

        return cls(mask(gen.suppress_tokens), mask(gen.begin_suppress_tokens))

    def apply(self, logits: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """logits (rows, vocab) float32; first (rows,) bool: rows at their first generated
        position. Returns the processed scores (-inf where suppressed)."""
        suppressed = self.always.unsqueeze(0) | (first.unsqueeze(1) & self.at_begin.unsqueeze(0))
        return logits.masked_fill(suppressed, float("-inf"))


class BatchedDecoder:
    """Slot caches and the batched forward pass of a `WhisperForConditionalGeneration`."""

    def __init__(self, hf_model: Any, capacity: int, max_positions: int) -> None:
        decoder = hf_model.model.decoder
        self.decoder = decoder
        self.proj_out = hf_model.proj_out
        config = hf_model.config
        self.capacity = capacity
        self.max_positions = min(max_positions, config.max_target_positions)
        self.heads = config.decoder_attention_heads
        self.head_dim = config.d_model // self.heads
        self.source_positions = config.max_source_positions
        param = next(decoder.parameters())
        self.device, self.dtype = param.device, param.dtype
        layers = len(decoder.layers)
        self_shape = (capacity, self.heads, self.max_positions, self.head_dim)
        cross_shape = (capacity, self.heads, self.source_positions, self.head_dim)

        def alloc(shape: tuple[int, ...]) -> list[torch.Tensor]:
            # Not under inference_mode: a compiled step may not mutate tensors made under it.
            with torch.inference_mode(False), torch.no_grad():
                return [
                    torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(layers)
                ]

        self.self_k, self.self_v = alloc(self_shape), alloc(self_shape)
        self.cross_k, self.cross_v = alloc(cross_shape), alloc(cross_shape)
        self.lengths = [0] * capacity  # tokens in each slot's self-attention cache

    # -- slots --------------------------------------------------------------------------
    @torch.inference_mode()
    def load_cross(self, first_slot: int, encoder_hidden: torch.Tensor) -> None:
        """Cross-attention K,V of `encoder_hidden` (k, frames, d_model) into slots
        first_slot..first_slot+k-1, once per sequence; their self caches start empty."""
        k = encoder_hidden.shape[0]
        rows = slice(first_slot, first_slot + k)
        for i, layer in enumerate(self.decoder.layers):
            attn = layer.encoder_attn
            self.cross_k[i][rows] = self._heads(attn.k_proj(encoder_hidden))
            self.cross_v[i][rows] = self._heads(attn.v_proj(encoder_hidden))
        for slot in range(first_slot, first_slot + k):
            self.lengths[slot] = 0

    def keep(self, slot: int, positions: int) -> None:
        """Keep only the first `positions` of slot's self cache: later steps write over the
        rest (draft tokens the model did not agree with) and never attend to it."""
        self.lengths[slot] = positions

    @torch.inference_mode()
    def move(self, src: int, dst: int) -> None:
        """Copy slot src's state into slot dst (to keep the active slots contiguous)."""
        if src == dst:
            return
        n = self.lengths[src]
        for i in range(len(self.self_k)):
            self.self_k[i][dst, :, :n] = self.self_k[i][src, :, :n]
            self.self_v[i][dst, :, :n] = self.self_v[i][src, :, :n]
            self.cross_k[i][dst] = self.cross_k[i][src]
            self.cross_v[i][dst] = self.cross_v[i][src]
        self.lengths[dst] = n

    # -- forward passes -----------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, first_slot: int, input_ids: torch.Tensor) -> torch.Tensor:
        """The whole prompt (k, T) of slots first_slot..first_slot+k-1, whose caches are empty,
        in one causal pass (as `generate`'s first step). Returns logits (k, T, vocab)."""
        k, t = input_ids.shape
        rows = slice(first_slot, first_slot + k)
        positions = torch.arange(t, device=self.device).unsqueeze(0).expand(k, t)
        hidden = self._embed(input_ids, positions)
        for i, layer in enumerate(self.decoder.layers):
            attn = layer.self_attn
            residual = hidden
            x = layer.self_attn_layer_norm(hidden)
            q = self._heads(attn.q_proj(x) * attn.scaling)
            key, value = self._heads(attn.k_proj(x)), self._heads(attn.v_proj(x))
            self.self_k[i][rows, :, :t] = key
            self.self_v[i][rows, :, :t] = value
            out = F.scaled_dot_product_attention(q, key, value, is_causal=t > 1, scale=1.0)
            hidden = residual + attn.out_proj(self._merge(out))
            hidden = self._cross_and_mlp(layer, i, hidden, rows)
        for slot in range(first_slot, first_slot + k):
            self.lengths[slot] = t
        return self.proj_out(self.decoder.layer_norm(hidden))

    @torch.inference_mode()
    def step(self, input_ids: torch.Tensor, first: int = 0) -> torch.Tensor:
        """One new token (n,) for each of the slots first..first+n-1, each at its own
        position. Returns logits (n, vocab). The slots' lengths don't move until `advance()`,
        so a step that fails part-way (out of memory) can be run again, in smaller pieces:
        it writes the same cache positions."""
        n = input_ids.shape[0]
        lengths = self.lengths[first : first + n]
        filled = max(lengths) + 1
        # In low precision on a CPU, every new shape of a product builds and keeps a kernel
        # (server.models.shapes): attend over blocks of positions there, not over each length.
        blocked = plain_products(self.device, self.dtype)
        longest = padded_keys(filled, self.max_positions) if blocked else filled
        positions = torch.as_tensor(lengths, device=self.device)
        hidden = self._embed(input_ids.unsqueeze(1), positions.unsqueeze(1))
        mask = None
        if min(lengths) != max(lengths) or longest != filled:  # hide each row's unfilled keys
            keys = torch.arange(longest, device=self.device)
            mask = (keys.unsqueeze(0) <= positions.unsqueeze(1)).view(n, 1, 1, longest)
        slots = torch.arange(first, first + n, device=self.device)
        rows = slice(first, first + n)
        for i, layer in enumerate(self.decoder.layers):
            attn = layer.self_attn
            residual = hidden
            x = layer.self_attn_layer_norm(hidden)
            q = self._heads(attn.q_proj(x) * attn.scaling)
            self.self_k[i][slots, :, positions] = self._heads(attn.k_proj(x))[:, :, 0]
            self.self_v[i][slots, :, positions] = self._heads(attn.v_proj(x))[:, :, 0]
            key = self.self_k[i][rows, :, :longest]
            value = self.self_v[i][rows, :, :longest]
            out = attend(q, key, value, mask)
            hidden = residual + attn.out_proj(self._merge(out))
            hidden = self._cross_and_mlp(layer, i, hidden, rows)
        return self.proj_out(self.decoder.layer_norm(hidden))[:, 0]

    def advance(self, n: int) -> None:
        """Slots 0..n-1 took one token each (after every piece of a step ran)."""
        for slot in range(n):
            self.lengths[slot] += 1

    def _embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # as transformers' WhisperDecoder: no embed_scale (it is 1.0 for every Whisper)
        return self.decoder.embed_tokens(input_ids) + self.decoder.embed_positions.weight[positions]

    def _cross_and_mlp(self, layer: Any, i: int, hidden: torch.Tensor, rows: slice) -> torch.Tensor:
        attn = layer.encoder_attn
        residual = hidden
        x = layer.encoder_attn_layer_norm(hidden)
        q = self._heads(attn.q_proj(x) * attn.scaling)
        out = attend(q, self.cross_k[i][rows], self.cross_v[i][rows])
        hidden = residual + attn.out_proj(self._merge(out))
        residual = hidden
        x = layer.final_layer_norm(hidden)
        return residual + layer.fc2(layer.activation_fn(layer.fc1(x)))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, time, d_model) -> (batch, heads, time, head_dim), contiguous."""
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.head_dim).transpose(1, 2).contiguous()

    @staticmethod
    def _merge(x: torch.Tensor) -> torch.Tensor:
        """(batch, heads, time, head_dim) -> (batch, time, d_model)."""
        b, _, t, _ = x.shape
        return x.transpose(1, 2).contiguous().reshape(b, t, -1)


# -- greedy decoding of many sequences, joining and leaving between steps ---------------------
@dataclass(eq=False)
class DecodeSequence:
    """One window being decoded; `owner` is whatever the caller tracks it by."""

    owner: Any
    prompt: list[int]
    max_new_tokens: int
    language: str
    no_speech_prob: float = 0.0
    tokens: list[int] = field(default_factory=list)  # generated, without end-of-text
    logprobs: list[float] = field(default_factory=list)
    finished: bool = False
    most_rows: int = 0  # the most sequences it was decoded together with
    # Word times wanted: the window's audio length, and its encoder output for the alignment
    # pass when it finishes (server.models.whisper_align).
    duration_s: float | None = None
    encoder_hidden: torch.Tensor | None = None


class GreedyRuntime:
    """Greedy Whisper decoding with sequences joining and leaving between steps. Only the
    model worker thread calls it. `active[i]` is the sequence in decoder slot i."""

    def __init__(self, model: Any, max_active: int, compile: str = "off") -> None:
        self.model = model  # a WhisperModel: .model (transformers), .tokenizer, .info
        hf = model.model
        gen = hf.generation_config
        self.gen = gen
        self.hf = hf
        self.device = next(hf.parameters()).device
        self.sot = int(gen.decoder_start_token_id)
        self.eos = int(gen.eos_token_id)
        no_ts = getattr(gen, "no_timestamps_token_id", None)
        self.no_timestamps = None if no_ts is None else int(no_ts)
        self.lang_to_id: dict[str, int] = dict(getattr(gen, "lang_to_id", None) or {})
        self.lang_by_id = languages_by_id(gen)
        self.task_to_id: dict[str, int] = dict(getattr(gen, "task_to_id", None) or {})
        self.multilingual = bool(model.info.multilingual)
        self.no_speech = no_speech_id(model.tokenizer)
        self.max_new_tokens = int(getattr(model, "max_new_tokens", 440))
        self.max_active = max_active
        self.suppression = Suppression.from_generation_config(
            gen, hf.config.vocab_size, self.device
        )
        self._decoder: BatchedDecoder | None = None  # allocated on first use, on the worker
        self._runner: StepRunner | None = None
        # What runs the steps is decided at warm-up (it may probe for a C++ compiler, which
        # takes a subprocess): a runtime never warmed up decodes eagerly and probes nothing.
        self._compile = compile
        self._choice: StepChoice | None = None
        self.active: list[DecodeSequence] = []
        # Logit rules of the checkpoint's generation config that greedy decoding here doesn't
        # apply: with any of them, every window falls back to generate.
        self.plain_greedy = (
            (getattr(gen, "num_beams", 1) or 1) == 1
            and not getattr(gen, "do_sample", False)
            and (getattr(gen, "repetition_penalty", 1.0) or 1.0) == 1.0
            and not getattr(gen, "no_repeat_ngram_size", 0)
            and not getattr(gen, "return_timestamps", False)
        )

    @property
    def decoder(self) -> BatchedDecoder:
        if self._decoder is None:
            positions = self.hf.config.max_target_positions
            self._decoder = BatchedDecoder(self.hf, self.max_active, positions)
        return self._decoder

    @property
    def step_choice(self) -> StepChoice:
        if self._choice is None:
            self._choice = choose_step(self._compile, self.device)
        return self._choice

    @property
    def runner(self) -> StepRunner:
        if self._runner is None:
            choice = self._choice or StepChoice("eager", "no warm-up")
            self._runner = StepRunner(self.decoder, self.suppression.always, choice)
        return self._runner

    def warm_steps(self) -> None:
        """Compile (or capture) the decode step of every row bucket now, before serving, so
        that no request waits for it; only while no sequence is decoding."""
        if self.step_choice.mode == "eager":
            return
        if self.active:
            raise RuntimeError("decode steps are warmed up only while nothing is decoding")
        if self._runner is not None and self._runner.choice != self.step_choice:
            self._runner = None  # made before warm-up, eager: made again with the choice
        self.runner.warm()

    @property
    def step_label(self) -> str:
        """What runs the decode steps, for the log and GetServerInfo."""
        if self._choice is None:
            if self._compile == "off":
                return "eager: --compile off"
            return "eager: the compiled step is built at warm-up, and there was none"
        if self._choice.mode != "eager" and not (self._runner and self._runner.warmed):
            return "eager: the compiled step is built at warm-up, and there was none"
        return self._choice.label

    # -- prompts and options ------------------------------------------------------------
    def prompt(self, options: DecodeOptions) -> list[int] | None:
        """The start tokens `generate` would use for these options, or None when greedy
        decoding here doesn't cover them (the caller falls back to `model.run_batch`)."""
        if options.beam_size > 1 or options.temperature > 0 or not self.plain_greedy:
            return None
        if options.prompt:
            return None
        if options.word_timestamps and not getattr(self.gen, "alignment_heads", None):
            return None  # generate says why it can't
        tokens = [self.sot]
        if self.multilingual:
            # No language: detected when the window joins (DETECT is replaced then).
            language = self.lang_to_id.get(f"<|{options.language}|>", DETECT)
            task = self.task_to_id.get(options.task)
            if task is None or (options.language is not None and language == DETECT):
                return None  # generate says why it can't
            tokens += [language, task]
        else:
            tokens += self._forced_ids()
        if self.no_timestamps is not None and tokens[-1] != self.no_timestamps:
            tokens.append(self.no_timestamps)
        return tokens

    def _forced_ids(self) -> list[int]:
        """Legacy `forced_decoder_ids` ([[1, id], [2, id]...]) that `generate` follows when
        neither language nor task is given (English-only models)."""
        forced = getattr(self.gen, "forced_decoder_ids", None) or getattr(
            self.hf.config, "forced_decoder_ids", None
        )
        ids: list[int] = []
        for expected, (position, token) in enumerate(forced or [], start=1):
            if position != expected:
                break
            if token is not None:  # a language left to detection: dropped, as generate does
                ids.append(int(token))
        return ids

    # -- joining, stepping, leaving -----------------------------------------------------
    def draft(self, options: DecodeOptions) -> list[int]:
        """The draft tokens of `options` (see `join`), if they fit the decoder comfortably."""
        draft = list(options.draft)
        # Leave the decoder most of its 448 positions; a longer draft is not used at all.
        return draft if len(draft) <= self.decoder.max_positions // 2 else []

    @torch.inference_mode()
    def join(
        self,
        features: list[np.ndarray],
        prompts: list[list[int]],
        owners: list[Any],
        drafts: list[list[int]] | None = None,
        word_times: list[float | None] | None = None,
    ) -> list[DecodeSequence]:
        """Encode windows in one batch, run each prompt followed by its draft tokens (if any)
        in one causal pass per input length, and pick the first tokens; they take the next
        free slots. Some may finish at once (check `finished`). Returned in input order.
        A prompt holding DETECT gets its language detected first (one batched pass at
        <|startoftranscript|>). `word_times[i]`: window i's audio length when it wants word
        times (`results()` aligns them), else None.

        A draft is a guess of how the transcript starts (a stream's earlier words). It is
        verified, not forced: the pass gives the model's greedy choice at every draft
        position, the draft is kept up to the first token the model would not have chosen,
        and decoding goes on from there with the model's own token. So a draft only saves
        steps; the transcript is what plain greedy decoding gives (up to float sums)."""
        if len(self.active) + len(features) > self.max_active:
            raise ValueError("more sequences than max_active")
        with device_errors(self.device, f"an encoder batch of {len(features)}"):
            return self._join(features, prompts, owners, drafts, word_times)

    def _join(
        self,
        features: list[np.ndarray],
        prompts: list[list[int]],
        owners: list[Any],
        drafts: list[list[int]] | None,
        word_times: list[float | None] | None = None,
    ) -> list[DecodeSequence]:
        drafts = drafts or [[] for _ in prompts]
        durations = word_times or [None for _ in prompts]
        # Slots in order of input length, so each length is one contiguous prefill.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(drafts[i]))
        batch = torch.from_numpy(np.stack([features[i] for i in order])).to(
            self.device, self.decoder.dtype
        )
        encoded = self.hf.get_encoder()(batch)
        first = len(self.active)
        self.decoder.load_cross(first, encoded.last_hidden_state)
        prompts = self._detect(first, order, prompts)
        inputs = [p + d for p, d in zip(prompts, drafts, strict=True)]
        joined: dict[int, DecodeSequence] = {}
        start = 0
        while start < len(order):
            room = self.decoder.max_positions
            length = padded_length(len(inputs[order[start]]), room)
            group = [i for i in order[start:] if padded_length(len(inputs[i]), room) == length]
            # Padded with end-of-text up to the bucket: the pass is causal, so a row's real
            # positions never see its padding, and `keep` below drops the padding's cache.
            padded = [inputs[i] + [self.eos] * (length - len(inputs[i])) for i in group]
            ids = torch.as_tensor(padded, device=self.device)
            logits = self.decoder.prefill(first + start, ids).float()  # (k, T, vocab)
            no_speech = no_speech_probs(logits[:, 0], self.no_speech)
            seqs, decisions = [], []
            for row, i in enumerate(group):
                prompt = prompts[i]
                seq = DecodeSequence(
                    owners[i], prompt,
                    min(self.max_new_tokens, self.decoder.max_positions - len(prompt)),
                    language_in(prompt, self.lang_by_id) or "" if self.multilingual else "en",
                    no_speech[row], duration_s=durations[i],
                )  # fmt: skip
                if seq.duration_s is not None:  # kept for the alignment pass (a copy: 1 row)
                    seq.encoder_hidden = encoded.last_hidden_state[start + row].clone()
                mine = logits[row, len(prompt) - 1 : len(inputs[i])]  # not the padding's
                decisions.append(self._verify(seq, drafts[i], mine))
                self.decoder.keep(first + start + row, len(prompt) + len(seq.tokens))
                seqs.append(seq)
            self.active += seqs
            self._choose(seqs, torch.stack(decisions))
            joined.update(zip(group, seqs, strict=True))
            start += len(group)
        return [joined[i] for i in range(len(inputs))]

    def _detect(self, first: int, order: list[int], prompts: list[list[int]]) -> list[list[int]]:
        """Prompts (input order) with each DETECT replaced by the language `generate` would
        detect: one pass at <|startoftranscript|> over the joining slots (first.. in `order`),
        whose encoder output is loaded; the prompt's own pass rewrites their caches."""
        if not any(DETECT in p for p in prompts):
            return prompts
        sot = torch.full((len(order), 1), self.sot, device=self.device, dtype=torch.long)
        logits = self.decoder.prefill(first, sot)[:, 0]
        detected = detect_languages(logits, list(self.lang_by_id))
        out = list(prompts)
        for slot, i in enumerate(order):
            if DETECT in prompts[i]:
                out[i] = with_language(prompts[i], detected[slot])
        return out

    def _verify(self, seq: DecodeSequence, draft: list[int], logits: torch.Tensor) -> torch.Tensor:
        """Keep the draft tokens greedy decoding agrees with (into seq.tokens); return the
        processed scores at the first position left to choose. `logits` (len(draft) + 1,
        vocab) are those after the prompt's last token and after each draft token."""
        first = torch.zeros(len(logits), dtype=torch.bool, device=logits.device)
        first[0] = True  # begin_suppress_tokens apply at the first generated position only
        scores = self.suppression.apply(logits, first)
        choices = scores.argmax(dim=-1).tolist()
        kept = 0
        while kept < min(len(draft), seq.max_new_tokens - 1) and choices[kept] == draft[kept]:
            kept += 1
        if kept:
            logp = torch.log_softmax(scores[:kept], dim=-1)
            index = torch.as_tensor(draft[:kept], device=scores.device).unsqueeze(1)
            picked = logp.gather(1, index)[:, 0]
            seq.tokens, seq.logprobs = draft[:kept], picked.tolist()
        return scores[kept]

    @torch.inference_mode()
    def step(self, max_rows: int | None = None) -> None:
        """One token for every active sequence that isn't finished (finished ones, if any
        are left in, are stepped along and don't change). All rows run as one step, compiled or
        graph-captured per row bucket when warmed (`server.models.static_step`); with
        `max_rows` below the active count (after an out of memory), in eager pieces of at
        most that many rows (smaller pieces need less
        memory for activations and logits). Nothing changes unless every piece ran: a step
        that raised can be run again."""
        live = self.active
        rows = max(1, min(max_rows or len(live), len(live)))
        with device_errors(self.device, f"a decode step of {len(live)} (pieces of {rows})"):
            ids = [s.tokens[-1] if s.tokens else self.eos for s in live]
            if rows == len(live):
                tokens, logprobs = self.runner.run(ids, self.decoder.lengths[: len(live)])
            else:
                tokens, logprobs = self._step_pieces(ids, rows)
        self.decoder.advance(len(live))
        self._record(live, tokens, logprobs)

    def _step_pieces(self, ids: list[int], rows: int) -> tuple[list[int], list[float]]:
        tensor = torch.as_tensor(ids, device=self.device)
        pieces = [
            self.decoder.step(tensor[first : first + rows], first).float()
            for first in range(0, len(ids), rows)
        ]
        not_first = torch.zeros(len(ids), dtype=torch.bool, device=self.device)
        scores = self.suppression.apply(torch.cat(pieces), not_first)
        return self._pick(scores)  # reads back to the host: a sync point

    def leave(self, gone: Sequence[DecodeSequence]) -> None:
        """Free the slots of `gone`; the last active sequences move into the holes."""
        drop = {id(s) for s in gone}
        i = 0
        while i < len(self.active):
            if id(self.active[i]) in drop:
                last = len(self.active) - 1
                self.decoder.move(last, i)
                self.active[i] = self.active[last]
                self.active.pop()
                if i == last:
                    break
                continue  # the moved sequence is now at i: look at it too
            i += 1

    def clear(self) -> None:
        self.active = []

    def results(self, seqs: Sequence[DecodeSequence]) -> list[WindowResult]:
        """The results of finished sequences, in order; those that want word times get them
        from one batched alignment pass (server.models.whisper_align)."""
        timed = [s for s in seqs if s.duration_s is not None and s.encoder_hidden is not None]
        times: dict[int, list[float]] = {}
        if timed:
            with device_errors(self.device, f"a word-time pass of {len(timed)}"):
                rows = token_times(
                    self.hf,
                    torch.stack([s.encoder_hidden for s in timed]),  # type: ignore[misc]
                    [s.prompt + s.tokens[: self._fed(s)] for s in timed],
                    [len(s.prompt) for s in timed],
                    [frames_of(s.duration_s or 0.0) for s in timed],
                )
            times = {id(s): t for s, t in zip(timed, rows, strict=True)}
        return [self.result(s, times.get(id(s))) for s in seqs]

    def _fed(self, seq: DecodeSequence) -> int:
        """How many of its tokens the decoder was fed: all of them when end-of-text came
        next, else all but the last (the one that hit the limit or closed a loop)."""
        ended_by_limit = len(seq.tokens) >= seq.max_new_tokens or is_looping(seq.tokens)
        return len(seq.tokens) - 1 if ended_by_limit and seq.tokens else len(seq.tokens)

    def result(self, seq: DecodeSequence, times: list[float] | None = None) -> WindowResult:
        """`times`: the token times of its untrimmed tokens (and one after), for words."""
        seq.encoder_hidden = None
        seq.tokens = trim_loop(seq.tokens)
        seq.logprobs = seq.logprobs[: len(seq.tokens)]
        text = self.model.tokenizer.decode(seq.tokens, skip_special_tokens=True).strip()
        words: tuple[Word, ...] = ()
        if times is not None and seq.duration_s is not None:
            times = times[: len(seq.tokens) + 1]
            tokenizer = self.model.tokenizer
            words = group_words(
                tokenizer, self.eos, seq.tokens, seq.logprobs, times, seq.duration_s
            )
        return WindowResult(
            text,
            seq.language,
            confidence(seq.logprobs),
            float(seq.no_speech_prob),
            words,
            tuple(seq.tokens),
        )

    def _choose(self, seqs: list[DecodeSequence], scores: torch.Tensor) -> None:
        """Greedy pick per row; a row that emits end-of-text or hits its limit finishes."""
        self._record(seqs, *self._pick(scores))

    @staticmethod
    def _pick(scores: torch.Tensor) -> tuple[list[int], list[float]]:
        """Greedy token and its log-probability per row (scores are float32)."""
        tokens = scores.argmax(dim=-1)
        logprobs = torch.log_softmax(scores, dim=-1).gather(1, tokens.unsqueeze(1))[:, 0]
        rows = torch.stack([tokens.double(), logprobs.double()], dim=1).tolist()  # one transfer
        return [int(r[0]) for r in rows], [r[1] for r in rows]

    def _record(self, seqs: list[DecodeSequence], tokens: list[int], logprobs: list[float]) -> None:
        rows = len(seqs)
        for seq, token, logprob in zip(seqs, tokens, logprobs, strict=True):
            seq.most_rows = max(seq.most_rows, rows)
            if seq.finished:  # stepped along with the others: it keeps what it had
                continue
            if token == self.eos:
                seq.finished = True
                continue
            seq.tokens.append(token)
            seq.logprobs.append(logprob)
            if len(seq.tokens) >= seq.max_new_tokens or is_looping(seq.tokens):
                seq.finished = True  # a loop (server.models.runaway) is trimmed in result()
