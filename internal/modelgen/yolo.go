package modelgen

import (
	"fmt"
	"strings"
)

// YOLOv8s architecture constants (ultralytics/cfg/models/v8/yolov8.yaml,
// scale "s": depth 0.33, width 0.50, max_channels 1024).
const (
	yoloSize    = 640
	yoloClasses = 80
	yoloRegMax  = 16
)

// yoloStrides are the Detect head levels' strides (P3, P4, P5).
var yoloStrides = []int{8, 16, 32}

// YOLOv8sHeadOutputs are the names of the per-level Detect head tensors of
// the generated yolov8s graph: Concat(cv2[i], cv3[i]) along channels, shape
// [N, 144, 640/s, 640/s] for s = 8, 16, 32. They are the outputs of the
// Concat nodes "/model.22/Concat", "/model.22/Concat_1" and
// "/model.22/Concat_2", named as an Ultralytics export names them. Cutting
// the graph there leaves only Conv, Sigmoid, Mul, Add, Split, Concat,
// MaxPool and Resize (plus its Constant scales), which OpenCV 4.6 DNN runs;
// onnx.DetectHeadOutputs finds the same tensors structurally.
var YOLOv8sHeadOutputs = []string{
	"/model.22/Concat_output_0",
	"/model.22/Concat_1_output_0",
	"/model.22/Concat_2_output_0",
}

// The Detect head's last convolutions are plain biased Conv2d layers. The
// box branch outputs 4 sides x 16 DFL bins; a bias falling with the bin
// index is a prior for distances of about 3 grid cells, so decoded boxes
// span a few cells at every level. The class branch is centred well below
// zero so that most sigmoid scores are small, some exceed typical
// confidence thresholds, and none saturate.
var (
	yoloBoxNorm = norm{gamma: [2]float64{0.8, 1.2}, beta: [2]float64{-0.2, 0.2},
		betaOf: func(c int) float64 { return -0.3 * float64(c%yoloRegMax) }}
	yoloClsNorm = norm{gamma: [2]float64{0.6, 0.9}, beta: [2]float64{-4.4, -2.9}}
	// bnDamped ends a C2f bottleneck with a shortcut.
	bnDamped = norm{gamma: [2]float64{0.3, 0.7}, beta: [2]float64{-0.2, 0.2}}
)

// ultralyticsScope turns a module path such as "model.22.cv2.0.0" into the
// node scope the exporter writes, "/model.22/cv2.0/cv2.0.0": an index joins
// the name before it, and a second index opens a nested scope.
func ultralyticsScope(path string) string {
	var parts []string
	prevNum := false
	for _, p := range strings.Split(path, ".") {
		num := p != "" && strings.Trim(p, "0123456789") == ""
		switch {
		case num && prevNum:
			parts = append(parts, parts[len(parts)-1]+"."+p)
		case num && len(parts) > 0:
			parts[len(parts)-1] += "." + p
		default:
			parts = append(parts, p)
		}
		prevNum = num
	}
	return "/" + strings.Join(parts, "/")
}

// yoloConv is Ultralytics' Conv: Conv2d(bias=False) + BatchNorm + SiLU,
// exported fused as Conv + Sigmoid + Mul.
func (b *builder) yoloConv(x value, path string, cout, k, stride int, nm norm) value {
	scope := ultralyticsScope(path)
	y := b.conv(x, scope+"/conv/Conv", path+".conv", cout, k, stride, 1, nm)
	return b.silu(y, scope+"/act")
}

// c2f is Ultralytics' C2f block (CSP bottleneck with 2 convolutions).
func (b *builder) c2f(x value, path string, cout, n int, shortcut bool) value {
	scope := ultralyticsScope(path)
	c := cout / 2
	y := b.yoloConv(x, path+".cv1", 2*c, 1, 1, bnAct)
	split := b.opN("Split", scope+"/Split", []string{y.name, b.int64s(path+".split", int64(c), int64(c))}, 2, attrInt("axis", 1))
	ys := []value{
		{split[0], sliceChannels(y.act, 0, c)},
		{split[1], sliceChannels(y.act, c, 2*c)},
	}
	for i := 0; i < n; i++ {
		mp := fmt.Sprintf("%s.m.%d", path, i)
		h := ys[len(ys)-1]
		h = b.yoloConv(h, mp+".cv1", c, 3, 1, bnAct)
		last := bnAct
		if shortcut {
			last = bnDamped
		}
		h = b.yoloConv(h, mp+".cv2", c, 3, 1, last)
		if shortcut {
			h = b.add(ys[len(ys)-1], h, ultralyticsScope(mp)+"/Add")
		}
		ys = append(ys, h)
	}
	cat := b.concat(scope+"/Concat", 1, ys...)
	return b.yoloConv(cat, path+".cv2", cout, 1, 1, bnAct)
}

// sppf is Ultralytics' SPPF (three chained 5x5 max pools).
func (b *builder) sppf(x value, path string, cout int) value {
	scope := ultralyticsScope(path)
	y := b.yoloConv(x, path+".cv1", x.act.c/2, 1, 1, bnAct)
	ys := []value{y}
	for i, suffix := range []string{"m", "m_1", "m_2"} {
		_ = i
		ys = append(ys, b.maxPool(ys[len(ys)-1], scope+"/"+suffix+"/MaxPool", 5, 1, 2))
	}
	return b.yoloConv(b.concat(scope+"/Concat", 1, ys...), path+".cv2", cout, 1, 1, bnAct)
}

// upsample is nn.Upsample(scale_factor=2, mode="nearest") as exported:
// Resize(x, "", scales) with the scales in a Constant node.
func (b *builder) upsample(x value, path string) value {
	scope := ultralyticsScope(path)
	scales := b.constant(scope+"/Constant", []int64{4}, []float32{1, 1, 2, 2})
	out := b.op("Resize", scope+"/Resize", []string{x.name, "", scales},
		attrString("coordinate_transformation_mode", "asymmetric"),
		attrFloat("cubic_coeff_a", -0.75),
		attrString("mode", "nearest"),
		attrString("nearest_mode", "floor"))
	return value{out, upsample2x(x.act)}
}

// yoloV8s builds the YOLOv8s detection model, including the Detect head's
// DFL and box decode, returning output0 = [N, 84, 8400].
func yoloV8s(b *builder, x value) value {
	conv := func(x value, i, cout, k, s int) value {
		return b.yoloConv(x, fmt.Sprintf("model.%d", i), cout, k, s, bnAct)
	}
	concat := func(i int, xs ...value) value {
		return b.concat(fmt.Sprintf("/model.%d/Concat", i), 1, xs...)
	}
	// Backbone.
	y := conv(x, 0, 32, 3, 2)
	y = conv(y, 1, 64, 3, 2)
	y = b.c2f(y, "model.2", 64, 1, true)
	y = conv(y, 3, 128, 3, 2)
	p3 := b.c2f(y, "model.4", 128, 2, true)
	y = conv(p3, 5, 256, 3, 2)
	p4 := b.c2f(y, "model.6", 256, 2, true)
	y = conv(p4, 7, 512, 3, 2)
	y = b.c2f(y, "model.8", 512, 1, true)
	p5 := b.sppf(y, "model.9", 512)
	// Neck (PAN).
	y = concat(11, b.upsample(p5, "model.10"), p4)
	h12 := b.c2f(y, "model.12", 256, 1, false)
	y = concat(14, b.upsample(h12, "model.13"), p3)
	out3 := b.c2f(y, "model.15", 128, 1, false)
	y = concat(17, conv(out3, 16, 128, 3, 2), h12)
	out4 := b.c2f(y, "model.18", 256, 1, false)
	y = concat(20, conv(out4, 19, 256, 3, 2), p5)
	out5 := b.c2f(y, "model.21", 512, 1, false)
	return b.detect([]value{out3, out4, out5})
}

// detect is Ultralytics' Detect head in export mode.
func (b *builder) detect(xs []value) value {
	const c2, c3 = 64, 128 // max(16, 128/4, 4*reg_max), max(128, min(nc, 100))
	no := 4*yoloRegMax + yoloClasses
	var levels []value
	for i, x := range xs {
		box := b.yoloConv(x, fmt.Sprintf("model.22.cv2.%d.0", i), c2, 3, 1, bnAct)
		box = b.yoloConv(box, fmt.Sprintf("model.22.cv2.%d.1", i), c2, 3, 1, bnAct)
		box = b.conv(box, fmt.Sprintf("/model.22/cv2.%d/cv2.%d.2/Conv", i, i), fmt.Sprintf("model.22.cv2.%d.2", i), 4*yoloRegMax, 1, 1, 1, yoloBoxNorm)
		cls := b.yoloConv(x, fmt.Sprintf("model.22.cv3.%d.0", i), c3, 3, 1, bnAct)
		cls = b.yoloConv(cls, fmt.Sprintf("model.22.cv3.%d.1", i), c3, 3, 1, bnAct)
		cls = b.conv(cls, fmt.Sprintf("/model.22/cv3.%d/cv3.%d.2/Conv", i, i), fmt.Sprintf("model.22.cv3.%d.2", i), yoloClasses, 1, 1, 1, yoloClsNorm)
		name := "/model.22/Concat"
		if i > 0 {
			name = fmt.Sprintf("/model.22/Concat_%d", i)
		}
		levels = append(levels, b.concat(name, 1, box, cls))
	}
	// From here on there are no weights to fit: drop the activations.
	flat := b.int64s("model.22.flat_shape", 0, int64(no), -1)
	var flats []value
	for i, l := range levels {
		name := "/model.22/Reshape"
		if i > 0 {
			name = fmt.Sprintf("/model.22/Reshape_%d", i)
		}
		flats = append(flats, value{b.op("Reshape", name, []string{l.name, flat}, attrInt("allowzero", 0)), nil})
	}
	cat := b.concat("/model.22/Concat_3", 2, flats...)
	split := b.opN("Split", "/model.22/Split", []string{cat.name, b.int64s("model.22.split", 4*yoloRegMax, yoloClasses)}, 2, attrInt("axis", 1))
	boxes, scores := split[0], split[1]

	// DFL: softmax over the 16 bins of each side, then the expectation via
	// a 1x1 conv whose weight is arange(16) (a fixed parameter).
	d := b.op("Reshape", "/model.22/dfl/Reshape", []string{boxes, b.int64s("model.22.dfl.shape", 0, 4, yoloRegMax, -1)}, attrInt("allowzero", 0))
	d = b.op("Transpose", "/model.22/dfl/Transpose", []string{d}, attrInts("perm", 0, 2, 1, 3))
	d = b.op("Softmax", "/model.22/dfl/Softmax", []string{d}, attrInt("axis", 1))
	bins := make([]float32, yoloRegMax)
	for i := range bins {
		bins[i] = float32(i)
	}
	dflW := b.param("model.22.dfl.conv.weight", []int64{1, yoloRegMax, 1, 1}, bins)
	d = b.op("Conv", "/model.22/dfl/conv/Conv", []string{d, dflW},
		attrInts("dilations", 1, 1), attrInt("group", 1), attrInts("kernel_shape", 1, 1),
		attrInts("pads", 0, 0, 0, 0), attrInts("strides", 1, 1))
	d = b.op("Reshape", "/model.22/dfl/Reshape_1", []string{d, b.int64s("model.22.dfl.out_shape", 0, 4, -1)}, attrInt("allowzero", 0))

	// dist2bbox(xywh=True) with anchor points in grid units, then * stride.
	axes := b.int64s("model.22.slice_axes", 1)
	lt := b.op("Slice", "/model.22/Slice", []string{d, b.int64s("model.22.slice_lt_start", 0), b.int64s("model.22.slice_lt_end", 2), axes})
	rb := b.op("Slice", "/model.22/Slice_1", []string{d, b.int64s("model.22.slice_rb_start", 2), b.int64s("model.22.slice_rb_end", 4), axes})
	anchors, strides := yoloAnchors()
	total := int64(len(strides))
	anc := b.constant("/model.22/Constant_9", []int64{1, 2, total}, anchors)
	x1y1 := b.op("Sub", "/model.22/Sub", []string{anc, lt})
	x2y2 := b.op("Add", "/model.22/Add", []string{anc, rb})
	sum := b.op("Add", "/model.22/Add_1", []string{x1y1, x2y2})
	cxy := b.op("Div", "/model.22/Div", []string{sum, b.constant("/model.22/Constant_10", nil, []float32{2})})
	wh := b.op("Sub", "/model.22/Sub_1", []string{x2y2, x1y1})
	xywh := b.op("Concat", "/model.22/Concat_4", []string{cxy, wh}, attrInt("axis", 1))
	dbox := b.op("Mul", "/model.22/Mul", []string{xywh, b.constant("/model.22/Constant_11", []int64{1, total}, strides)})
	sig := b.op("Sigmoid", "/model.22/Sigmoid", []string{scores})
	out := b.op("Concat", "/model.22/Concat_5", []string{dbox, sig}, attrInt("axis", 1))
	return value{out, nil}
}

// yoloAnchors returns Ultralytics' make_anchors(offset=0.5) for a 640x640
// input as a [2, 8400] row-major array (all x, then all y; grid units)
// and the matching per-anchor strides.
func yoloAnchors() (anchors, strides []float32) {
	var xs, ys []float32
	for _, s := range yoloStrides {
		n := yoloSize / s
		for y := 0; y < n; y++ {
			for x := 0; x < n; x++ {
				xs = append(xs, float32(x)+0.5)
				ys = append(ys, float32(y)+0.5)
				strides = append(strides, float32(s))
			}
		}
	}
	return append(xs, ys...), strides
}
