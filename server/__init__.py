"""whisper-grpc: Whisper speech recognition served over gRPC with server-side micro-batching."""

__version__ = "0.1.0"
