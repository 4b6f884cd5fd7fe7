package modelgen

import (
	"bytes"
	"math"
	"math/rand/v2"
	"strings"
	"testing"
)

func TestMakeDivisible(t *testing.T) {
	// torchvision: _make_divisible(v, 8) as used for MobileNetV3 SE widths.
	tests := []struct {
		v    float64
		want int
	}{
		{16 / 4, 8}, {72 / 4, 24}, {120 / 4, 32}, {480 / 4, 120}, {672 / 4, 168}, {960 / 4, 240},
		{3, 8}, {12, 16}, {27, 32}, {43, 40}, {44, 48},
	}
	for _, tc := range tests {
		if got := makeDivisible(tc.v, 8); got != tc.want {
			t.Errorf("makeDivisible(%v, 8) = %d, want %d", tc.v, got, tc.want)
		}
	}
}

func TestUltralyticsScope(t *testing.T) {
	// Scopes as they appear in a real Ultralytics export.
	tests := map[string]string{
		"model.0":           "/model.0",
		"model.2.m.0.cv1":   "/model.2/m.0/cv1",
		"model.22.cv2.0.0":  "/model.22/cv2.0/cv2.0.0",
		"model.22.cv3.2.1":  "/model.22/cv3.2/cv3.2.1",
		"model.22.dfl.conv": "/model.22/dfl/conv",
	}
	for in, want := range tests {
		if got := ultralyticsScope(in); got != want {
			t.Errorf("ultralyticsScope(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestYOLOAnchors(t *testing.T) {
	anchors, strides := yoloAnchors()
	const n = 80*80 + 40*40 + 20*20
	if len(strides) != n || len(anchors) != 2*n {
		t.Fatalf("got %d strides and %d anchor values, want %d and %d", len(strides), len(anchors), n, 2*n)
	}
	tests := []struct {
		i            int
		x, y, stride float32
	}{
		{0, 0.5, 0.5, 8},
		{1, 1.5, 0.5, 8},
		{80, 0.5, 1.5, 8},
		{6399, 79.5, 79.5, 8},
		{6400, 0.5, 0.5, 16},
		{8000, 0.5, 0.5, 32},
		{8399, 19.5, 19.5, 32},
	}
	for _, tc := range tests {
		if x, y, s := anchors[tc.i], anchors[n+tc.i], strides[tc.i]; x != tc.x || y != tc.y || s != tc.stride {
			t.Errorf("anchor %d = (%v, %v) stride %v, want (%v, %v) stride %v", tc.i, x, y, s, tc.x, tc.y, tc.stride)
		}
	}
}

func randTensor(r *rand.Rand, n, c, h, w int) *tensor {
	t := newTensor(n, c, h, w)
	for i := range t.data {
		t.data[i] = float32(uniform(r, -1, 1))
	}
	return t
}

// naiveConv is the textbook definition of conv2d on the torus.
func naiveConv(x *tensor, w []float32, cout, k, stride, pad, groups int) *tensor {
	oh := (x.h+2*pad-k)/stride + 1
	ow := (x.w+2*pad-k)/stride + 1
	out := newTensor(x.n, cout, oh, ow)
	cinG, coutG := x.c/groups, cout/groups
	mod := func(a, n int) int { return ((a % n) + n) % n }
	for n := 0; n < x.n; n++ {
		for oc := 0; oc < cout; oc++ {
			g := oc / coutG
			for oy := 0; oy < oh; oy++ {
				for ox := 0; ox < ow; ox++ {
					var s float64
					for ic := 0; ic < cinG; ic++ {
						for ky := 0; ky < k; ky++ {
							for kx := 0; kx < k; kx++ {
								iy := mod(oy*stride-pad+ky, x.h)
								ix := mod(ox*stride-pad+kx, x.w)
								s += float64(w[((oc*cinG+ic)*k+ky)*k+kx]) * float64(x.plane(n, g*cinG+ic)[iy*x.w+ix])
							}
						}
					}
					out.plane(n, oc)[oy*ow+ox] = float32(s)
				}
			}
		}
	}
	return out
}

func TestConv2D(t *testing.T) {
	tests := []struct {
		name                            string
		n, cin, h, w, cout, k, s, p, gr int
	}{
		{"pointwise", 2, 5, 6, 7, 9, 1, 1, 0, 1},
		{"3x3", 2, 4, 8, 8, 6, 3, 1, 1, 1},
		{"3x3 stride 2", 1, 3, 9, 10, 5, 3, 2, 1, 1},
		{"7x7 stride 2", 1, 3, 16, 16, 4, 7, 2, 3, 1},
		{"depthwise 5x5 stride 2", 2, 6, 10, 10, 6, 5, 2, 2, 6},
		{"pointwise stride 2", 1, 4, 8, 8, 8, 1, 2, 0, 1},
		{"kernel larger than map", 1, 2, 2, 2, 3, 3, 1, 1, 1},
	}
	r := rand.New(rand.NewPCG(1, 1))
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			x := randTensor(r, tc.n, tc.cin, tc.h, tc.w)
			w := randTensor(r, tc.cout, tc.cin/tc.gr, tc.k, tc.k).data
			got := conv2d(x, w, tc.cout, tc.k, tc.s, tc.p, tc.gr)
			want := naiveConv(x, w, tc.cout, tc.k, tc.s, tc.p, tc.gr)
			if got.n != want.n || got.c != want.c || got.h != want.h || got.w != want.w {
				t.Fatalf("shape %dx%dx%dx%d, want %dx%dx%dx%d", got.n, got.c, got.h, got.w, want.n, want.c, want.h, want.w)
			}
			for i := range got.data {
				if math.Abs(float64(got.data[i]-want.data[i])) > 1e-4 {
					t.Fatalf("element %d = %v, want %v", i, got.data[i], want.data[i])
				}
			}
		})
	}
}

func TestPoolingAndResize(t *testing.T) {
	x := &tensor{n: 1, c: 1, h: 3, w: 3, data: []float32{
		1, 2, 3,
		4, 9, 5,
		6, 7, 8,
	}}
	mp := maxPool(x, 3, 1, 1)
	// On the torus every 3x3 window of a 3x3 map is the whole map.
	for i, v := range mp.data {
		if v != 9 {
			t.Errorf("maxPool[%d] = %v, want 9", i, v)
		}
	}
	if s := maxPool(x, 2, 2, 0); s.h != 1 || s.w != 1 || s.data[0] != 9 {
		t.Errorf("maxPool 2x2/2 = %+v, want [9]", s)
	}
	gap := globalAvgPool(x)
	if gap.data[0] != 5 {
		t.Errorf("globalAvgPool = %v, want 5", gap.data[0])
	}
	up := upsample2x(&tensor{n: 1, c: 1, h: 1, w: 2, data: []float32{1, 2}})
	if want := []float32{1, 1, 2, 2, 1, 1, 2, 2}; !equalF(up.data, want) {
		t.Errorf("upsample2x = %v, want %v", up.data, want)
	}
	two := &tensor{n: 2, c: 1, h: 1, w: 2, data: []float32{1, 2, 3, 4}}
	cat := concat(two, two)
	if want := []float32{1, 2, 1, 2, 3, 4, 3, 4}; cat.c != 2 || !equalF(cat.data, want) {
		t.Errorf("concat = %v, want %v", cat.data, want)
	}
	if s := sliceChannels(cat, 1, 2); !equalF(s.data, []float32{1, 2, 3, 4}) {
		t.Errorf("sliceChannels = %v", s.data)
	}
}

func equalF(a, b []float32) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestActivations(t *testing.T) {
	tests := []struct {
		name string
		f    func(float32) float32
		in   []float32
		want []float32
	}{
		{"relu", relu, []float32{-1, 0, 2}, []float32{0, 0, 2}},
		{"hardSigmoid", hardSigmoid, []float32{-4, 0, 1.5, 4}, []float32{0, 0.5, 0.75, 1}},
		{"hardSwish", hardSwish, []float32{-4, 0, 1.5, 4}, []float32{0, 0, 1.125, 4}},
		{"sigmoid", sigmoid, []float32{0}, []float32{0.5}},
		{"silu", silu, []float32{0, 10}, []float32{0, 10 / (1 + float32(math.Exp(-10)))}},
	}
	for _, tc := range tests {
		for i, v := range tc.in {
			if got := tc.f(v); math.Abs(float64(got-tc.want[i])) > 1e-6 {
				t.Errorf("%s(%v) = %v, want %v", tc.name, v, got, tc.want[i])
			}
		}
	}
}

// TestNormFit checks that fitted scale/bias give the target distribution:
// per-channel means within beta's range and the pooled RMS of the centred,
// scaled output within gamma's range.
func TestNormFit(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	y := randTensor(r, 2, 16, 8, 8)
	// Give channels very different offsets and scales, like raw conv
	// outputs.
	for n := 0; n < y.n; n++ {
		for c := 0; c < y.c; c++ {
			p := y.plane(n, c)
			for i := range p {
				p[i] = p[i]*float32(c+1) + float32(3*c)
			}
		}
	}
	nm := norm{gamma: [2]float64{0.9, 1.1}, beta: [2]float64{-0.2, 0.2}, betaOf: func(c int) float64 { return float64(c) }}
	scale, bias := nm.fit(y, rand.New(rand.NewPCG(5, 6)))
	y.affine(scale, bias)
	mean, std := channelStats(y)
	for c := range mean {
		if lo, hi := float64(c)-0.2-1e-4, float64(c)+0.2+1e-4; mean[c] < lo || mean[c] > hi {
			t.Errorf("channel %d mean %.3f outside [%.2f, %.2f]", c, mean[c], lo, hi)
		}
		if std[c] <= 0 {
			t.Errorf("channel %d collapsed", c)
		}
	}
	// fit scales the whole layer by the pooled RMS, so channel stds keep
	// their relative sizes: the widest channel stays the widest.
	if std[15] < 4*std[0] {
		t.Errorf("layer-wise scaling lost the channels' relative spread: std[0]=%.3f std[15]=%.3f", std[0], std[15])
	}
}

func TestCalibBatch(t *testing.T) {
	b := calibBatch(rand.New(rand.NewPCG(1, 2)), calibImages, 32)
	for i := 0; i < b.n; i++ {
		var lo, hi float32 = 1, 0
		for c := 0; c < 3; c++ {
			for _, v := range b.plane(i, c) {
				lo, hi = min(lo, v), max(hi, v)
			}
		}
		if lo < 0 || hi > 1 || hi-lo < 0.2 {
			t.Errorf("image %d range [%v, %v], want a varied image within [0, 1]", i, lo, hi)
		}
	}
}

func TestProgress(t *testing.T) {
	var buf bytes.Buffer
	p := newProgress(&buf, "m/model.onnx", 100<<20)
	for w := int64(0); w <= 100<<20; w += 4 << 20 {
		p.update(w)
	}
	p.update(100 << 20)
	p.done()
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	// A non-terminal gets one line per quarter and no carriage returns.
	if len(lines) != 4 || strings.Contains(buf.String(), "\r") || !strings.HasSuffix(lines[3], "(100%)") {
		t.Errorf("plain progress output:\n%s", buf.String())
	}
}
