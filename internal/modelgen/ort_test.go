//go:build cgo

package modelgen_test

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/visionserve/visionserve/internal/testenv/onnxrttest"

	"github.com/visionserve/visionserve/internal/modelgen"
	"github.com/visionserve/visionserve/pkg/onnx"
	ort "github.com/yalue/onnxruntime_go"
)

// testImages returns n distinct NCHW test images in [0, 1]: white noise,
// a colour gradient, and a flat image with a bright rectangle, repeating.
// With imageNet they are normalised as torchvision classifiers expect.
func testImages(n, size int, imageNet bool) []float32 {
	plane := size * size
	out := make([]float32, n*3*plane)
	r := rand.New(rand.NewPCG(42, 43))
	for i := 0; i < n; i++ {
		for c := 0; c < 3; c++ {
			p := out[(i*3+c)*plane : (i*3+c+1)*plane]
			for y := 0; y < size; y++ {
				for x := 0; x < size; x++ {
					var v float32
					switch i % 3 {
					case 0:
						v = r.Float32()
					case 1:
						v = float32(x+y*(c+1)) / float32(size*(c+2))
					case 2:
						v = 0.2
						if x > size/3 && x < size/2 && y > size/4 && y < 3*size/4 {
							v = 0.9 - 0.3*float32(c)
						}
					}
					p[y*size+x] = v
				}
			}
		}
	}
	if imageNet {
		mean := [3]float32{0.485, 0.456, 0.406}
		std := [3]float32{0.229, 0.224, 0.225}
		for i := range out {
			c := (i / plane) % 3
			out[i] = (out[i] - mean[c]) / std[c]
		}
	}
	return out
}

// runORT runs data (a serialised model) on an input batch and returns the
// named outputs' data and shapes.
func runORT(t testing.TB, data []byte, input string, shape []int64, in []float32, outputs ...string) ([][]float32, [][]int64) {
	t.Helper()
	opts, err := ort.NewSessionOptions()
	if err != nil {
		t.Fatal(err)
	}
	defer opts.Destroy()
	// Two intra-op threads: the machines running this are small and shared.
	if err := opts.SetIntraOpNumThreads(2); err != nil {
		t.Fatal(err)
	}
	s, err := ort.NewDynamicAdvancedSessionWithONNXData(data, []string{input}, outputs, opts)
	if err != nil {
		t.Fatalf("creating session: %v", err)
	}
	defer s.Destroy()
	x, err := ort.NewTensor(ort.NewShape(shape...), in)
	if err != nil {
		t.Fatal(err)
	}
	defer x.Destroy()
	outs := make([]ort.Value, len(outputs))
	if err := s.Run([]ort.Value{x}, outs); err != nil {
		t.Fatalf("running session: %v", err)
	}
	vals := make([][]float32, len(outs))
	shapes := make([][]int64, len(outs))
	for i, o := range outs {
		ft := o.(*ort.Tensor[float32])
		vals[i] = append([]float32(nil), ft.GetData()...)
		shapes[i] = ft.GetShape()
		o.Destroy()
	}
	return vals, shapes
}

func meanStd(v []float32) (mean, std float64) {
	for _, x := range v {
		mean += float64(x)
	}
	mean /= float64(len(v))
	for _, x := range v {
		std += (float64(x) - mean) * (float64(x) - mean)
	}
	return mean, math.Sqrt(std / float64(len(v)))
}

func checkFinite(t *testing.T, what string, v []float32) {
	t.Helper()
	for i, x := range v {
		if math.IsNaN(float64(x)) || math.IsInf(float64(x), 0) {
			t.Fatalf("%s[%d] = %v", what, i, x)
		}
	}
}

// TestORT runs every model in ONNX Runtime at batch 1 and batch 2 and
// checks that outputs are finite, input-dependent and plausible.
func TestORT(t *testing.T) {
	onnxrttest.Init(t)
	for _, s := range specs {
		t.Run(s.name, func(t *testing.T) {
			m, data := model(t, s.name)
			size := onnx.Shape(m.GetGraph().GetInput()[0])[2]
			imgs := testImages(3, int(size), s.name != "yolov8s")
			per := int(3 * size * size)
			one, oneShape := runORT(t, data, s.input, []int64{1, 3, size, size}, imgs[:per], s.output)
			batch, batchShape := runORT(t, data, s.input, []int64{3, 3, size, size}, imgs, s.output)
			if want := append([]int64{1}, s.outShape[1:]...); fmt.Sprint(oneShape[0]) != fmt.Sprint(want) {
				t.Fatalf("batch 1 output shape %v, want %v", oneShape[0], want)
			}
			if want := append([]int64{3}, s.outShape[1:]...); fmt.Sprint(batchShape[0]) != fmt.Sprint(want) {
				t.Fatalf("batch 3 output shape %v, want %v", batchShape[0], want)
			}
			checkFinite(t, "output", batch[0])
			outPer := len(one[0])
			// Batching must not change an image's result.
			var maxDiff float64
			for i := range one[0] {
				maxDiff = math.Max(maxDiff, math.Abs(float64(one[0][i]-batch[0][i])))
			}
			if maxDiff > 1e-3 {
				t.Errorf("image 0 alone and in a batch differ by up to %g", maxDiff)
			}
			results := make([][]float32, 3)
			for i := range results {
				results[i] = batch[0][i*outPer : (i+1)*outPer]
			}
			for i := 1; i < 3; i++ {
				var d float64
				for j := range results[0] {
					d = math.Max(d, math.Abs(float64(results[0][j]-results[i][j])))
				}
				if d < 0.1 {
					t.Errorf("images 0 and %d give nearly the same output (max diff %g)", i, d)
				}
			}
			for i, r := range results {
				if s.name == "yolov8s" {
					checkDetections(t, i, r)
				} else {
					checkLogits(t, i, r)
				}
			}
		})
	}
}

// checkLogits wants logits that rank classes clearly without a one-hot or
// uniform softmax.
func checkLogits(t *testing.T, img int, logits []float32) {
	t.Helper()
	_, std := meanStd(logits)
	maxL := math.Inf(-1)
	for _, l := range logits {
		maxL = math.Max(maxL, float64(l))
	}
	var z float64
	for _, l := range logits {
		z += math.Exp(float64(l) - maxL)
	}
	pmax := 1 / z
	t.Logf("image %d: logit std %.2f, max softmax %.4f", img, std, pmax)
	if std < 0.3 || pmax < 3.0/1000 || pmax > 0.99 {
		t.Errorf("image %d: logit std %.3f, max softmax %.4f; want std >= 0.3 and max softmax in [0.003, 0.99]", img, std, pmax)
	}
}

// checkDetections wants boxes inside (or near) the 640x640 input with
// positive sizes, and class scores spread out but not saturated.
func checkDetections(t *testing.T, img int, out []float32) {
	t.Helper()
	const n = 8400
	row := func(r int) []float32 { return out[r*n : (r+1)*n] }
	cx, cy, w, h := row(0), row(1), row(2), row(3)
	inside := 0
	for i := 0; i < n; i++ {
		if w[i] <= 0 || h[i] <= 0 || w[i] > 1280 || h[i] > 1280 {
			t.Fatalf("image %d anchor %d: box size %vx%v", img, i, w[i], h[i])
		}
		if cx[i] >= 0 && cx[i] <= 640 && cy[i] >= 0 && cy[i] <= 640 {
			inside++
		}
	}
	if inside < n*9/10 {
		t.Errorf("image %d: only %d of %d box centres inside the image", img, inside, n)
	}
	scores := out[4*n:]
	var low, high, above float64
	maxS := float32(0)
	for _, s := range scores {
		// ORT's vectorised sigmoid clamps its input, so far-out logits
		// give exactly 0 or 1.
		if s < 0 || s > 1 {
			t.Fatalf("image %d: score %v outside [0, 1]", img, s)
		}
		if s < 1e-4 {
			low++
		}
		if s > 0.9999 {
			high++
		}
		if s > 0.25 {
			above++
		}
		maxS = max(maxS, s)
	}
	_, std := meanStd(scores)
	total := float64(len(scores))
	_, wStd := meanStd(w)
	t.Logf("image %d: score std %.4f, max %.4f, %.0f above 0.25; box width std %.1f", img, std, maxS, above, wStd)
	if std < 1e-3 || maxS < 0.05 || low/total > 0.5 || high/total > 0.01 {
		t.Errorf("image %d: scores saturated or flat: std %.4g, max %.4f, %.1f%% < 1e-4, %.2f%% > 0.9999", img, std, maxS, 100*low/total, 100*high/total)
	}
	if wStd < 1 {
		t.Errorf("image %d: all boxes have the same width", img)
	}
}

// TestORTHostDecode recomputes output0 from the three per-level head
// tensors on the host (DFL softmax expectation, anchors, strides,
// sigmoid), which is exactly what the OpenCV engine does after cutting the
// graph, and checks it matches the in-graph decode.
func TestORTHostDecode(t *testing.T) {
	onnxrttest.Init(t)
	m, _ := model(t, "yolov8s")
	// ORT only fetches graph outputs, so declare the head tensors as
	// outputs of a shallow copy of the model.
	src := m.GetGraph()
	g := &onnx.GraphProto{
		Name:        src.GetName(),
		Node:        src.GetNode(),
		Initializer: src.GetInitializer(),
		Input:       src.GetInput(),
		Output:      append(append([]*onnx.ValueInfoProto{}, src.GetOutput()...), src.GetValueInfo()...),
	}
	outputs := append([]string{"output0"}, modelgen.YOLOv8sHeadOutputs...)
	withHeads := &onnx.ModelProto{IrVersion: m.GetIrVersion(), OpsetImport: m.GetOpsetImport(), Graph: g}
	data, err := modelgen.Marshal(withHeads)
	if err != nil {
		t.Fatal(err)
	}
	vals, shapes := runORT(t, data, "images", []int64{1, 3, 640, 640}, testImages(1, 640, false), outputs...)
	want := vals[0]
	const n = 8400
	anchor := 0
	var maxErr float64
	for lvl, stride := range []int{8, 16, 32} {
		head := vals[1+lvl]
		side := 640 / stride
		if fmt.Sprint(shapes[1+lvl]) != fmt.Sprint([]int64{1, 144, int64(side), int64(side)}) {
			t.Fatalf("head %d shape %v", lvl, shapes[1+lvl])
		}
		hw := side * side
		for y := 0; y < side; y++ {
			for x := 0; x < side; x++ {
				pos := y*side + x
				var dist [4]float64
				for k := 0; k < 4; k++ {
					var mx float64 = math.Inf(-1)
					for b := 0; b < 16; b++ {
						mx = math.Max(mx, float64(head[(16*k+b)*hw+pos]))
					}
					var z, e float64
					for b := 0; b < 16; b++ {
						p := math.Exp(float64(head[(16*k+b)*hw+pos]) - mx)
						z += p
						e += p * float64(b)
					}
					dist[k] = e / z
				}
				ax, ay := float64(x)+0.5, float64(y)+0.5
				x1, y1, x2, y2 := ax-dist[0], ay-dist[1], ax+dist[2], ay+dist[3]
				got := []float64{(x1 + x2) / 2 * float64(stride), (y1 + y2) / 2 * float64(stride), (x2 - x1) * float64(stride), (y2 - y1) * float64(stride)}
				for c := 0; c < 80; c++ {
					got = append(got, 1/(1+math.Exp(-float64(head[(64+c)*hw+pos]))))
				}
				for r, g := range got {
					e := math.Abs(g-float64(want[r*n+anchor])) / math.Max(1, math.Abs(g))
					maxErr = math.Max(maxErr, e)
				}
				anchor++
			}
		}
	}
	if maxErr > 1e-4 {
		t.Errorf("host decode differs from output0 by up to %g (relative)", maxErr)
	}
}
