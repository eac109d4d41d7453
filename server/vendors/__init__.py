"""Drop-in edges for other vendors' speech APIs (Google Cloud Speech v1, NVIDIA Riva ASR).

Each servicer is a thin edge, a sibling of `server.servicer` (asr.v1): it converts the vendor's
messages to the same plain types (`AudioFormat`, `DecodeOptions`, `StreamSettings`) and awaits
the same `SpeechCore.recognize` / `SpeechCore.stream` (`server.speech`), so batching, limits,
the error table, metrics and timing are shared with asr.v1. No edge imports another. Errors
are raised as `server.errors` exceptions.
"""
