"""Whisper on transformers: the only module that imports torch for inference.

Only the model worker thread calls `run_batch()` and `warmup()` (see `server.app`): one owner
of the accelerator. `prepare()` (log-mel features, numpy only) is thread-safe and runs in
request threads, so feature extraction never queues behind the model.

A batch is decoded in three steps: one encoder pass over all windows; one decoder step at
<|startoftranscript|> for the no-speech probability (cheap, and what Whisper's own silence
check uses); then `generate` from the encoder output, greedy by default. Windows with
different decoding options (language, task, beam, prompt...) are decoded as separate groups.
`run_batch_yielding` does the same, calling back between `generate`'s tokens (the continuous
engine's fallback runs its own decode steps there).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import WhisperForConditionalGeneration, WhisperProcessor
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.modeling_outputs import BaseModelOutput

from server.errors import InvalidArgumentError
from server.models.base import (
    MAX_PROMPT_BYTES,
    DecodeOptions,
    ModelInfo,
    SpeechModel,
    WindowResult,
    WindowTask,
    Word,
)
from server.models.device import (
    choose_dtype,
    cpu_bf16_support,
    device_errors,
    device_name,
    resolve_device,
)
from server.models.runaway import is_looping, trim_loop
from server.models.whisper_align import N_FRAMES, frames_of, group_words
from server.models.whisper_tokens import (
    confidence,
    language_in,
    languages_by_id,
    no_speech_id,
    no_speech_probs,
)

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
MAX_PROMPT_TOKENS = 223  # Whisper's decoder context is 448; the prompt may use half of it
MAX_START_TOKENS = 4  # <|startoftranscript|>, language, task, <|notimestamps|>


class _LoopStop(StoppingCriteria):
    """Stops a row of `generate` whose new tokens end in a loop (see server.models.runaway)."""

    def __init__(self) -> None:
        self.start: int | None = None  # where the new tokens begin (the prompt may repeat)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **_: Any) -> Any:
        if self.start is None:
            self.start = input_ids.shape[1] - 1
        rows = input_ids[:, self.start :].tolist()
        return torch.tensor([is_looping(r) for r in rows], device=input_ids.device)


class _Yield(StoppingCriteria):
    """Never stops `generate`: calls `pause()` after every token (beam step), where the
    continuous engine runs its own decode steps (see `run_batch_yielding`)."""

    def __init__(self, pause: Callable[[], None]) -> None:
        self.pause = pause

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **_: Any) -> Any:
        self.pause()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@dataclass(frozen=True)
class _Decoded:
    tokens: list[int]
    logprobs: list[float]
    times: list[float] | None
    language: str | None


class WhisperModel(SpeechModel):
    supports_continuous = True  # server.models.whisper_step drives its decoder directly

    def __init__(
        self,
        checkpoint: str,
        model_id: str,
        device: str = "auto",
        dtype: str = "auto",
        max_new_tokens: int = 440,
    ) -> None:
        self.device = resolve_device(device)
        precision = choose_dtype(dtype, self.device, cpu_bf16_support())
        self.dtype = precision.dtype
        self.max_new_tokens = max_new_tokens
        self._pause: Callable[[], None] | None = None  # set during run_batch_yielding
        self.processor = WhisperProcessor.from_pretrained(checkpoint)
        model = WhisperForConditionalGeneration.from_pretrained(
            checkpoint, dtype=self.dtype, attn_implementation="sdpa"
        )
        self.model: Any = model.to(self.device).eval()  # type: ignore[arg-type]
        self.tokenizer = self.processor.tokenizer
        gen = self.model.generation_config
        self._lang_by_id = languages_by_id(gen)
        multilingual = bool(getattr(gen, "is_multilingual", False)) and bool(self._lang_by_id)
        self._sot = int(gen.decoder_start_token_id)
        self._eos = int(gen.eos_token_id)
        self._no_speech = no_speech_id(self.tokenizer)
        self.info = ModelInfo(
            model_id=model_id,
            multilingual=multilingual,
            device=str(self.device),
            device_name=device_name(self.device),
            dtype=precision.name,
            languages=tuple(sorted(self._lang_by_id.values())) if multilingual else ("en",),
            dtype_reason=precision.reason,
        )
        log.info(
            "loaded %s on %s in %s (%s)", model_id, self.device, precision.name, precision.reason
        )

    # -- the batch interface ------------------------------------------------------------
    def check_options(self, options: DecodeOptions) -> None:
        if not self.info.multilingual:
            if options.language not in (None, "en"):
                raise InvalidArgumentError(
                    f"model {self.info.model_id} is English-only; language_code "
                    f"{options.language!r} is not supported (leave it empty or use 'en')"
                )
            if options.task == "translate":
                raise InvalidArgumentError(
                    f"model {self.info.model_id} is English-only and cannot translate"
                )
        elif options.language is not None and options.language not in self.info.languages:
            raise InvalidArgumentError(f"language_code {options.language!r} is not supported")
        if len(options.prompt.encode()) > MAX_PROMPT_BYTES:  # before tokenizing it
            raise InvalidArgumentError(f"initial_prompt is longer than {MAX_PROMPT_BYTES} bytes")
        if options.prompt and len(self._prompt_ids(options.prompt)) - 1 > MAX_PROMPT_TOKENS:
            raise InvalidArgumentError(f"initial_prompt is longer than {MAX_PROMPT_TOKENS} tokens")

    def _prompt_ids(self, prompt: str) -> list[int]:
        """<|startofprev|> and the prompt's tokens, as `generate` puts them before the start."""
        return [int(i) for i in self.processor.get_prompt_ids(prompt.strip())]

    def max_new_tokens_for(self, options: DecodeOptions) -> int:
        """The decode budget of a window: the prompt and the start tokens share Whisper's
        448-position context with what is decoded, so a prompted window decodes fewer tokens
        (as Whisper's own decoding does: its prompt takes at most half the context)."""
        if not options.prompt:
            return self.max_new_tokens
        used = len(self._prompt_ids(options.prompt)) + MAX_START_TOKENS
        return max(1, min(self.max_new_tokens, self.model.config.max_target_positions - used))

    def prepare(self, samples: np.ndarray) -> np.ndarray:
        features = self.processor.feature_extractor(
            samples, sampling_rate=SAMPLE_RATE, return_tensors="np"
        ).input_features[0]
        return np.ascontiguousarray(features, dtype=np.float32)

    def run_batch(self, tasks: list[WindowTask]) -> list[WindowResult]:
        with device_errors(self.device, f"a generate batch of {len(tasks)}"):
            return self._run_groups(tasks)

    def run_batch_yielding(
        self, tasks: list[WindowTask], pause: Callable[[], None]
    ) -> list[WindowResult]:
        self._pause = pause
        try:
            return self.run_batch(tasks)
        finally:
            self._pause = None

    def _run_groups(self, tasks: list[WindowTask]) -> list[WindowResult]:
        groups: dict[DecodeOptions, list[int]] = defaultdict(list)
        for i, task in enumerate(tasks):
            # Drafts only help the continuous engine: here they would split the batch.
            groups[dataclasses.replace(task.options, draft=())].append(i)
        results: list[WindowResult | None] = [None] * len(tasks)
        for options, indices in groups.items():
            group = [tasks[i] for i in indices]
            for i, result in zip(indices, self._decode_group(group, options), strict=True):
                results[i] = result
        return [r for r in results if r is not None]

    def warmup(self, batch_sizes: list[int]) -> None:
        silence = self.prepare(np.zeros(SAMPLE_RATE, dtype=np.float32))
        for size in sorted(set(batch_sizes)):
            self.run_batch([WindowTask(silence, 1.0) for _ in range(size)])
            log.info("warmed up at batch size %d", size)

    # -- decoding ------------------------------------------------------------------------
    @torch.inference_mode()
    def _decode_group(self, tasks: list[WindowTask], options: DecodeOptions) -> list[WindowResult]:
        features = torch.from_numpy(np.stack([t.features for t in tasks])).to(
            self.device, self.dtype
        )
        encoded = self.model.get_encoder()(features)
        no_speech = self._no_speech_probs(encoded)
        mask = None
        if options.word_timestamps:
            # The real length of each window, so token times align on audio, not on padding.
            frames = [frames_of(t.duration_s) for t in tasks]
            lengths = torch.as_tensor(frames, device=self.device).unsqueeze(1)
            mask = (torch.arange(N_FRAMES, device=self.device) < lengths).long()
        decoded = self._generate(encoded, options, len(tasks), mask)
        return [
            self._result(d, p, task.duration_s)
            for d, p, task in zip(decoded, no_speech, tasks, strict=True)
        ]

    def _no_speech_probs(self, encoded: BaseModelOutput) -> list[float]:
        hidden = encoded.last_hidden_state
        assert hidden is not None
        batch = hidden.shape[0]
        if self._no_speech is None:
            return [0.0] * batch
        sot = torch.full((batch, 1), self._sot, device=self.device, dtype=torch.long)
        logits = self.model(encoder_outputs=encoded, decoder_input_ids=sot).logits[:, 0]
        return no_speech_probs(logits, self._no_speech)

    def _generate_kwargs(self, options: DecodeOptions) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "return_dict_in_generate": True,
            "output_scores": True,
            "max_new_tokens": self.max_new_tokens_for(options),
            "stopping_criteria": StoppingCriteriaList(
                [_LoopStop(), *([_Yield(self._pause)] if self._pause is not None else [])]
            ),
        }
        if self.info.multilingual:
            kwargs["task"] = options.task
            if options.language is not None:
                kwargs["language"] = options.language
        if options.temperature > 0:
            kwargs.update(do_sample=True, temperature=options.temperature)
        if options.beam_size > 1:
            kwargs["num_beams"] = options.beam_size
        if options.prompt:
            kwargs["prompt_ids"] = torch.as_tensor(
                self._prompt_ids(options.prompt), device=self.device
            )
        if options.word_timestamps:
            kwargs["return_token_timestamps"] = True
        return kwargs

    def _generate(
        self,
        encoded: BaseModelOutput,
        options: DecodeOptions,
        batch: int,
        attention_mask: torch.Tensor | None = None,
    ) -> list[_Decoded]:
        kwargs = self._generate_kwargs(options)
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        out = self.model.generate(encoder_outputs=encoded, **kwargs)
        sequences = out["sequences"].cpu()
        n_new = len(out["scores"])
        prompt_len = sequences.shape[1] - n_new
        new_tokens = sequences[:, prompt_len:]
        logprobs = self._token_logprobs(out, new_tokens)
        times = out.get("token_timestamps") if options.word_timestamps else None
        if times is not None:
            times = times.cpu()
        decoded = []
        for row in range(batch):
            tokens = new_tokens[row].tolist()
            end = tokens.index(self._eos) if self._eos in tokens else len(tokens)
            end = len(trim_loop(tokens[:end]))  # a runaway loop stopped by _LoopStop, once
            row_times = None
            if times is not None:
                row_times = times[row, times.shape[1] - n_new :].float().tolist()[: end + 1]
            decoded.append(
                _Decoded(
                    tokens[:end],
                    logprobs[row][:end],
                    row_times,
                    language_in(sequences[row, :prompt_len].tolist(), self._lang_by_id),
                )
            )
        return decoded

    def _token_logprobs(self, out: Any, new_tokens: torch.Tensor) -> list[list[float]]:
        steps = out["scores"]
        if not steps or steps[0].shape[0] != new_tokens.shape[0]:
            return [[] for _ in range(new_tokens.shape[0])]  # beam search: no per-token scores
        scores = torch.stack([s.float().cpu() for s in steps], dim=1)  # batch, steps, vocab
        logp = torch.log_softmax(scores, dim=-1)
        picked = logp.gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
        return picked.tolist()

    def _result(self, d: _Decoded, no_speech_prob: float, duration_s: float) -> WindowResult:
        text = self.tokenizer.decode(d.tokens, skip_special_tokens=True).strip()
        words = self._words(d, duration_s) if d.times is not None else ()
        language = d.language or ("en" if not self.info.multilingual else "")
        return WindowResult(
            text, language, confidence(d.logprobs), float(no_speech_prob), words, tuple(d.tokens)
        )

    def _words(self, d: _Decoded, duration_s: float) -> tuple[Word, ...]:
        assert d.times is not None
        return group_words(self.tokenizer, self._eos, d.tokens, d.logprobs, d.times, duration_s)
