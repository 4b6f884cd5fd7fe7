"""Python client of the visionserve vision API.

    from visionserve import Client
    with Client("localhost:8001") as c:
        for d in c.detect("bus.jpg", model="yolov8s"):
            print(d.label, d.score, d.box)

Boxes are in the original image's pixels. Errors are grpc.RpcError with
the server's status code and reason.
"""
from .client import Box, Class, Client, Detection, FrameResult, Result

__all__ = ["Box", "Class", "Client", "Detection", "FrameResult", "Result"]
