"""The decode step with static shapes: one function for eager, compiled (CPU) and CUDA graphs.

A step of `BatchedDecoder` used to take its shapes from Python ints (the rows' lengths), so
every token had new shapes: `torch.compile` would recompile at every token and a CUDA graph
could not be captured. Here a step's shapes come from a small set of buckets only:

- the rows are padded to a bucket of `bucket_sizes(max_active)` (1, 2, 4, 8, ... up to
  max_active). Padding rows are free slots past the active ones: they run at position 0 and
  write there, which nothing reads (a joining sequence's prompt pass overwrites it);
- positions are a device tensor, and attention runs over the whole self-attention cache with
  a mask (`key <= position`), so every row has at least one valid key (no NaN);
- the greedy choice runs on the device in the same function: `suppress_tokens`, argmax, the
  chosen token's log-probability (`max - logsumexp`). `begin_suppress_tokens` needs no place
  here: the first generated position is always picked in the prompt pass (`GreedyRuntime.join`).
  Ids and log-probabilities come back as one (rows, 2) float64 tensor: one transfer per step.

`StepRunner` runs it compiled by inductor (CPU; one graph per bucket, compiled at warm-up,
never on a request's time) or captured as one CUDA graph per bucket over fixed input buffers
(the caches never move, so their addresses are fixed too). Eagerly (`--compile off`, or a
bucket not warmed) it runs `BatchedDecoder.step` instead: the same math over exactly the
active rows and filled positions (in blocks of 64 positions where attention runs plain
products: low precision on a CPU, `server.models.shapes`), which keeps one window bit-for-bit
equal to `generate` wherever attention runs SDPA (attention over the whole cache changes fp16
sums on a CPU), with the same pick on the device and the same single transfer back.
`choose_step()` turns the `compile` setting into one of those, with the reason.

Only the model worker thread uses these.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from server.config import COMPILE_MODES
from server.models.attention import attend

if TYPE_CHECKING:
    from server.models.whisper_step import BatchedDecoder

log = logging.getLogger(__name__)

_POWERS = tuple(2**i for i in range(11))  # 1 .. 1024, the bound of max_active


def bucket_sizes(max_active: int) -> list[int]:
    """Row counts a step is padded to: powers of two below max_active, then max_active."""
    return [b for b in _POWERS if b < max_active] + [max_active]


def bucket_for(rows: int, sizes: list[int]) -> int:
    return next(b for b in sizes if b >= rows)


@dataclass(frozen=True)
class StepChoice:
    """How decode steps run: "eager", "inductor" (torch.compile, CPU) or "cuda-graphs"."""

    mode: str
    reason: str

    @property
    def label(self) -> str:
        """For the start-up log and GetServerInfo.decode_step."""
        if self.mode == "inductor":
            return "compiled (inductor)"
        if self.mode == "cuda-graphs":
            return "cuda-graphs"
        return f"eager: {self.reason}"


def choose_step(setting: str, device: torch.device) -> StepChoice:
    """The `compile` setting on this device. `on` insists (warm-up fails without a compiler);
    `auto` falls back to eager, saying why."""
    if setting not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, not {setting!r}")
    if setting == "off":
        return StepChoice("eager", "--compile off")
    if device.type == "cuda":
        return StepChoice("cuda-graphs", f"--compile {setting} on {device}")
    if device.type != "cpu":
        return StepChoice("eager", f"no compiled step on {device.type}")
    if setting == "on":
        return StepChoice("inductor", "--compile on")
    missing = cpp_compiler_problem()
    if missing is not None:
        return StepChoice("eager", missing)
    return StepChoice("inductor", "auto: a C++ compiler is usable")


def cpp_compiler_problem() -> str | None:
    """Why inductor can't build CPU kernels here (None: it can): the compiler it would call is
    missing or can't build a trivial program."""
    try:
        from torch._inductor import config as inductor_config

        compiler = str(inductor_config.cpp.cxx[-1] or "g++")
    except Exception:  # an inductor without that knob: the usual default
        compiler = "g++"
    path = shutil.which(compiler)
    if path is None:
        return f"no C++ compiler ({compiler}) found for torch.compile"
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        src = f"{tmp}/probe.cpp"
        with open(src, "w") as f:
            f.write("int main() { return 0; }\n")
        try:
            subprocess.run(
                [path, src, "-o", f"{tmp}/probe"], check=True, capture_output=True, timeout=60
            )
        except (OSError, subprocess.SubprocessError) as err:
            return f"{compiler} can't build a trivial program ({type(err).__name__})"
    return None


def persist_compiled(cache_dir: str) -> None:
    """Keep inductor's compiled kernels and graphs under the model cache, across restarts
    (unless TORCHINDUCTOR_CACHE_DIR names another place)."""
    import os

    from torch._inductor import config as inductor_config
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # inductor reads its cache location from this variable, and writes its default (under
    # /tmp, gone with the container) there at first use: that one is replaced.
    given = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if given is None or os.path.abspath(given) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cache_dir, "inductor")
    inductor_config.fx_graph_cache = True


class StaticStep:
    """The step as a function of tensors only: slots 0..B-1 take one token each.
    `ids`, `positions`: (B,) int64. Returns (B, 2) float64: chosen id, its log-probability."""

    def __init__(self, decoder: BatchedDecoder, suppress: torch.Tensor) -> None:
        self.d = decoder
        # Added to the logits: 0 where allowed, -inf where `suppress_tokens` forbid.
        self.bias = torch.zeros(suppress.shape, device=decoder.device, dtype=torch.float32)
        self.bias.masked_fill_(suppress, float("-inf"))
        self.keys = torch.arange(decoder.max_positions, device=decoder.device)

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        d = self.d
        rows = ids.shape[0]
        slots = torch.arange(rows, device=ids.device)
        hidden = (
            d.decoder.embed_tokens(ids) + d.decoder.embed_positions.weight[positions]
        ).unsqueeze(1)
        mask = (self.keys.unsqueeze(0) <= positions.unsqueeze(1)).view(rows, 1, 1, -1)
        for i, layer in enumerate(d.decoder.layers):
            attn = layer.self_attn
            residual = hidden
            x = layer.self_attn_layer_norm(hidden)
            q = d._heads(attn.q_proj(x) * attn.scaling)
            self_k, self_v = d.self_k[i], d.self_v[i]
            self_k[slots, :, positions] = d._heads(attn.k_proj(x))[:, :, 0]
            self_v[slots, :, positions] = d._heads(attn.v_proj(x))[:, :, 0]
            out = attend(q, self_k[:rows], self_v[:rows], mask)
            hidden = residual + attn.out_proj(d._merge(out))
            hidden = d._cross_and_mlp(layer, i, hidden, slice(0, rows))
        logits = d.proj_out(d.decoder.layer_norm(hidden))[:, 0].float() + self.bias
        tokens = logits.argmax(dim=-1)
        best = logits.gather(1, tokens.unsqueeze(1))[:, 0]
        logprobs = best - torch.logsumexp(logits, dim=-1)
        return torch.stack([tokens.double(), logprobs.double()], dim=1)


class StepRunner:
    """Runs `StaticStep` for n active rows: pads to the bucket, runs the bucket's compiled
    graph (or CUDA graph) when warmed, else eagerly, and reads ids and log-probabilities back
    in one transfer."""

    def __init__(self, decoder: BatchedDecoder, suppress: torch.Tensor, choice: StepChoice) -> None:
        self.decoder = decoder
        self.choice = choice
        self.sizes = bucket_sizes(decoder.capacity)
        self.step = StaticStep(decoder, suppress)
        self._compiled: dict[int, Any] = {}  # bucket -> compiled function or _Graph
        self._fn: Any = None  # the torch.compile wrapper, shared by the buckets
        self.compile_s = 0.0  # spent warming buckets up (compiling or capturing)

    @property
    def warmed(self) -> list[int]:
        return sorted(self._compiled)

    def run(self, ids: list[int], positions: list[int]) -> tuple[list[int], list[float]]:
        """One token for slots 0..len(ids)-1 (positions: their cache lengths)."""
        n = len(ids)
        bucket = bucket_for(n, self.sizes)
        runner = self._compiled.get(bucket)
        if runner is None:
            out = self.eager(ids)
        else:
            # Outside inference_mode, as at warm-up: an input made under it is another kind
            # of tensor to dynamo's guards, and would recompile the bucket on a request.
            with _no_grad():
                last = self.decoder.max_positions - 1
                pad = bucket - n
                host = torch.tensor(
                    [ids + [0] * pad, [min(p, last) for p in positions] + [0] * pad],
                    dtype=torch.int64,
                    device="cpu",
                )
                if isinstance(runner, _Graph):
                    out = runner.replay(host)
                else:
                    inputs = host.to(self.decoder.device, non_blocking=True)
                    out = runner(inputs[0], inputs[1])
        rows = out[:n].tolist()  # the one transfer back (a sync point)
        return [int(r[0]) for r in rows], [r[1] for r in rows]

    @torch.inference_mode()
    def eager(self, ids: list[int]) -> torch.Tensor:
        """The eager step (`--compile off`, and buckets not warmed): `BatchedDecoder.step` over
        exactly the active rows and filled positions (blocks of them with plain low-precision
        products on a CPU; elsewhere one sequence alone gets bit-for-bit the logits of
        `generate`), the same greedy pick on the device. Returns (n, 2) float64: id,
        log-probability."""
        logits = self.decoder.step(torch.as_tensor(ids, device=self.decoder.device), 0).float()
        scores = logits + self.step.bias  # -inf where suppressed, else unchanged
        tokens = scores.argmax(dim=-1)
        logprobs = torch.log_softmax(scores, dim=-1).gather(1, tokens.unsqueeze(1))[:, 0]
        return torch.stack([tokens.double(), logprobs.double()], dim=1)

    def warm(self, sizes: list[int] | None = None) -> None:
        """Compile (or capture) the step of each bucket, running it on slots 0..bucket-1 at
        position 0: only while no sequence is active (it writes their caches)."""
        if self.choice.mode == "eager":
            return
        for bucket in sizes or self.sizes:
            if bucket in self._compiled:
                continue
            started = time.monotonic()
            self._compiled[bucket] = self._build(bucket)
            took = time.monotonic() - started
            self.compile_s += took
            log.info("decode step for %d rows: %s in %.1f s", bucket, self.choice.label, took)

    def _build(self, bucket: int) -> Any:
        device = self.decoder.device
        with _no_grad():
            zeros = torch.zeros(2, bucket, dtype=torch.int64, device=device)
        if self.choice.mode == "cuda-graphs":
            return _Graph(self.step, zeros)
        if self._fn is None:
            # One graph per bucket (and per runtime in one process): past dynamo's limit on
            # recompiles of one function it would silently run eagerly.
            limit = torch._dynamo.config.recompile_limit
            torch._dynamo.config.recompile_limit = max(limit, 64)
            self._fn = torch.compile(self.step, fullgraph=True, dynamic=False)
        with _no_grad():
            self._fn(zeros[0], zeros[1])  # compiles this bucket's graph
        return self._fn


class _Graph:
    """One CUDA graph of the step for one bucket, over fixed input and output buffers."""

    def __init__(self, step: StaticStep, inputs: torch.Tensor) -> None:
        self.inputs = inputs
        self.host = torch.zeros(inputs.shape, dtype=inputs.dtype, device="cpu").pin_memory()
        stream = torch.cuda.Stream(device=inputs.device)
        stream.wait_stream(torch.cuda.current_stream(inputs.device))
        with torch.cuda.stream(stream), _no_grad():
            for _ in range(2):  # warm the kernels (and their workspaces) before capture
                step(inputs[0], inputs[1])
        torch.cuda.current_stream(inputs.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), _no_grad():
            self.out = step(inputs[0], inputs[1])

    def replay(self, host: torch.Tensor) -> torch.Tensor:
        self.host.copy_(host)
        self.inputs.copy_(self.host, non_blocking=True)
        self.graph.replay()
        return self.out  # read (tolist) before the next replay overwrites it


@contextlib.contextmanager
def _no_grad() -> Any:
    # Not inference_mode: a compiled graph may not mutate tensors made under it (the caches
    # are made and written under no_grad for that reason).
    with torch.inference_mode(False), torch.no_grad():
        yield
