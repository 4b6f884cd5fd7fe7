"""Triton's own Python client over HTTP (tritonclient.http: KServe v2 REST
with Triton's binary tensor data, classification, repository, statistics
and shared memory extensions) against the real server's REST port."""
import os

import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from test_tritonclient import MODEL, vision_top


@pytest.fixture
def client(server):
    c = httpclient.InferenceServerClient(server["rest"])
    yield c
    c.close()


def io_names(client):
    md = client.get_model_metadata(MODEL)
    return md["inputs"][0]["name"], md["outputs"][0]["name"]


def test_health_metadata_config(client):
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    meta = client.get_server_metadata()
    assert meta["name"] == "visionserve" and "classification" in meta["extensions"]
    md = client.get_model_metadata(MODEL)
    assert md["inputs"][0]["shape"] == [-1, 3, 224, 224] and md["outputs"][0]["shape"] == [-1, 1000]
    cfg = client.get_model_config(MODEL)
    assert cfg["max_batch_size"] == 8 and cfg["input"][0]["dims"] == [3, 224, 224]
    assert cfg["dynamic_batching"]["preferred_batch_size"] == [1, 8]
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("no_such_model")
    assert "not found" in str(e.value)


@pytest.mark.parametrize("binary", [True, False])
def test_infer_fp32(client, binary):
    name, out = io_names(client)
    x = np.random.default_rng(3).standard_normal((1, 3, 224, 224), dtype=np.float32)
    inp = httpclient.InferInput(name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    res = client.infer(MODEL, [inp], outputs=[httpclient.InferRequestedOutput(out, binary_data=binary)])
    logits = res.as_numpy(out)
    assert logits.shape == (1, 1000) and np.isfinite(logits).all()
    # Binary and JSON tensors give the same answer.
    other = httpclient.InferInput(name, list(x.shape), "FP32")
    other.set_data_from_numpy(x, binary_data=not binary)
    again = client.infer(MODEL, [other], outputs=[httpclient.InferRequestedOutput(out, binary_data=not binary)]).as_numpy(out)
    np.testing.assert_allclose(logits, again, rtol=1e-6, atol=1e-6)


def test_infer_jpeg_classification(client, server, photo):
    name, out = io_names(client)
    inp = httpclient.InferInput(name, [1], "BYTES")
    inp.set_data_from_numpy(np.array([open(photo, "rb").read()], dtype=np.object_), binary_data=True)
    res = client.infer(MODEL, [inp], outputs=[httpclient.InferRequestedOutput(out, binary_data=True, class_count=3)])
    top = res.as_numpy(out)
    assert top.shape == (1, 3)
    idx = [int(t.decode().split(":", 2)[1]) for t in top[0]]
    want, _ = vision_top(server, photo, 3)
    assert idx == want


def test_statistics_and_repository(client):
    st = client.get_inference_statistics(MODEL)["model_stats"][0]
    assert st["name"] == MODEL and st["version"] == "1" and "success" in st["inference_stats"]
    index = {m["name"]: m for m in client.get_model_repository_index()}
    assert index[MODEL]["state"] == "READY"
    client.unload_model("resnet50")
    assert not any(m["name"] == "resnet50" and m["state"] == "READY" for m in client.get_model_repository_index())
    client.load_model("resnet50")
    assert client.is_model_ready("resnet50")


def test_system_shared_memory(client):
    name, out = io_names(client)
    x = np.random.default_rng(4).standard_normal((1, 3, 224, 224), dtype=np.float32)
    key_in, key_out = f"/vs_hin_{os.getpid()}", f"/vs_hout_{os.getpid()}"
    h_in = shm.create_shared_memory_region("h_in", key_in, x.nbytes)
    h_out = shm.create_shared_memory_region("h_out", key_out, 4000)
    try:
        shm.set_shared_memory_region(h_in, [x])
        client.register_system_shared_memory("h_in", key_in, x.nbytes)
        client.register_system_shared_memory("h_out", key_out, 4000)
        assert {r["name"] for r in client.get_system_shared_memory_status()} >= {"h_in", "h_out"}
        inp = httpclient.InferInput(name, list(x.shape), "FP32")
        inp.set_shared_memory("h_in", x.nbytes)
        o = httpclient.InferRequestedOutput(out, binary_data=True)
        o.set_shared_memory("h_out", 4000)
        client.infer(MODEL, [inp], outputs=[o])
        got = shm.get_contents_as_numpy(h_out, np.float32, [1, 1000])
        plain = httpclient.InferInput(name, list(x.shape), "FP32")
        plain.set_data_from_numpy(x)
        np.testing.assert_array_equal(got, client.infer(MODEL, [plain]).as_numpy(out))
        client.unregister_system_shared_memory()
        assert client.get_system_shared_memory_status() == []
    finally:
        shm.destroy_shared_memory_region(h_in)
        shm.destroy_shared_memory_region(h_out)
