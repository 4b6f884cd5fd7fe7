#!/usr/bin/env python3
"""Writes independent torch exports of torchvision ResNet-50 and
MobileNetV3-Large into OUT (seeded random weights, eval mode, dynamic
batch), exactly as torch.onnx.export writes them: the OpenCV rewrite
tests run on these. Needs torch and torchvision (Debian's python3-torch
and python3-torchvision 1.13, or PyPI's). Usage: torch-exports.py OUT"""
import os
import sys

import torch
import torchvision

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
for name, build in [("resnet50", torchvision.models.resnet50), ("mobilenetv3_large", torchvision.models.mobilenet_v3_large)]:
    path = os.path.join(out, name + ".onnx")
    if os.path.exists(path):
        continue
    torch.manual_seed(0)
    net = build(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    torch.onnx.export(net, x, path + ".tmp", input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, opset_version=13)
    os.replace(path + ".tmp", path)
    print(path, "torch", torch.__version__, "torchvision", torchvision.__version__)
