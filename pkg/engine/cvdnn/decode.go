package cvdnn

import (
	"fmt"
	"math"
)

// Plane is one level's head output for N images in NCHW order, of which
// the view uses the channels starting at Offset: a combined level tensor is
// read through two Planes, box channels at 0 and class channels at
// 4*RegMax.
type Plane struct {
	Data   []float32
	C      int // channels per image in Data
	Offset int // first channel of the view
}

// Level is one detection level: its grid size and its box and class views.
type Level struct {
	H, W     int
	Box, Cls Plane
}

// DecodeYOLOv8 computes what the tail of a YOLOv8 export computes from the
// per-level head outputs, writing the [n, 4+nc, anchors] output tensor into
// dst: for every anchor (grid cell centre, level by level, row-major) the
// box distances are the expectation of a softmax over regMax bins per side
// (DFL), turned into cx, cy, w, h in input pixels with the level's stride
// (input size / grid size); class rows are the sigmoid of the logits.
// It computes in float32 with a polynomial exp (a few ulp), well inside
// the agreement with ONNX Runtime the tests ask for. Inconsistent sizes
// give an error, never a panic.
func DecodeYOLOv8(dst []float32, n int, levels []Level, regMax, nc, inH, inW int) error {
	return decodeYOLOv8(dst, n, levels, regMax, nc, inH, inW, nil)
}

// decodeYOLOv8 is DecodeYOLOv8 with scratch space that is grown as needed
// and returned for reuse through *scratchp (nil: allocate per call).
func decodeYOLOv8(dst []float32, n int, levels []Level, regMax, nc, inH, inW int, scratchp *[]float32) error {
	if n < 1 || regMax < 1 || nc < 1 || inH < 1 || inW < 1 || len(levels) == 0 {
		return fmt.Errorf("decoding yolov8: bad sizes n=%d reg_max=%d classes=%d input=%dx%d levels=%d", n, regMax, nc, inW, inH, len(levels))
	}
	anchors := 0
	for i, l := range levels {
		if l.H < 1 || l.W < 1 {
			return fmt.Errorf("decoding yolov8: level %d has an empty %dx%d grid", i, l.W, l.H)
		}
		hw := l.H * l.W
		if l.Box.Offset < 0 || l.Box.Offset+4*regMax > l.Box.C || len(l.Box.Data) < n*l.Box.C*hw {
			return fmt.Errorf("decoding yolov8: level %d box tensor holds %d floats of %d channels from %d, want %d images of 4*%d channels of %dx%d", i, len(l.Box.Data), l.Box.C, l.Box.Offset, n, regMax, l.W, l.H)
		}
		if l.Cls.Offset < 0 || l.Cls.Offset+nc > l.Cls.C || len(l.Cls.Data) < n*l.Cls.C*hw {
			return fmt.Errorf("decoding yolov8: level %d class tensor holds %d floats of %d channels from %d, want %d images of %d channels of %dx%d", i, len(l.Cls.Data), l.Cls.C, l.Cls.Offset, n, nc, l.W, l.H)
		}
		anchors += hw
	}
	rows := 4 + nc
	if len(dst) < n*rows*anchors {
		return fmt.Errorf("decoding yolov8: output holds %d floats, want %d", len(dst), n*rows*anchors)
	}
	maxHW := 0
	for _, l := range levels {
		maxHW = max(maxHW, l.H*l.W)
	}
	// Scratch rows, so the DFL walks every bin plane sequentially rather
	// than striding across planes per anchor (the planes of the first level
	// are 25 KB apart).
	var scratch []float32
	if scratchp != nil && cap(*scratchp) >= 2*maxHW {
		scratch = (*scratchp)[:2*maxHW]
	} else {
		scratch = make([]float32, 2*maxHW)
		if scratchp != nil {
			*scratchp = scratch
		}
	}
	for img := range n {
		out := dst[img*rows*anchors : (img+1)*rows*anchors]
		base := 0
		for _, l := range levels {
			hw := l.H * l.W
			sx, sy := float32(inW)/float32(l.W), float32(inH)/float32(l.H)
			box := l.Box.Data[(img*l.Box.C+l.Box.Offset)*hw:]
			var d [4][]float32
			for side := range 4 {
				// The side's distances land in its output row, rewritten
				// to cx, cy, w, h once all four are known.
				d[side] = out[side*anchors+base : side*anchors+base+hw]
				dflRow(box[side*regMax*hw:(side+1)*regMax*hw], hw, regMax, d[side], scratch)
			}
			for p := range hw {
				ax, ay := float32(p%l.W)+0.5, float32(p/l.W)+0.5
				x1, y1, x2, y2 := ax-d[0][p], ay-d[1][p], ax+d[2][p], ay+d[3][p]
				d[0][p] = (x1 + x2) / 2 * sx
				d[1][p] = (y1 + y2) / 2 * sy
				d[2][p] = (x2 - x1) * sx
				d[3][p] = (y2 - y1) * sy
			}
			cls := l.Cls.Data[(img*l.Cls.C+l.Cls.Offset)*hw:]
			for c := range nc {
				row := out[(4+c)*anchors+base : (4+c)*anchors+base+hw]
				src := cls[c*hw : (c+1)*hw]
				for p, v := range src {
					row[p] = sigmoid(v)
				}
			}
			base += hw
		}
	}
	return nil
}

// dflRow computes, for each of hw anchors, the expected bin of a softmax
// over the regMax logits planes[j*hw+p], into dst.
func dflRow(planes []float32, hw, regMax int, dst, scratch []float32) {
	mx, sum := scratch[:hw], scratch[hw:2*hw]
	copy(mx, planes[:hw])
	for j := 1; j < regMax; j++ {
		for p, v := range planes[j*hw : (j+1)*hw] {
			mx[p] = max(mx[p], v)
		}
	}
	clear(sum)
	clear(dst)
	for j := range regMax {
		fj := float32(j)
		for p, v := range planes[j*hw : (j+1)*hw] {
			e := exp32(v - mx[p])
			sum[p] += e
			dst[p] += e * fj
		}
	}
	for p := range dst {
		dst[p] /= sum[p]
	}
}

// exp32 is e^x in float32 to a few units in the last place, several
// times faster than math.Exp (Cephes' expf): x = n·ln2 + r with |r| <=
// ln2/2, e^r by a polynomial, 2^n set in the exponent bits.
func exp32(x float32) float32 {
	switch {
	case x != x: // NaN
		return x
	case x < -87:
		return 0
	case x > 88:
		return float32(math.Inf(1))
	}
	fn := x*1.44269504088896341 + 0.5 // round(x / ln2)
	n := int32(fn)
	if fn < 0 && float32(n) != fn {
		n--
	}
	// ln2 in two parts, so n·ln2 is exact to float32 precision.
	r := x - float32(n)*0.693359375 - float32(n)*-2.12194440e-4
	z := r * r
	p := float32(1.9875691500e-4)
	p = p*r + 1.3981999507e-3
	p = p*r + 8.3334519073e-3
	p = p*r + 4.1665795894e-2
	p = p*r + 1.6666665459e-1
	p = p*r + 5.0000001201e-1
	y := p*z + r + 1
	return y * math.Float32frombits(uint32(n+127)<<23)
}

func sigmoid(x float32) float32 {
	return 1 / (1 + exp32(-x))
}

// levels describes the cut model's outputs, in DetectHead.Outputs order,
// as decoder levels. shapes are the [N,C,H,W] shapes of the outputs.
func (h *DetectHead) levels(data [][]float32, shapes [][]int) ([]Level, error) {
	nl := len(h.Levels)
	want := nl
	if !h.Combined() {
		want = 2 * nl
	}
	if len(data) != want || len(shapes) != want {
		return nil, fmt.Errorf("detect head has %d levels, got %d tensors", nl, len(data))
	}
	for i, s := range shapes {
		if len(s) != 4 {
			return nil, fmt.Errorf("head tensor %d has shape %v, want [N,C,H,W]", i, s)
		}
	}
	levels := make([]Level, nl)
	for i := range nl {
		if h.Combined() {
			s := shapes[i]
			if s[1] != 4*h.RegMax+h.NumClasses {
				return nil, fmt.Errorf("head tensor %d has %d channels, want %d", i, s[1], 4*h.RegMax+h.NumClasses)
			}
			levels[i] = Level{H: s[2], W: s[3],
				Box: Plane{Data: data[i], C: s[1]},
				Cls: Plane{Data: data[i], C: s[1], Offset: 4 * h.RegMax}}
			continue
		}
		bs, cs := shapes[i], shapes[nl+i]
		if bs[1] != 4*h.RegMax || cs[1] != h.NumClasses || bs[2] != cs[2] || bs[3] != cs[3] {
			return nil, fmt.Errorf("level %d head tensors have shapes %v and %v, want %d box and %d class channels on one grid", i, bs, cs, 4*h.RegMax, h.NumClasses)
		}
		levels[i] = Level{H: bs[2], W: bs[3],
			Box: Plane{Data: data[i], C: bs[1]},
			Cls: Plane{Data: data[nl+i], C: cs[1]}}
	}
	return levels, nil
}

// Decode is DecodeYOLOv8 over the cut graph's outputs: data and shapes are
// the [N,C,H,W] tensors in Outputs order, inH×inW the model input. dst
// receives [N, 4+NumClasses, anchors]; it returns the anchor count.
func (h *DetectHead) Decode(dst []float32, n int, data [][]float32, shapes [][]int, inH, inW int) (anchors int, err error) {
	levels, err := h.levels(data, shapes)
	if err != nil {
		return 0, err
	}
	anchors = anchorCount(levels)
	return anchors, DecodeYOLOv8(dst, n, levels, h.RegMax, h.NumClasses, inH, inW)
}

// anchorCount is the anchor count of levels.
func anchorCount(levels []Level) int {
	a := 0
	for _, l := range levels {
		a += l.H * l.W
	}
	return a
}
