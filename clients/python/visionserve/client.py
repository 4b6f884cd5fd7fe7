"""The client: thin dataclasses over the generated gRPC stubs."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable, Iterator, List, Optional, Union

import grpc

from .v1 import vision_pb2, vision_pb2_grpc

ImageLike = Union[str, bytes, "os.PathLike[str]"]


@dataclass(frozen=True)
class Box:
    """A box in original-image pixels: left, top, right, bottom."""
    x1: float
    y1: float
    x2: float
    y2: float


@dataclass(frozen=True)
class Class:
    label: str
    index: int
    score: float


@dataclass(frozen=True)
class Detection:
    label: str
    index: int
    score: float
    box: Box


@dataclass(frozen=True)
class Result:
    """One image's answer."""
    width: int
    height: int
    backend: str
    classes: List[Class] = field(default_factory=list)
    detections: List[Detection] = field(default_factory=list)


@dataclass(frozen=True)
class FrameResult:
    """One video frame's answer; error is set when that frame failed
    (the stream goes on). dropped_frames counts the frames before it that
    a newer one replaced before they were served."""
    frame_id: int
    result: Optional[Result]
    dropped_frames: int
    error: str = ""


def _image(image: ImageLike) -> vision_pb2.Image:
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    else:
        with open(os.fspath(image), "rb") as f:
            data = f.read()
    return vision_pb2.Image(encoded=data)


def _result(r) -> Result:
    return Result(
        width=r.width, height=r.height, backend=r.backend,
        classes=[Class(c.label, c.index, c.score) for c in r.classes],
        detections=[Detection(d.label, d.index, d.score, Box(d.box.x1, d.box.y1, d.box.x2, d.box.y2)) for d in r.detections],
    )


class Client:
    """A connection to a visionserve server's gRPC port.

    token is the bearer token (--auth-token) when the server requires one;
    timeout is the deadline of each call, in seconds.
    """

    def __init__(self, addr: str = "localhost:8001", token: Optional[str] = None, timeout: float = 30.0,
                 max_message_bytes: int = 64 << 20):
        self._channel = grpc.insecure_channel(addr, options=[("grpc.max_receive_message_length", max_message_bytes),
                                                             ("grpc.max_send_message_length", max_message_bytes)])
        self._stub = vision_pb2_grpc.VisionServiceStub(self._channel)
        self._metadata = [("authorization", f"Bearer {token}")] if token else None
        self._timeout = timeout

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def classify_many(self, images: Iterable[ImageLike], model: str, top_k: int = 0) -> List[Result]:
        req = vision_pb2.ClassifyRequest(model=model, images=[_image(i) for i in images],
                                         options=vision_pb2.Options(top_k=top_k))
        resp = self._stub.Classify(req, timeout=self._timeout, metadata=self._metadata)
        return [_result(r) for r in resp.results]

    def classify(self, image: ImageLike, model: str, top_k: int = 0) -> List[Class]:
        """The top classes of one image (the model's default count unless
        top_k is set), best first."""
        return self.classify_many([image], model, top_k)[0].classes

    def detect_many(self, images: Iterable[ImageLike], model: str, confidence: float = 0.0, iou: float = 0.0,
                    max_detections: int = 0) -> List[Result]:
        req = vision_pb2.DetectRequest(model=model, images=[_image(i) for i in images],
                                       options=vision_pb2.Options(confidence=confidence, iou=iou, max_detections=max_detections))
        resp = self._stub.Detect(req, timeout=self._timeout, metadata=self._metadata)
        return [_result(r) for r in resp.results]

    def detect(self, image: ImageLike, model: str, confidence: float = 0.0, iou: float = 0.0,
               max_detections: int = 0) -> List[Detection]:
        """The objects in one image, boxes in its own pixels."""
        return self.detect_many([image], model, confidence, iou, max_detections)[0].detections

    def models(self) -> list:
        """Every model the server knows, as vision_pb2.ModelInfoResponse."""
        return list(self._stub.ListModels(vision_pb2.ListModelsRequest(), timeout=self._timeout,
                                          metadata=self._metadata).models)

    def stream(self, frames: Iterable[ImageLike], model: str, task: str = "detect") -> Iterator[FrameResult]:
        """Sends encoded video frames over one stream and yields their
        answers in order. The server keeps only the newest pending frame:
        a client that sends faster than the model runs gets fewer answers,
        each saying how many frames it replaced."""
        def requests():
            for i, f in enumerate(frames):
                yield vision_pb2.StreamRequest(model=model, frame_id=i, image=_image(f))

        call = self._stub.StreamDetect if task == "detect" else self._stub.StreamClassify
        for resp in call(requests(), metadata=self._metadata):
            err = resp.error.message if resp.HasField("error") else ""
            res = _result(resp.result) if resp.HasField("result") else None
            yield FrameResult(resp.frame_id, res, resp.dropped_frames, err)
