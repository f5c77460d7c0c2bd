"""SIGTERM: requests in flight get --shutdown-timeout seconds to finish, then are aborted;
either way each client gets a well-formed answer, and the process exits."""
import signal
import threading
import time

import pytest

from tests import test_server as base

openai = pytest.importorskip("openai")


def test_sigterm_finishes_short_requests_and_aborts_long_ones(demo_gguf, tmp_path):
    srv = base.start_server(demo_gguf, tmp_path, "--shutdown-timeout", "3",
                            "--kv-cache-memory", "64MiB")
    try:
        client = srv.client()
        results, errors = {}, []
        streaming = threading.Event()

        def long_stream():
            try:
                chunks = []
                for ch in client.chat.completions.create(
                        model=base.MODEL, messages=base.CHAT, max_tokens=1000, temperature=0,
                        stream=True, extra_body={"ignore_eos": True}):
                    chunks.append(ch)
                    if ch.choices and ch.choices[0].delta.content:
                        streaming.set()
                results["long"] = chunks
            except Exception as exc:  # noqa: BLE001 -- reported by the main thread
                errors.append(exc)

        def short_request():
            try:
                results["short"] = client.completions.create(
                    model=base.MODEL, prompt=base.PROMPT, max_tokens=2, temperature=0,
                    extra_body={"ignore_eos": True})
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=long_stream)]
        threads[0].start()
        deadline = time.monotonic() + 120
        while not streaming.wait(0.1) and not errors and time.monotonic() < deadline:
            pass
        assert streaming.is_set(), errors
        threads.append(threading.Thread(target=short_request))
        threads[1].start()
        deadline = time.monotonic() + 60         # both must be in the engine at the signal
        while time.monotonic() < deadline:
            m = srv.metrics()
            if m["quantrt_num_requests_running"] + m["quantrt_num_requests_waiting"] == 2:
                break
            time.sleep(0.02)
        else:
            pytest.fail("the short request never reached the engine")
        signaled = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert results["short"].choices[0].finish_reason == "length"
        assert results["short"].usage.completion_tokens == 2
        long = results["long"]
        finishes = [ch.choices[0].finish_reason for ch in long if ch.choices]
        assert finishes[-1] == "abort" and not any(finishes[:-1])
        assert len(long) < 1000
        srv.proc.wait(60)
        # Drained after ~3 s, not cut at once and not left to run 1000 tokens.
        assert 2.5 < time.monotonic() - signaled < 45
        # uvicorn re-raises the signal after its clean shutdown: dying of SIGTERM is normal.
        assert srv.proc.returncode in (0, -signal.SIGTERM)
        with open(srv.log) as f:
            log = f.read()
        assert "Traceback" not in log, log
        with pytest.raises(openai.APIConnectionError):
            client.models.list()
    finally:
        base.stop_server(srv)
