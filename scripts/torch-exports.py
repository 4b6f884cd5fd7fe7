#!/usr/bin/env python3
"""Writes independent torch exports into OUT, exactly as torch.onnx.export
writes them (seeded random weights, eval mode): torchvision ResNet-50 and
MobileNetV3-Large (dynamic batch), and a YOLOv8s written here in
Ultralytics' layout (its module structure and its Detect head's export
path: DFL, dist2bbox, sigmoid classes, output [N,84,8400]; batch 1, as
Ultralytics exports by default) with Ultralytics-style metadata_props.
The OpenCV rewrite tests run on these. Needs torch and torchvision
(Debian's python3-torch and python3-torchvision 1.13, or PyPI's).
Usage: torch-exports.py OUT"""
import os
import sys

import torch
import torchvision
from torch import nn


class Conv(nn.Module):
    def __init__(self, c1, c2, k=1, s=1):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c, shortcut):
        super().__init__()
        self.cv1, self.cv2, self.add = Conv(c, c, 3), Conv(c, c, 3), shortcut

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    def __init__(self, c1, c2, n, shortcut):
        super().__init__()
        self.c = c2 // 2
        self.cv1 = Conv(c1, 2 * self.c)
        self.cv2 = Conv((2 + n) * self.c, c2)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    chunk = False  # C2f.forward as Ultralytics trains with it

    def forward(self, x):
        # forward_split, which Ultralytics' exporter swaps in for ONNX: a
        # static Split. C2f.chunk = True exports chunk, that is, shape
        # arithmetic (Shape, Gather, Add, Div, Mul, Slice).
        if C2f.chunk:
            y = list(self.cv1(x).chunk(2, 1))
        else:
            y = list(self.cv1(x).split((self.c, self.c), 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, c1, c2):
        super().__init__()
        self.cv1, self.cv2 = Conv(c1, c1 // 2), Conv(c1 * 2, c2)
        self.m = nn.MaxPool2d(5, 1, 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class DFL(nn.Module):
    def __init__(self, c1=16):
        super().__init__()
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        self.conv.weight.data[:] = torch.arange(c1, dtype=torch.float).view(1, c1, 1, 1)
        self.c1 = c1

    def forward(self, x):
        b, _, a = x.shape
        return self.conv(x.view(b, 4, self.c1, a).transpose(2, 1).softmax(1)).view(b, 4, a)


class Detect(nn.Module):
    def __init__(self, nc, ch, strides=(8, 16, 32)):
        super().__init__()
        self.nc, self.reg_max = nc, 16
        self.no = nc + self.reg_max * 4
        self.stride = torch.tensor(strides, dtype=torch.float)
        c2, c3 = max(16, ch[0] // 4, self.reg_max * 4), max(ch[0], min(nc, 100))
        self.cv2 = nn.ModuleList(nn.Sequential(Conv(x, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * self.reg_max, 1)) for x in ch)
        self.cv3 = nn.ModuleList(nn.Sequential(Conv(x, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, nc, 1)) for x in ch)
        self.dfl = DFL(self.reg_max)

    def forward(self, x):
        x = [torch.cat((self.cv2[i](x[i]), self.cv3[i](x[i])), 1) for i in range(len(x))]
        anchors, strides = [], []
        for xi, s in zip(x, self.stride):
            h, w = xi.shape[2:]
            sy, sx = torch.meshgrid(torch.arange(h, dtype=torch.float) + 0.5, torch.arange(w, dtype=torch.float) + 0.5, indexing="ij")
            anchors.append(torch.stack((sx, sy), -1).view(-1, 2))
            strides.append(torch.full((h * w, 1), float(s)))
        anchors, strides = torch.cat(anchors).transpose(0, 1), torch.cat(strides).transpose(0, 1)
        b = x[0].shape[0]
        x_cat = torch.cat([xi.view(b, self.no, -1) for xi in x], 2)
        box, cls = x_cat.split((self.reg_max * 4, self.nc), 1)
        lt, rb = self.dfl(box).chunk(2, 1)
        a = anchors.unsqueeze(0)
        x1y1, x2y2 = a - lt, a + rb
        dbox = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * strides
        return torch.cat((dbox, cls.sigmoid()), 1)


class YOLOv8s(nn.Module):
    """YOLOv8s: depth 0.33, width 0.50, max channels 1024."""

    def __init__(self, nc=80):
        super().__init__()
        self.b0, self.b1 = Conv(3, 32, 3, 2), Conv(32, 64, 3, 2)
        self.b2, self.b3 = C2f(64, 64, 1, True), Conv(64, 128, 3, 2)
        self.b4, self.b5 = C2f(128, 128, 2, True), Conv(128, 256, 3, 2)
        self.b6, self.b7 = C2f(256, 256, 2, True), Conv(256, 512, 3, 2)
        self.b8, self.b9 = C2f(512, 512, 1, True), SPPF(512, 512)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.h12, self.h15 = C2f(768, 256, 1, False), C2f(384, 128, 1, False)
        self.h16, self.h18 = Conv(128, 128, 3, 2), C2f(384, 256, 1, False)
        self.h19, self.h21 = Conv(256, 256, 3, 2), C2f(768, 512, 1, False)
        self.detect = Detect(nc, (128, 256, 512))

    def forward(self, x):
        p3 = self.b4(self.b3(self.b2(self.b1(self.b0(x)))))
        p4 = self.b6(self.b5(p3))
        p5 = self.b9(self.b8(self.b7(p4)))
        h12 = self.h12(torch.cat((self.up(p5), p4), 1))
        h15 = self.h15(torch.cat((self.up(h12), p3), 1))
        h18 = self.h18(torch.cat((self.h16(h15), h12), 1))
        h21 = self.h21(torch.cat((self.h19(h18), p5), 1))
        return self.detect([h15, h18, h21])


COCO80 = ["person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
          "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
          "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
          "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
          "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
          "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
          "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
          "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
          "scissors", "teddy bear", "hair drier", "toothbrush"]


def add_metadata(path, meta):
    """Appends ModelProto.metadata_props (field 14) entries to the file,
    as Ultralytics' exporter does with onnx: protobuf fields may come in
    any order, so appending is a valid encoding."""
    def varint(n):
        out = bytearray()
        while True:
            b = n & 0x7F
            n >>= 7
            out.append(b | (0x80 if n else 0))
            if not n:
                return bytes(out)

    def field(num, payload):
        return varint(num << 3 | 2) + varint(len(payload)) + payload

    with open(path, "ab") as f:
        for k, v in meta.items():
            f.write(field(14, field(1, k.encode()) + field(2, v.encode())))

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

for name, chunk in [("yolov8s.onnx", False), ("yolov8s_chunk.onnx", True)]:
  path = os.path.join(out, name)
  C2f.chunk = chunk
  if not os.path.exists(path):
      torch.manual_seed(0)
      net = YOLOv8s().eval()
      for mod in net.modules():  # BatchNorm statistics that keep activations in range
          if isinstance(mod, nn.BatchNorm2d):
              mod.running_var.fill_(4.0)
      with torch.no_grad():
          torch.onnx.export(net, torch.zeros(1, 3, 640, 640), path + ".tmp", input_names=["images"], output_names=["output0"], opset_version=13)
      names = "{" + ", ".join(f"{i}: '{n}'" for i, n in enumerate(COCO80)) + "}"
      add_metadata(path + ".tmp", {"description": "YOLOv8s layout written for visionserve tests (random weights)", "author": "visionserve",
                                   "stride": "32", "task": "detect", "batch": "1", "imgsz": "[640, 640]", "names": names, "end2end": "False"})
      os.replace(path + ".tmp", path)
      print(path, "torch", torch.__version__)
