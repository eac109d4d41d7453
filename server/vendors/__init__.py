"""Drop-in edges for other vendors' speech APIs (Google Cloud Speech v1, NVIDIA Riva ASR).

Each servicer is a thin edge like `server.servicer`: it converts the vendor's messages to the
same plain types (`AudioFormat`, `DecodeOptions`, `StreamSettings`) and awaits the same
`SpeechServicer.recognize` / `SpeechServicer.stream`, so batching, limits, the error table,
metrics and timing are shared with asr.v1. Errors are raised as `server.errors` exceptions.
"""
