"""Drive our server with the vendors' own Python clients (google-cloud-speech,
nvidia-riva-client), in a process of its own: `python vendor_client.py < job.json`.

A separate process because one Python process cannot hold both the vendors' generated
protobuf types and ours (the same full names, e.g. google.cloud.speech.v1.RecognizeRequest,
in one descriptor pool is an error), and because that is how users run them: their code,
unchanged, in their process, our server elsewhere. Nothing here imports the server.

The job is {"api": "google"|"riva", "call": ..., "address": "127.0.0.1:port", "files": [...],
"work": dir}; the answer on stdout is JSON: per file, the texts and what the client saw.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import soundfile as sf

CHUNK_S = 0.1
CONCURRENCY = 4  # unary calls in flight at once, so that the server batches them


def pcm16(path: str) -> tuple[bytes, int]:
    samples, rate = sf.read(path, dtype="int16")
    return samples.astype("<i2").tobytes(), rate


def paced(pcm: bytes, rate: int, pace: float):
    """100 ms chunks, sent at `pace` times real time like a sped-up microphone (0: at once)."""
    step = int(2 * rate * CHUNK_S)
    started = time.monotonic()
    for i in range(0, len(pcm), step):
        if pace:
            time.sleep(max(0.0, started + i / (2 * rate) / pace - time.monotonic()))
        yield pcm[i : i + step]


def google_client(address: str):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import speech
    from google.cloud.speech_v1.services.speech.transports import SpeechGrpcTransport

    # The two lines that change in a user's code: our endpoint on an insecure channel (and no
    # Google credentials).
    channel = grpc.insecure_channel(address)
    transport = SpeechGrpcTransport(channel=channel, credentials=AnonymousCredentials())
    return speech, speech.SpeechClient(transport=transport)


def google_alternatives(results) -> dict:
    return {
        "text": " ".join(r.alternatives[0].transcript for r in results if r.alternatives),
        "language": [r.language_code for r in results],
        "end_s": [r.result_end_time.total_seconds() for r in results],
        "confidence": [r.alternatives[0].confidence for r in results],
        "words": [
            [w.word, w.start_time.total_seconds(), w.end_time.total_seconds(), w.confidence]
            for r in results
            for w in r.alternatives[0].words
        ],
    }


def google_unary(job: dict) -> list[dict]:
    speech, client = google_client(job["address"])
    config = speech.RecognitionConfig(
        encoding=speech.RecognitionConfig.AudioEncoding.FLAC,
        language_code="en-US",
        enable_word_time_offsets=job.get("words", False),
    )

    def one(path: str) -> dict:
        audio = speech.RecognitionAudio(content=Path(path).read_bytes())
        if job["call"] == "longrunning":
            operation = client.long_running_recognize(config=config, audio=audio)
            response = operation.result(timeout=300)
        else:
            response = client.recognize(config=config, audio=audio, timeout=300)
        return google_alternatives(response.results)

    with ThreadPoolExecutor(CONCURRENCY) as pool:  # the client is thread-safe, like a service's
        return list(pool.map(one, job["files"]))


def google_stream(job: dict) -> list[dict]:
    speech, client = google_client(job["address"])
    out = []
    for path in job["files"]:
        pcm, rate = pcm16(path)
        config = speech.StreamingRecognitionConfig(
            config=speech.RecognitionConfig(
                encoding=speech.RecognitionConfig.AudioEncoding.LINEAR16,
                sample_rate_hertz=rate,
                language_code="en-US",
            ),
            interim_results=True,
            single_utterance=job.get("single_utterance", False),
        )
        requests = (
            speech.StreamingRecognizeRequest(audio_content=chunk)
            for chunk in paced(pcm, rate, job.get("pace", 0))
        )
        finals, interims, events = [], [], []
        for response in client.streaming_recognize(config=config, requests=requests, timeout=300):
            events.append(int(response.speech_event_type))
            for r in response.results:
                entry = {
                    "text": r.alternatives[0].transcript,
                    "stability": r.stability,
                    "end_s": r.result_end_time.total_seconds(),
                    "language": r.language_code,
                }
                (finals if r.is_final else interims).append(entry)
        out.append(
            {
                "text": " ".join(f["text"] for f in finals),
                "finals": finals,
                "interims": interims,
                "events": events,
            }
        )
    return out


def google_bad(job: dict) -> list[dict]:
    """Each bad request through the client: the exception class the user would catch."""
    from google.api_core import exceptions

    speech, client = google_client(job["address"])
    Enc = speech.RecognitionConfig.AudioEncoding
    content = Path(job["files"][0]).read_bytes()
    cases = {
        "webm": (speech.RecognitionConfig(encoding=Enc.WEBM_OPUS), {"content": content}),
        "french_on_english_model": (
            speech.RecognitionConfig(encoding=Enc.FLAC, language_code="fr-FR"),
            {"content": content},
        ),
        "gcs_uri": (speech.RecognitionConfig(encoding=Enc.FLAC), {"uri": "gs://bucket/a.flac"}),
        "diarization": (
            speech.RecognitionConfig(
                encoding=Enc.FLAC,
                diarization_config=speech.SpeakerDiarizationConfig(enable_speaker_diarization=True),
            ),
            {"content": content},
        ),
        "not_audio": (speech.RecognitionConfig(encoding=Enc.FLAC), {"content": b"not audio" * 9}),
    }
    out = []
    for name, (config, audio) in cases.items():
        try:
            client.recognize(config=config, audio=speech.RecognitionAudio(**audio), timeout=60)
            out.append({"case": name, "error": None})
        except exceptions.GoogleAPICallError as err:
            out.append({"case": name, "error": type(err).__name__, "message": err.message})
    return out


def riva_service(address: str):
    import riva.client

    # The line that changes in a user's code: our endpoint (no TLS on loopback).
    auth = riva.client.Auth(uri=address, use_ssl=False)
    return riva.client, riva.client.ASRService(auth)


def wav_copy(path: str, work: str) -> Path:
    """Riva's helpers read WAV files (its examples send the WAV bytes, header included)."""
    target = Path(work) / (Path(path).stem + ".wav")
    samples, rate = sf.read(path, dtype="int16")
    sf.write(target, samples, rate, subtype="PCM_16")
    return target


def riva_alternatives(results) -> dict:
    return {
        "text": " ".join(r.alternatives[0].transcript for r in results if r.alternatives),
        "language": [list(r.alternatives[0].language_code) for r in results],
        "audio_processed": [r.audio_processed for r in results],
        "words": [
            [w.word, w.start_time, w.end_time, w.confidence]
            for r in results
            for w in r.alternatives[0].words
        ],
    }


def riva_offline(job: dict) -> list[dict]:
    client, asr = riva_service(job["address"])

    def one(path: str) -> dict:
        wav = wav_copy(path, job["work"])
        config = client.RecognitionConfig(
            encoding=client.AudioEncoding.LINEAR_PCM,
            language_code="en-US",
            max_alternatives=1,
            enable_automatic_punctuation=True,
            enable_word_time_offsets=job.get("words", False),
        )
        client.add_audio_file_specs_to_config(config, wav)
        return riva_alternatives(asr.offline_recognize(wav.read_bytes(), config).results)

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        return list(pool.map(one, job["files"]))


def riva_stream(job: dict) -> list[dict]:
    client, asr = riva_service(job["address"])
    pace = job.get("pace", 0)
    # Riva's own pacing hook (its examples pass riva.client.sleep_audio_length).
    delay = (lambda _chunk, seconds: time.sleep(seconds / pace)) if pace else None
    out = []
    for path in job["files"]:
        wav = wav_copy(path, job["work"])
        config = client.StreamingRecognitionConfig(
            config=client.RecognitionConfig(
                encoding=client.AudioEncoding.LINEAR_PCM,
                language_code="en-US",
                max_alternatives=1,
                enable_automatic_punctuation=True,
            ),
            interim_results=True,
        )
        client.add_audio_file_specs_to_config(config, wav)
        finals, interims = [], []
        with client.AudioChunkFileIterator(wav, 1600, delay) as chunks:
            for response in asr.streaming_response_generator(chunks, config):
                for r in response.results:
                    entry = {
                        "text": r.alternatives[0].transcript,
                        "stability": r.stability,
                        "audio_processed": r.audio_processed,
                    }
                    (finals if r.is_final else interims).append(entry)
        out.append(
            {"text": " ".join(f["text"] for f in finals), "finals": finals, "interims": interims}
        )
    return out


def riva_bad(job: dict) -> list[dict]:
    client, asr = riva_service(job["address"])
    content = Path(job["files"][0]).read_bytes()
    cases = {
        "no_rate_for_raw_pcm": client.RecognitionConfig(encoding=client.AudioEncoding.LINEAR_PCM),
        "unknown_model": client.RecognitionConfig(
            encoding=client.AudioEncoding.FLAC, model="conformer-en-US-asr-offline"
        ),
        "french_on_english_model": client.RecognitionConfig(
            encoding=client.AudioEncoding.FLAC, language_code="fr-FR"
        ),
    }
    out = []
    for name, config in cases.items():
        try:
            asr.offline_recognize(content, config)
            out.append({"case": name, "error": None})
        except grpc.RpcError as err:
            out.append({"case": name, "error": err.code().name, "message": err.details()})
    return out


def riva_config(job: dict) -> list[dict]:
    from riva.client.proto import riva_asr_pb2

    _, asr = riva_service(job["address"])
    response = asr.stub.GetRivaSpeechRecognitionConfig(
        riva_asr_pb2.RivaSpeechRecognitionConfigRequest()
    )
    return [{"model_name": c.model_name, **dict(c.parameters)} for c in response.model_config]


CALLS = {
    ("google", "unary"): google_unary,
    ("google", "longrunning"): google_unary,
    ("google", "stream"): google_stream,
    ("google", "bad"): google_bad,
    ("riva", "unary"): riva_offline,
    ("riva", "stream"): riva_stream,
    ("riva", "bad"): riva_bad,
    ("riva", "config"): riva_config,
}


def main() -> None:
    job = json.load(sys.stdin)
    json.dump(CALLS[job["api"], job["call"]](job), sys.stdout)


if __name__ == "__main__":
    main()
