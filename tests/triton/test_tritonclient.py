"""Triton's own Python client (tritonclient.grpc) against the real server."""
import json
import os
import queue
import subprocess

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from conftest import ROOT

MODEL = "mobilenetv3_large"


@pytest.fixture
def client(server):
    c = grpcclient.InferenceServerClient(server["grpc"])
    yield c
    c.close()


def io_names(client):
    md = client.get_model_metadata(MODEL)
    return md.inputs[0].name, md.outputs[0].name, list(md.inputs[0].shape)


def test_health_and_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL)
    meta = client.get_server_metadata()
    assert meta.name == "visionserve"
    for ext in ("classification", "model_repository", "model_configuration", "statistics", "system_shared_memory"):
        assert ext in meta.extensions
    md = client.get_model_metadata(MODEL)
    assert md.inputs[0].datatype == "FP32" and list(md.inputs[0].shape) == [-1, 3, 224, 224]
    assert list(md.outputs[0].shape) == [-1, 1000]


def test_model_config(client):
    cfg = client.get_model_config(MODEL).config
    assert cfg.name == MODEL
    assert cfg.platform == "onnxruntime_onnx"
    assert cfg.max_batch_size == 8
    assert list(cfg.input[0].dims) == [3, 224, 224]
    assert list(cfg.output[0].dims) == [1000]
    assert list(cfg.dynamic_batching.preferred_batch_size) == [1, 8]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 2000
    assert cfg.instance_group[0].count == 1


def vision_top(server, path, k):
    """The vision API's answer, through the project's own client."""
    out = subprocess.run([os.path.join(ROOT, "bin", "infer-client"), "classify", "--addr", server["grpc"],
                          "--model", MODEL, "--json", path], capture_output=True, text=True, check=True).stdout
    classes = json.loads(out.splitlines()[0])["classes"]
    return [c["index"] for c in classes[:k]], [c["label"] for c in classes[:k]]


def test_infer_raw_fp32(client):
    name, out, _ = io_names(client)
    x = np.random.default_rng(1).standard_normal((2, 3, 224, 224), dtype=np.float32)
    inp = grpcclient.InferInput(name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    res = client.infer(MODEL, [inp], outputs=[grpcclient.InferRequestedOutput(out)], request_id="r1")
    logits = res.as_numpy(out)
    assert logits.shape == (2, 1000) and np.isfinite(logits).all()
    # The same request again gives the same logits: the batch is run as sent.
    again = client.infer(MODEL, [inp]).as_numpy(out)
    np.testing.assert_array_equal(logits, again)
    assert res.get_response().id == "r1"


def test_infer_jpeg_bytes_with_classification(client, server, photo):
    name, out, _ = io_names(client)
    data = np.array([open(photo, "rb").read()], dtype=np.object_)
    inp = grpcclient.InferInput(name, [1], "BYTES")
    inp.set_data_from_numpy(data)
    res = client.infer(MODEL, [inp], outputs=[grpcclient.InferRequestedOutput(out, class_count=3)])
    top = res.as_numpy(out)
    assert top.shape == (1, 3)
    parsed = [t.decode().split(":", 2) for t in top[0]]
    idx = [int(p[1]) for p in parsed]
    labels = [p[2] for p in parsed]
    scores = [float(p[0]) for p in parsed]
    assert scores == sorted(scores, reverse=True)
    want_idx, want_labels = vision_top(server, photo, 3)
    assert idx == want_idx and labels == want_labels


def test_statistics(client):
    name, out, _ = io_names(client)
    before = client.get_inference_statistics(MODEL).model_stats[0]
    x = np.zeros((1, 3, 224, 224), dtype=np.float32)
    inp = grpcclient.InferInput(name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    for _ in range(3):
        client.infer(MODEL, [inp])
    st = client.get_inference_statistics(MODEL).model_stats[0]
    assert st.name == MODEL and st.version == "1"
    assert st.inference_stats.success.count == before.inference_stats.success.count + 3
    assert st.inference_count >= before.inference_count + 3
    assert st.execution_count >= before.execution_count + 1
    assert st.last_inference > 0
    assert st.inference_stats.success.ns > 0
    assert sum(b.compute_infer.count for b in st.batch_stats) == st.execution_count
    every = client.get_inference_statistics().model_stats
    assert {s.name for s in every} >= {MODEL}


def test_stream_infer(client):
    name, out, _ = io_names(client)
    results = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        x = np.ones((1, 3, 224, 224), dtype=np.float32)
        good = grpcclient.InferInput(name, list(x.shape), "FP32")
        good.set_data_from_numpy(x)
        bad = grpcclient.InferInput(name, [1, 3, 10, 10], "FP32")
        bad.set_data_from_numpy(np.ones((1, 3, 10, 10), dtype=np.float32))
        client.async_stream_infer(MODEL, [good], request_id="a")
        client.async_stream_infer(MODEL, [bad], request_id="b")
        client.async_stream_infer(MODEL, [good], request_id="c")
        got = [results.get(timeout=30) for _ in range(3)]
    finally:
        client.stop_stream()
    assert got[0][1] is None and got[0][0].get_response().id == "a"
    assert got[0][0].as_numpy(out).shape == (1, 1000)
    assert got[1][0] is None and "FP32 input shape" in str(got[1][1])
    assert got[2][1] is None and got[2][0].get_response().id == "c"


def test_load_and_unload(client):
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index[MODEL].state == "READY" and index["resnet50"].state == "READY"
    client.unload_model("resnet50")
    assert not client.is_model_ready("resnet50") if _known(client, "resnet50") else True
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("resnet50")
    assert "not found" in str(e.value)
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index["resnet50"].state == "UNAVAILABLE" and index["resnet50"].reason == "unloaded"
    client.load_model("resnet50")
    assert client.is_model_ready("resnet50")


def _known(client, name):
    try:
        client.get_model_metadata(name)
        return True
    except InferenceServerException:
        return False


def test_system_shared_memory(client):
    name, out, _ = io_names(client)
    x = np.random.default_rng(2).standard_normal((1, 3, 224, 224), dtype=np.float32)
    in_bytes, out_bytes = x.nbytes, 1000 * 4
    key_in, key_out = f"/vs_in_{os.getpid()}", f"/vs_out_{os.getpid()}"
    h_in = shm.create_shared_memory_region("vs_in", key_in, in_bytes)
    h_out = shm.create_shared_memory_region("vs_out", key_out, out_bytes)
    try:
        shm.set_shared_memory_region(h_in, [x])
        client.register_system_shared_memory("vs_in", key_in, in_bytes)
        client.register_system_shared_memory("vs_out", key_out, out_bytes)
        status = client.get_system_shared_memory_status()
        assert {r.name for r in status.regions.values()} == {"vs_in", "vs_out"}
        inp = grpcclient.InferInput(name, list(x.shape), "FP32")
        inp.set_shared_memory("vs_in", in_bytes)
        o = grpcclient.InferRequestedOutput(out)
        o.set_shared_memory("vs_out", out_bytes)
        res = client.infer(MODEL, [inp], outputs=[o])
        got = shm.get_contents_as_numpy(h_out, np.float32, [1, 1000])
        # The same input sent in the message gives the same logits.
        plain = grpcclient.InferInput(name, list(x.shape), "FP32")
        plain.set_data_from_numpy(x)
        want = client.infer(MODEL, [plain]).as_numpy(out)
        np.testing.assert_array_equal(got, want)
        assert res.get_output(out) is not None
        with pytest.raises(InferenceServerException):
            client.register_system_shared_memory("vs_in", key_in, in_bytes)  # twice
        with pytest.raises(InferenceServerException):
            client.register_system_shared_memory("bad", "/no_such_region_here", 16)
        client.unregister_system_shared_memory()
        assert len(client.get_system_shared_memory_status().regions) == 0
        with pytest.raises(InferenceServerException) as e:
            client.register_cuda_shared_memory("c", b"aGFuZGxl", 0, 16)
        assert "CUDA shared memory is not supported" in str(e.value)
    finally:
        shm.destroy_shared_memory_region(h_in)
        shm.destroy_shared_memory_region(h_out)
