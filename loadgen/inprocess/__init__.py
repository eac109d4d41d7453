"""In-process measurements: the model loaded here (torch, transformers), measured as plain
`generate` and through a real gRPC server on loopback (`server.embedded`), side by side.

    measure.py    the runners every command shares: in-process generate, a server driven by N
                  clients, real-time streams; one Row type; warm-up per shape before timing
    study.py      `loadgen study` (+ `study compare`): models x batch sizes, cost per host
    engines.py    `loadgen engines`: the continuous engine against the generate engine
    precision.py  `loadgen precision`: float32 against bfloat16
    languages.py  `loadgen languages`: language detection on other languages' speech
    decode_bench.py  `loadgen decode`: the decode step, eager against compiled
    finals.py     `loadgen finals`: stream finals against unary transcripts of the same files

Imported only by the in-process commands of `python -m loadgen` (and tests): nothing else in
`loadgen` pays for torch.
"""
