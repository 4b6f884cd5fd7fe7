"""The project's own Python client (pip install ./clients/python) against
the real server."""
import json
import os
import subprocess

import grpc
import pytest
from visionserve import Box, Client, Detection

from conftest import PHOTOS, ROOT


@pytest.fixture
def vs(server):
    with Client(server["grpc"]) as c:
        yield c


def infer_client_json(server, task, model, path):
    out = subprocess.run([os.path.join(ROOT, "bin", "infer-client"), task, "--addr", server["grpc"], "--model", model,
                          "--json", path], capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[0])


def test_classify_matches_the_go_client(vs, server, photo):
    got = vs.classify(photo, model="mobilenetv3_large")
    want = infer_client_json(server, "classify", "mobilenetv3_large", photo)["classes"]
    assert [(c.index, c.label) for c in got] == [(c["index"], c["label"]) for c in want]
    assert abs(got[0].score - want[0]["score"]) < 1e-6
    # bytes work as well as a path
    assert vs.classify(open(photo, "rb").read(), model="mobilenetv3_large", top_k=2) == got[:2]


def test_detect_boxes_in_original_pixels(vs, server):
    bus = os.path.join(PHOTOS, "bus.jpg")
    if not os.path.exists(bus):
        pytest.skip("bus.jpg missing")
    dets = vs.detect(bus, model="yolov8s", confidence=0.01)
    want = infer_client_json(server, "detect", "yolov8s", bus)
    res = vs.detect_many([bus], model="yolov8s")[0]
    assert (res.width, res.height) == (810, 1080)
    assert all(isinstance(d, Detection) and isinstance(d.box, Box) for d in dets)
    assert all(0 <= d.box.x1 <= d.box.x2 <= 810 and 0 <= d.box.y1 <= d.box.y2 <= 1080 for d in dets)
    assert [(d.index, round(d.score, 5)) for d in res.detections] == [(d["index"], round(d["score"], 5)) for d in want.get("detections", [])]


def test_stream(vs, photo):
    frame = open(photo, "rb").read()
    got = list(vs.stream([frame, b"not an image", frame], model="mobilenetv3_large", task="classify"))
    served = [g for g in got if not g.error]
    assert served and all(g.result.classes for g in served)
    assert all(g.dropped_frames >= 0 for g in got)
    assert sum(1 for g in got if g.error) <= 1
    assert sum(g.dropped_frames for g in got) + len(got) == 3


def test_errors_are_grpc_statuses(vs, photo):
    with pytest.raises(grpc.RpcError) as e:
        vs.classify(photo, model="no_such_model")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        vs.classify(b"\xff\xd8 not a jpeg", model="mobilenetv3_large")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert {m.name for m in vs.models()} >= {"mobilenetv3_large", "resnet50", "yolov8s"}
