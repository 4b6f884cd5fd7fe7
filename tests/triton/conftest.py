"""Starts the real infer-server for the Triton client tests.

The server serves the generated mobilenetv3_large and resnet50 models
(models/, written by `make models`) on ort-cpu, with self-tuning off so
that it is ready in seconds, and --model-control-mode explicit so that
load and unload can be tested. bin/infer-server and bin/infer-client come
from `make build`.
"""
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODELS = ("mobilenetv3_large", "resnet50", "yolov8s")
PHOTOS = os.path.join(ROOT, "..", "shared", "testdata", "images")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("models")
    for name in MODELS:
        src = os.path.join(ROOT, "models", name)
        if not os.path.exists(os.path.join(src, "model.onnx")):
            pytest.skip(f"models/{name}/model.onnx missing: run make models")
        dst = repo / name
        dst.mkdir()
        os.symlink(os.path.join(src, "model.onnx"), dst / "model.onnx")
        shutil.copy(os.path.join(src, "labels.txt"), dst / "labels.txt")
        with open(os.path.join(src, "config.yaml")) as f:
            cfg = f.read().replace("auto_tune: true", "auto_tune: false")
        (dst / "config.yaml").write_text(cfg)
    grpc_port, http_port, rest_port = free_port(), free_port(), free_port()
    log = open(tmp_path_factory.mktemp("log") / "server.log", "w+")
    proc = subprocess.Popen(
        [os.path.join(ROOT, "bin", "infer-server"), "--model-repo", str(repo), "--backend", "ort-cpu",
         "--grpc-addr", f"127.0.0.1:{grpc_port}", "--http-addr", f"127.0.0.1:{http_port}",
         "--rest-addr", f"127.0.0.1:{rest_port}",
         "--model-control-mode", "explicit", "--load-model", "*"],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.time() + 120
    while True:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=1).status == 200:
                break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            log.seek(0)
            pytest.fail("infer-server did not become ready:\n" + log.read()[-4000:])
        time.sleep(0.2)
    yield {"grpc": f"127.0.0.1:{grpc_port}", "http": f"127.0.0.1:{http_port}", "rest": f"127.0.0.1:{rest_port}", "repo": str(repo)}
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


@pytest.fixture(scope="session")
def photo():
    path = os.path.join(PHOTOS, "dog.jpg")
    if not os.path.exists(path):
        pytest.skip(f"{path} missing (../shared/testdata)")
    return path
