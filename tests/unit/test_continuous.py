"""The continuous decode engine on a tiny random-weight Whisper (no real weights): greedy tokens
equal `generate`'s, sequences join and leave mid-decode without cross-talk, cancellation frees
a slot at the next step, and the batcher contract (queue bound, deadlines, drain, stop,
fallback, error fan-out). The decode loop is gated with threading events, never timed."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from server.batching.base import BatchStats
from server.batching.continuous import ContinuousEngine, EngineConfig
from server.errors import BatchError, DeadlineExceededError, QueueFullError, UnavailableError
from server.models.base import DecodeOptions, ModelInfo, SpeechModel, WindowResult, WindowTask
from server.models.shapes import padded_length
from server.models.whisper_step import BatchedDecoder, GreedyRuntime

# The tiny model's vocabulary: 0-89 "words", then the special tokens.
EOS, SOT, NO_SPEECH, NO_TIMESTAMPS, EN, FR, TRANSCRIBE, TRANSLATE = range(90, 98)
MELS, FRAMES = 8, 60  # input features of one window: (MELS, FRAMES)


def tiny_whisper(multilingual: bool = False, suppress_eos: bool = False) -> Any:
    """Random weights, scaled so that logits are far apart (no near-ties) and so that
    end-of-text grows likelier with position (sequences of different lengths)."""
    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=100, num_mel_bins=MELS, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_source_positions=FRAMES // 2, max_target_positions=448,
        pad_token_id=99, bos_token_id=EOS, eos_token_id=EOS, decoder_start_token_id=SOT,
        init_std=1.0, suppress_tokens=None, begin_suppress_tokens=None,
    )  # fmt: skip
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():
        eos = model.model.decoder.embed_tokens.weight[EOS]
        positions = model.model.decoder.embed_positions.weight
        positions += 0.05 * torch.arange(448).unsqueeze(1) * eos / eos.norm()
    gen = model.generation_config
    gen.decoder_start_token_id, gen.eos_token_id, gen.pad_token_id = SOT, EOS, EOS
    gen.no_timestamps_token_id = NO_TIMESTAMPS
    gen.suppress_tokens = [3, 7, SOT, NO_SPEECH, EN, FR, TRANSCRIBE, TRANSLATE]
    if suppress_eos:
        gen.suppress_tokens.append(EOS)
    gen.begin_suppress_tokens = [EOS, 5]
    gen.is_multilingual = multilingual
    gen.max_length = 448
    if multilingual:
        gen.lang_to_id = {"<|en|>": EN, "<|fr|>": FR}
        gen.task_to_id = {"transcribe": TRANSCRIBE, "translate": TRANSLATE}
    return model


class FakeTokenizer:
    unk_token_id = -1

    def convert_tokens_to_ids(self, token: str) -> int:
        return {"<|nospeech|>": NO_SPEECH}.get(token, -1)

    def decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(f"w{t}" for t in tokens if not EOS <= t <= TRANSLATE)


class TinyWhisper(SpeechModel):
    """What the engine needs of a WhisperModel: .model, .tokenizer, .info, .max_new_tokens,
    and run_batch (here a stub that records the fallback batches)."""

    def __init__(
        self, multilingual: bool = False, max_new_tokens: int = 40, suppress_eos: bool = False
    ) -> None:
        self.model = tiny_whisper(multilingual, suppress_eos)
        self.tokenizer = FakeTokenizer()
        self.max_new_tokens = max_new_tokens
        languages = ("en", "fr") if multilingual else ("en",)
        self.info = ModelInfo("tiny-random", multilingual, "cpu", "cpu", "float32", languages)
        self.fallback_batches: list[list[WindowTask]] = []

    def prepare(self, samples: np.ndarray) -> np.ndarray:
        return np.resize(samples, (MELS, FRAMES)).astype(np.float32)

    def run_batch(self, tasks: list[WindowTask]) -> list[WindowResult]:
        self.fallback_batches.append(tasks)
        return [WindowResult("fallback", "en") for _ in tasks]


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model's ops are too small to share out; on a busy machine a second intra-op
    thread only adds waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def windows(n: int, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        (rng.standard_normal((MELS, FRAMES)) * (1 + i % 4)).astype(np.float32) for i in range(n)
    ]


@torch.inference_mode()
def reference(model: TinyWhisper, features: np.ndarray, options: DecodeOptions) -> WindowResult:
    """What WhisperModel computes with transformers' generate (greedy) for one window."""
    hf = model.model
    encoded = hf.get_encoder()(torch.from_numpy(features)[None])
    kwargs: dict[str, Any] = {}
    if model.info.multilingual:
        kwargs = {"language": options.language, "task": options.task}
    out = hf.generate(
        encoder_outputs=encoded, max_new_tokens=model.max_new_tokens,
        return_dict_in_generate=True, output_scores=True, **kwargs,
    )  # fmt: skip
    n_new = len(out["scores"])
    tokens = out["sequences"][0, -n_new:].tolist()
    end = tokens.index(EOS) if EOS in tokens else len(tokens)
    logp = torch.log_softmax(torch.stack(out["scores"], 1)[0].float(), -1)
    picked = logp.gather(1, torch.as_tensor(tokens)[:, None])[:end, 0]
    finite = picked[torch.isfinite(picked)]
    sot = torch.tensor([[SOT]])
    logits = hf(encoder_outputs=encoded, decoder_input_ids=sot).logits[0, 0]
    no_speech = float(torch.softmax(logits.float(), -1)[NO_SPEECH])
    confidence = float(finite.mean().exp()) if len(finite) else 0.0
    language = options.language or "en"
    return WindowResult(model.tokenizer.decode(tokens[:end]), language, confidence, no_speech)


def assert_same(got: WindowResult, want: WindowResult) -> None:
    assert got.text == want.text
    assert got.language == want.language
    # float sums differ in a batch (and in the last digits even alone): tokens must not
    assert got.confidence == pytest.approx(want.confidence, abs=1e-4)
    assert got.no_speech_prob == pytest.approx(want.no_speech_prob, abs=1e-4)


def decode_alone(runtime: GreedyRuntime, features: np.ndarray, options: DecodeOptions) -> Any:
    prompt = runtime.prompt(options)
    assert prompt is not None
    (seq,) = runtime.join([features], [prompt], ["alone"])
    while not seq.finished:
        runtime.step()
    runtime.leave([seq])
    return seq


# -- the runtime: greedy equality, join/leave, no cross-talk ---------------------------------
@pytest.mark.parametrize(
    ("multilingual", "options"),
    [(False, DecodeOptions()), (True, DecodeOptions(language="fr", task="translate"))],
)
def test_one_window_alone_gives_the_tokens_of_generate(
    multilingual: bool, options: DecodeOptions
) -> None:
    model = TinyWhisper(multilingual)
    runtime = GreedyRuntime(model, max_active=4)
    lengths = set()
    for features in windows(8):
        seq = decode_alone(runtime, features, options)
        assert_same(runtime.result(seq), reference(model, features, options))
        lengths.add(len(seq.tokens))
    assert len(lengths) > 2  # the tiny model ends its sequences at different lengths


def test_prompts_follow_the_generation_config() -> None:
    english = GreedyRuntime(TinyWhisper(), 1)
    assert english.prompt(DecodeOptions()) == [SOT, NO_TIMESTAMPS]
    multi = GreedyRuntime(TinyWhisper(multilingual=True), 1)
    assert multi.prompt(DecodeOptions(language="en")) == [SOT, EN, TRANSCRIBE, NO_TIMESTAMPS]
    assert multi.prompt(DecodeOptions(language="fr", task="translate")) == [
        SOT, FR, TRANSLATE, NO_TIMESTAMPS,
    ]  # fmt: skip
    # no language: detected when the window joins (tests/unit/test_shared_decode.py)
    assert multi.prompt(DecodeOptions(language=None)) == [SOT, -1, TRANSCRIBE, NO_TIMESTAMPS]
    for unsupported in (
        DecodeOptions(language="en", beam_size=2),
        DecodeOptions(language="en", temperature=0.4),
        DecodeOptions(language="en", prompt="hello"),
        DecodeOptions(language="en", word_timestamps=True),
    ):
        assert multi.prompt(unsupported) is None


def test_drafts_are_verified_so_any_draft_gives_the_plain_greedy_transcript() -> None:
    """A draft the model agrees with is taken in the prefill pass (fewer steps); a wrong or
    too long one is cut at the first token greedy decoding would not choose. Drafts of
    different lengths join in one encoder pass."""
    model = TinyWhisper()
    runtime = GreedyRuntime(model, max_active=8)
    feats = windows(6, seed=3)
    alone = [decode_alone(runtime, f, DecodeOptions()) for f in feats]
    assert all(len(seq.tokens) >= 3 for seq in alone)
    drafts = [
        alone[0].tokens[:2],  # right
        alone[1].tokens,  # right, the whole transcript
        [*alone[2].tokens, 11, 12],  # right, then words the audio doesn't have
        [alone[3].tokens[0], (alone[3].tokens[1] + 1) % 90, 4],  # wrong from the second token
        [],  # none
        [(alone[5].tokens[0] + 1) % 90],  # wrong from the start
    ]
    options = [DecodeOptions(draft=tuple(d)) for d in drafts]
    assert [runtime.draft(o) for o in options] == drafts
    prompt = runtime.prompt(DecodeOptions())
    assert prompt is not None
    seqs = runtime.join(feats, [prompt] * len(feats), list(range(len(feats))), drafts)
    assert [s.owner for s in seqs] == list(range(len(feats)))  # input order, whatever the slots
    after_join = [len(s.tokens) for s in seqs]
    while not all(s.finished for s in seqs):
        runtime.step()
    for seq, want in zip(seqs, alone, strict=True):
        assert seq.tokens == want.tokens
        assert_same(runtime.result(seq), runtime.result(want))
    # tokens known after the join: the agreed draft plus the model's next choice
    assert after_join[0] == 3 and after_join[4] == 1 and after_join[5] == 1
    assert after_join[3] == 2


def test_prefill_lengths_are_a_few_buckets_whatever_the_draft_lengths() -> None:
    """Every new matrix shape makes the CPU kernels build and keep one more kernel (memory that
    grew with the variety of draft lengths in the soak): prefills run at a handful of padded
    lengths, and the padding changes no token."""
    assert [padded_length(t, 448) for t in (1, 4, 5, 8, 9, 100, 228, 300)] == [
        1, 4, 8, 8, 16, 128, 256, 448,
    ]  # fmt: skip
    model = TinyWhisper(suppress_eos=True)
    runtime = GreedyRuntime(model, max_active=4)
    feats = windows(1, seed=5)
    full = decode_alone(runtime, feats[0], DecodeOptions()).tokens  # 40 tokens, no end
    prompt = runtime.prompt(DecodeOptions())
    assert prompt is not None
    shapes: list[tuple[int, ...]] = []
    prefill = runtime.decoder.prefill

    def spy(first: int, ids: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(ids.shape))
        return prefill(first, ids)

    runtime.decoder.prefill = spy  # type: ignore[method-assign]
    for cut in range(1, len(full) + 1):  # drafts of every length, half of them wrong at the end
        draft = full[:cut] if cut % 2 else [*full[: cut - 1], (full[cut - 1] + 1) % 90]
        (seq,) = runtime.join(feats, [prompt], ["draft"], [draft])
        while not seq.finished:
            runtime.step()
        runtime.leave([seq])
        assert seq.tokens == full
    assert {t for _, t in shapes} == {3, 4, 8, 16, 32, 64}  # 2-token prompt + 1..40 drafted


def test_sequences_joining_and_leaving_mid_decode_match_running_alone() -> None:
    model = TinyWhisper()
    solo = GreedyRuntime(model, 1)
    feats = windows(9, seed=7)
    want = [decode_alone(solo, f, DecodeOptions()).tokens for f in feats]
    runtime = GreedyRuntime(model, max_active=4)
    prompt = [SOT, NO_TIMESTAMPS]
    arrivals = {0: [0, 1], 2: [2], 3: [3, 4], 9: [5, 6, 7, 8]}  # step -> windows joining
    waiting: list[int] = []
    got: dict[int, list[int]] = {}
    step = 0
    while len(got) < len(feats):
        waiting += arrivals.get(step, [])
        free = runtime.max_active - len(runtime.active)
        joining, waiting = waiting[:free], waiting[free:]
        if joining:
            runtime.join([feats[i] for i in joining], [prompt] * len(joining), joining)
        done = [s for s in runtime.active if s.finished]
        if runtime.active and not done:
            runtime.step()
            done = [s for s in runtime.active if s.finished]
        got.update({s.owner: s.tokens for s in done})
        runtime.leave(done)  # the last rows move into the freed slots
        step += 1
    assert [got[i] for i in range(len(feats))] == want


def test_ragged_rows_give_each_row_its_own_logits() -> None:
    """One step over rows of different lengths equals each row stepped alone."""
    hf = tiny_whisper()
    feats = torch.from_numpy(np.stack(windows(3, seed=3)))
    with torch.inference_mode():
        encoded = hf.get_encoder()(feats).last_hidden_state
    prompts = [[SOT, NO_TIMESTAMPS], [SOT, NO_TIMESTAMPS, 11, 12, 13], [SOT, NO_TIMESTAMPS, 20]]
    together = BatchedDecoder(hf, capacity=3, max_positions=16)
    together.load_cross(0, encoded)
    alone = []
    for row, prompt in enumerate(prompts):
        together.prefill(row, torch.tensor([prompt]))  # rows of 2, 5 and 3 tokens
        single = BatchedDecoder(hf, capacity=1, max_positions=16)
        single.load_cross(0, encoded[row : row + 1])
        single.prefill(0, torch.tensor([prompt]))
        alone.append(single.step(torch.tensor([42]))[0])
        single.advance(1)
    batched = together.step(torch.tensor([42, 42, 42]))
    # The same step again, in pieces (as after an out-of-memory error): same logits, since
    # lengths only move at advance().
    pieces = torch.cat(
        [together.step(torch.tensor([42]), 0), together.step(torch.tensor([42, 42]), 1)]
    )
    together.advance(3)
    assert together.lengths[:3] == [3, 6, 4]
    for row in range(3):
        torch.testing.assert_close(batched[row], alone[row], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(pieces[row], batched[row], rtol=1e-4, atol=1e-3)


# -- the engine: the batcher contract ----------------------------------------------------------
@pytest.fixture
def worker():
    pool = ThreadPoolExecutor(1, thread_name_prefix="model-worker")
    yield pool
    pool.shutdown(wait=False, cancel_futures=True)


def make(model: TinyWhisper, worker: ThreadPoolExecutor, **config: Any) -> ContinuousEngine:
    engine = ContinuousEngine(model, worker, EngineConfig(**config))
    engine.start()
    return engine


def task(features: np.ndarray, options: DecodeOptions | None = None) -> WindowTask:
    return WindowTask(features, 1.0, options or DecodeOptions())


class StepGate:
    """Wraps the runtime's step: records its thread, and can hold the first step at a gate."""

    def __init__(self, engine: ContinuousEngine, hold: bool = False) -> None:
        self.entered = threading.Event()
        self.gate = threading.Event()
        if not hold:
            self.gate.set()
        self.threads: set[str] = set()
        self.fail_next = False
        self.steps = 0
        self.fifty = threading.Event()  # set at the 50th step
        self._step = engine.runtime.step
        engine.runtime.step = self  # type: ignore[method-assign]

    def __call__(self, max_rows: int | None = None) -> None:
        self.threads.add(threading.current_thread().name)
        self.entered.set()
        self.steps += 1
        if self.steps == 50:
            self.fifty.set()
        assert self.gate.wait(10)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("injected")
        self._step(max_rows)


async def test_submit_many_gives_one_result_per_window_in_order(worker) -> None:
    model = TinyWhisper()
    feats = windows(6, seed=11)
    stats: list[BatchStats] = []
    engine = ContinuousEngine(model, worker, EngineConfig(max_active=4, max_batch_size=3))
    engine.on_batch = stats.append
    engine.start()
    steps = StepGate(engine)
    results = await asyncio.wait_for(engine.submit_many([task(f) for f in feats]), 30)
    assert len(results) == len(feats)
    for got, features in zip(results, feats, strict=True):
        assert_same(got.value, reference(model, features, DecodeOptions()))
        assert got.batch_size >= 1 and got.infer_s >= 0 and got.queue_s >= 0
    assert steps.threads == {"model-worker_0"}  # the decode loop runs on the given worker
    await asyncio.sleep(0)  # on_batch is called on the loop, after the results
    assert sum(s.size for s in stats) == 6 and max(s.size for s in stats) <= 3
    s = engine.stats()
    assert (s.encoder_windows, s.sequences_finished, s.active, s.pending) == (6, 6, 0, 0)
    assert s.tokens_generated == s.step_rows + 6
    await engine.stop()


async def test_windows_arriving_mid_decode_get_their_own_results(worker) -> None:
    model = TinyWhisper()
    feats = windows(8, seed=5)
    engine = make(model, worker, max_active=8, max_batch_size=2)
    steps = StepGate(engine, hold=True)
    first = asyncio.ensure_future(engine.submit_many([task(f) for f in feats[:2]]))
    assert await asyncio.to_thread(steps.entered.wait, 10)  # two sequences are decoding
    later = [asyncio.ensure_future(engine.submit(task(f))) for f in feats[2:]]
    await asyncio.sleep(0)
    steps.gate.set()
    results = [r.value for r in await asyncio.wait_for(first, 30)]
    results += [r.value for r in await asyncio.wait_for(asyncio.gather(*later), 30)]
    for got, features in zip(results, feats, strict=True):
        assert_same(got, reference(model, features, DecodeOptions()))
    await engine.stop()


async def test_a_cancelled_window_frees_its_slot_at_the_next_step(worker) -> None:
    model = TinyWhisper(max_new_tokens=400, suppress_eos=True)  # every sequence runs 400 tokens
    a, b = windows(2, seed=9)
    engine = make(model, worker, max_active=1)
    steps = StepGate(engine, hold=True)
    first = asyncio.ensure_future(engine.submit(task(a)))
    assert await asyncio.to_thread(steps.entered.wait, 10)  # a holds the only slot, mid-step
    first.cancel()
    await asyncio.wait([first])
    second = asyncio.ensure_future(engine.submit(task(b)))
    steps.gate.set()
    result = await asyncio.wait_for(second, 30)
    assert len(result.value.text.split()) == 400
    # a took one step; b took its 399 (its first token comes with its prompt): a did not
    # keep decoding after it was cancelled.
    assert engine.stats().decode_steps == 1 + 399
    await engine.stop()


async def test_queue_full_is_all_or_nothing(worker) -> None:
    engine = ContinuousEngine(TinyWhisper(), worker, EngineConfig(max_queue_size=3))  # not started
    feats = windows(3)
    engine.enqueue([task(feats[0]), task(feats[1])])
    with pytest.raises(QueueFullError):
        engine.enqueue([task(feats[0]), task(feats[2])])
    assert engine.depth == 2 and engine.in_flight == 2
    await engine.stop()


async def test_an_expired_deadline_is_dropped_before_encoding(worker) -> None:
    engine = make(TinyWhisper(), worker)
    with pytest.raises(DeadlineExceededError):
        await asyncio.wait_for(engine.submit(task(windows(1)[0]), time.monotonic() - 1), 10)
    assert engine.stats().encoder_windows == 0
    await engine.stop()


async def test_drain_finishes_the_work_then_refuses_new(worker) -> None:
    model = TinyWhisper()
    engine = make(model, worker)
    futures = engine.enqueue([task(f) for f in windows(3)])
    assert await engine.drain(30)
    assert all(f.done() and f.exception() is None for f in futures)
    assert engine.in_flight == 0
    with pytest.raises(UnavailableError):
        engine.enqueue([task(windows(1)[0])])
    await engine.stop()


async def test_stop_fails_what_is_queued(worker) -> None:
    engine = ContinuousEngine(TinyWhisper(), worker, EngineConfig())  # never started
    futures = engine.enqueue([task(f) for f in windows(2)])
    await engine.stop()
    for future in futures:
        with pytest.raises(UnavailableError):
            future.result()


async def test_options_it_does_not_cover_go_through_run_batch(worker) -> None:
    model = TinyWhisper(multilingual=True)
    feats = windows(3, seed=2)
    greedy = DecodeOptions(language="fr")
    engine = make(model, worker)
    results = await asyncio.wait_for(
        engine.submit_many([
            task(feats[0], greedy),
            task(feats[1], DecodeOptions(language="fr", beam_size=3)),
            task(feats[2], DecodeOptions(language="fr", prompt="hello")),
        ]),
        30,
    )  # fmt: skip
    assert_same(results[0].value, reference(model, feats[0], greedy))
    assert [r.value.text for r in results[1:]] == ["fallback", "fallback"]
    assert [len(b) for b in model.fallback_batches] == [2]
    assert engine.stats().fallback_windows == 2
    await engine.stop()


async def test_a_failing_step_fails_its_sequences_and_the_engine_goes_on(worker) -> None:
    model = TinyWhisper()
    a, b = windows(2, seed=4)
    engine = make(model, worker)
    steps = StepGate(engine)
    steps.fail_next = True
    with pytest.raises(BatchError):
        await asyncio.wait_for(engine.submit(task(a)), 30)
    result = await asyncio.wait_for(engine.submit(task(b)), 30)
    assert_same(result.value, reference(model, b, DecodeOptions()))
    assert engine.in_flight == 0
    await engine.stop()


async def test_background_windows_join_after_urgent_ones(worker) -> None:
    engine = ContinuousEngine(TinyWhisper(), worker, EngineConfig(max_active=1))
    interim, final = windows(2)
    later = engine.enqueue([task(interim)], background=True)[0]
    first = engine.enqueue([task(final)])[0]
    engine.start()
    done = await asyncio.wait_for(asyncio.gather(first, later), 30)
    assert done[0].batch_id < done[1].batch_id
    await engine.stop()


async def test_an_interim_does_not_join_while_urgent_windows_decode(worker) -> None:
    """An interim arriving mid-decode waits (its encoder pass would hold the final up);
    an urgent window arriving at the same time joins at once."""
    engine = make(TinyWhisper(suppress_eos=True), worker, max_active=4)
    a, b, c = windows(3)
    steps = StepGate(engine, hold=True)
    first = asyncio.ensure_future(engine.submit(task(a)))
    assert await asyncio.to_thread(steps.entered.wait, 10)  # a is decoding, held mid-step
    interim = engine.enqueue([task(b)], background=True)[0]
    urgent = engine.enqueue([task(c)])[0]
    steps.gate.set()
    done = await asyncio.wait_for(asyncio.gather(first, urgent, interim), 30)
    assert [r.batch_size for r in done] == [2, 2, 1]  # a and c together; the interim alone
    assert done[2].batch_id > done[1].batch_id
    await engine.stop()


async def hold(worker: ThreadPoolExecutor) -> threading.Event:
    """Occupy the model worker until the returned event is set (windows enqueued meanwhile
    are all waiting when the decode loop next looks)."""
    entered, release = threading.Event(), threading.Event()
    worker.submit(lambda: (entered.set(), release.wait(30)))
    assert await asyncio.to_thread(entered.wait, 10)
    return release


async def test_an_urgent_window_never_shares_its_encoder_pass_with_interims(worker) -> None:
    """Interims queued before a final: the final's encoder pass is its own (an interim's pass
    in the same batch would delay the final), and the interims join after it."""
    engine = make(TinyWhisper(), worker, max_active=8)
    release = await hold(worker)  # both queued before the decode loop looks
    interims = engine.enqueue([task(w) for w in windows(3)], background=True)
    (final,) = engine.enqueue([task(windows(1, seed=9)[0])])
    release.set()
    first, *rest = await asyncio.wait_for(asyncio.gather(final, *interims), 30)
    assert all(r.batch_id != first.batch_id for r in rest)
    assert all(r.batch_id > first.batch_id for r in rest)
    await engine.stop()


@pytest.mark.parametrize(("pass_s", "passes"), [(0.0, 4), (60.0, 1)])
async def test_interims_join_in_encoder_passes_of_a_bounded_time(
    worker, monkeypatch: pytest.MonkeyPatch, pass_s: float, passes: int
) -> None:
    """Background windows join as many per pass as fit BACKGROUND_PASS_S at the measured
    encoder time per window: one at a time when a pass of one already takes longer (a CPU),
    max_batch_size when windows are cheap (a GPU)."""
    import server.batching.continuous as continuous

    monkeypatch.setattr(continuous, "BACKGROUND_PASS_S", pass_s)
    engine = make(TinyWhisper(), worker, max_active=8)
    await asyncio.wait_for(engine.submit(task(windows(1, seed=9)[0])), 30)  # measures a pass
    release = await hold(worker)
    interims = engine.enqueue([task(w) for w in windows(4)], background=True)
    release.set()
    done = await asyncio.wait_for(asyncio.gather(*interims), 30)
    assert len({r.batch_id for r in done}) == passes
    await engine.stop()


async def test_warmup_decodes_through_the_engine_and_leaves_it_idle(worker) -> None:
    engine = make(TinyWhisper(), worker, max_active=4)
    await asyncio.wait_for(engine.warmup([1, 3]), 30)
    s = engine.stats()
    assert (s.encoder_windows, s.sequences_finished, s.active, engine.in_flight) == (4, 4, 0, 0)
    await engine.stop()


def test_config_is_validated() -> None:
    for bad in ({"max_active": 0}, {"max_batch_size": 0}, {"max_queue_size": 0},
                {"max_join_share": 0}):  # fmt: skip
        with pytest.raises(ValueError):
            EngineConfig(**bad)


async def test_new_windows_wait_while_a_decoding_sequence_is_held_up_too_long(worker) -> None:
    """The tail guard: a sequence that has spent more than max_join_share of its decoding
    time in other windows' encoder passes gets steps before anyone else joins."""
    import time as clock

    from server.batching.continuous import _Request
    from server.models.whisper_step import DecodeSequence

    engine = ContinuousEngine(TinyWhisper(), worker, EngineConfig(max_join_share=0.5))
    loop = asyncio.get_running_loop()
    now = clock.monotonic()
    owner = _Request(task(windows(1)[0]), loop.create_future(), now - 2.0, decoding=now - 1.0)
    engine.runtime.active = [DecodeSequence(owner, [SOT], 10, "en")]
    engine.enqueue([task(windows(1)[0])])  # not started: nothing runs it
    owner.held_s = 0.4  # held 40% of its decoding time: a new window may join
    assert engine._join_now(free=15, now=now)
    owner.held_s = 0.6  # 60%: it decodes first
    assert not engine._join_now(free=15, now=now)
    engine.runtime.active = []
    await engine.stop()


async def test_the_timing_split_adds_up_and_charges_others_encoder_passes_as_held(worker) -> None:
    """Two windows decode; six more join mid-decode, each join pass made 50 ms slower: the
    first two are charged those passes as held-up time (not decode), every window's own pass
    is its encode time, and queue + encode + decode + held is the time the caller waited."""
    model = TinyWhisper()
    feats = windows(8, seed=5)
    engine = make(model, worker, max_active=8, max_batch_size=2)
    steps = StepGate(engine, hold=True)
    join = engine.runtime.join

    def slow_join(*args: Any) -> Any:
        time.sleep(0.05)  # the cost of an encoder pass, made big enough to measure
        return join(*args)

    engine.runtime.join = slow_join  # type: ignore[method-assign,assignment]
    started = time.monotonic()
    first = asyncio.ensure_future(engine.submit_many([task(f) for f in feats[:2]]))
    assert await asyncio.to_thread(steps.entered.wait, 10)  # two sequences are decoding
    later = [asyncio.ensure_future(engine.submit(task(f))) for f in feats[2:]]
    await asyncio.sleep(0)
    steps.gate.set()
    early = await asyncio.wait_for(first, 30)
    waited = time.monotonic() - started
    rest = await asyncio.wait_for(asyncio.gather(*later), 30)
    for r in [*early, *rest]:
        assert r.encode_s is not None and r.encode_s >= 0.05  # its own join pass
        parts = r.queue_s + r.encode_s + r.decode_s + r.held_s
        assert parts == pytest.approx(r.queue_s + r.infer_s)
        assert r.decode_s > 0 and r.held_s >= 0
    assert all(r.held_s >= 0.05 for r in early)  # held up by at least one later join pass
    assert max(r.queue_s + r.infer_s for r in early) == pytest.approx(waited, abs=0.25)
    await engine.stop()
