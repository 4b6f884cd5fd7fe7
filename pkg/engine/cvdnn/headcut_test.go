package cvdnn

import (
	"context"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/visionserve/visionserve/internal/testenv"
	"github.com/visionserve/visionserve/pkg/engine"
	"github.com/visionserve/visionserve/pkg/engine/onnxrt"
	"github.com/visionserve/visionserve/pkg/onnx"
)

// sharedTestdata returns a file of ../shared/testdata (beside the
// repository root), skipping the test when it is absent.
func sharedTestdata(t testing.TB, rel string) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			break
		}
		if filepath.Dir(dir) == dir {
			t.Fatal("no go.mod above the test directory")
		}
		dir = filepath.Dir(dir)
	}
	p := filepath.Join(dir, "..", "shared", "testdata", rel)
	if _, err := os.Stat(p); err != nil {
		t.Skipf("real test data missing: ../shared/testdata/%s", rel)
	}
	return p
}

func TestFindDetectHead(t *testing.T) {
	tests := []struct {
		name  string
		model *onnx.ModelProto
		want  DetectHead
	}{
		{"combined levels", tinyYOLO(true), DetectHead{Output: "output0", RegMax: 16, NumClasses: 3,
			Levels: []HeadTensors{{Combined: "l1_cat"}, {Combined: "l2_cat"}, {Combined: "l4_cat"}}}},
		{"separate box and class", tinyYOLO(false), DetectHead{Output: "output0", RegMax: 16, NumClasses: 3,
			Levels: []HeadTensors{{Box: "l1_box", Cls: "l1_cls"}, {Box: "l2_box", Cls: "l2_cls"}, {Box: "l4_box", Cls: "l4_cls"}}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := FindDetectHead(tc.model, "")
			if err != nil {
				t.Fatal(err)
			}
			if got.Output != tc.want.Output || got.RegMax != tc.want.RegMax || got.NumClasses != tc.want.NumClasses || !slices.Equal(got.Levels, tc.want.Levels) {
				t.Fatalf("FindDetectHead = %+v, want %+v", got, tc.want)
			}
		})
	}
	for _, tc := range []struct {
		name  string
		model *onnx.ModelProto
	}{{"classifier", tinyClassifier()}, {"unsupported op", unsupportedModel()}, {"empty", &onnx.ModelProto{}}} {
		t.Run("no head/"+tc.name, func(t *testing.T) {
			if h, err := FindDetectHead(tc.model, ""); err == nil {
				t.Fatalf("found a head %+v in a graph without one", h)
			}
		})
	}
}

// The real Ultralytics export (8.4, int8): separate box and class tensors
// per level, wrapped in ConvInteger/Cast/Mul/Add by the quantiser.
func TestFindDetectHeadRealExport(t *testing.T) {
	m, err := onnx.ReadModel(sharedTestdata(t, "models/yolov8n_int8.onnx"))
	if err != nil {
		t.Fatal(err)
	}
	head, err := FindDetectHead(m, "output0")
	if err != nil {
		t.Fatal(err)
	}
	if head.RegMax != 16 || head.NumClasses != 80 || len(head.Levels) != 3 || head.Combined() {
		t.Fatalf("head %+v, want 3 separate levels, reg_max 16, 80 classes", head)
	}
	for i, l := range head.Levels {
		// The structure, not the names, found them; the names confirm it.
		if !strings.Contains(l.Box, "cv2.") || !strings.Contains(l.Cls, "cv3.") || !strings.Contains(l.Box, "."+string(rune('0'+i))) {
			t.Errorf("level %d: box %q class %q are not the cv2/cv3 outputs of level %d", i, l.Box, l.Cls, i)
		}
	}
	cut, err := CutDetectHead(m, head)
	if err != nil {
		t.Fatal(err)
	}
	if len(cut.Graph.Node) >= len(m.Graph.Node) || len(cut.Graph.Initializer) >= len(m.Graph.Initializer) {
		t.Errorf("cut graph keeps %d of %d nodes and %d of %d initializers; the tail was not pruned",
			len(cut.Graph.Node), len(m.Graph.Node), len(cut.Graph.Initializer), len(m.Graph.Initializer))
	}
	for _, n := range cut.Graph.Node {
		if n.GetOpType() == "Softmax" {
			t.Errorf("cut graph still holds the DFL Softmax %q", n.GetName())
		}
	}
}

// The strongest check of the host decode: run the real model's full graph
// on ONNX Runtime, and its cut graph on ONNX Runtime followed by
// DecodeYOLOv8; both must give the same output0.
func TestDecodeMatchesRealModel(t *testing.T) {
	src := sharedTestdata(t, "models/yolov8n_int8.onnx")
	if err := onnxrt.Init(testenv.ORTLib(t)); err != nil {
		t.Fatal(err)
	}
	cutPath, head, err := CutModelFile(src, "output0", t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	full, err := onnxrt.New(src, onnxrt.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer full.Close()
	cut, err := onnxrt.New(cutPath, onnxrt.Options{OutputNames: head.Outputs()})
	if err != nil {
		t.Fatal(err)
	}
	defer cut.Close()

	b := engine.NewBatch(1, 3, 640, 640)
	b.N = 1
	fillScene(b.Slot(0), 640, 640)
	want, err := full.Run(context.Background(), b)
	if err != nil {
		t.Fatal(err)
	}
	heads, err := cut.Run(context.Background(), b)
	if err != nil {
		t.Fatal(err)
	}
	data := make([][]float32, len(heads))
	shapes := make([][]int, len(heads))
	for i, h := range heads {
		data[i] = h.Data
		for _, d := range h.Shape {
			shapes[i] = append(shapes[i], int(d))
		}
	}
	levels, err := head.levels(data, shapes)
	if err != nil {
		t.Fatal(err)
	}
	got := make([]float32, len(want[0].Data))
	if err := DecodeYOLOv8(got, 1, levels, head.RegMax, head.NumClasses, 640, 640); err != nil {
		t.Fatal(err)
	}
	const anchors = 8400
	// The int8 export quantises the DFL softmax (uint8, per tensor) before
	// its expectation conv, so its boxes are off from the float decode by
	// up to a few bins times the stride; the class rows are float sigmoids.
	var boxErr, clsErr float64
	for r := range 84 {
		for a := range anchors {
			d := math.Abs(float64(got[r*anchors+a] - want[0].Data[r*anchors+a]))
			if r < 4 {
				stride := 8.0
				if a >= 6400+1600 {
					stride = 32
				} else if a >= 6400 {
					stride = 16
				}
				boxErr = max(boxErr, d/stride)
			} else {
				clsErr = max(clsErr, d)
			}
		}
	}
	t.Logf("max box error %.3f strides, max class error %.2g", boxErr, clsErr)
	if clsErr > 1e-5 {
		t.Errorf("class scores differ by up to %g", clsErr)
	}
	if boxErr > 0.5 {
		t.Errorf("boxes differ by up to %.3f strides", boxErr)
	}
}

// fillScene draws something with edges into a CHW image in [0,1], so the
// detector's heads see structure rather than a flat field.
func fillScene(img []float32, h, w int) {
	for c := range 3 {
		for y := range h {
			for x := range w {
				v := 0.45 + 0.1*float32(c)
				if (x/80+y/120)%2 == 0 {
					v = 0.2 + 0.05*float32(c)
				}
				if x > w/4 && x < w*3/4 && y > h/3 && y < h*2/3 {
					v = 0.9 - 0.3*float32(c)
				}
				img[(c*h+y)*w+x] = v
			}
		}
	}
}

func TestDecodeYOLOv8(t *testing.T) {
	// One level of 2x1 cells on an input of 16x8 (stride 8), reg_max 2,
	// one class. Cell 0: equal logits, every side 0.5 bins. Cell 1: bin 1
	// certain on every side.
	const hw = 2
	box := make([]float32, 8*hw)
	for side := range 4 {
		box[(side*2+0)*hw+0], box[(side*2+1)*hw+0] = 0, 0
		box[(side*2+0)*hw+1], box[(side*2+1)*hw+1] = -100, 100
	}
	cls := []float32{0, float32(math.Log(3))}
	dst := make([]float32, 5*hw)
	err := DecodeYOLOv8(dst, 1, []Level{{H: 1, W: 2, Box: Plane{Data: box, C: 8}, Cls: Plane{Data: cls, C: 1}}}, 2, 1, 8, 16)
	if err != nil {
		t.Fatal(err)
	}
	want := []float32{
		4, 12, // cx: (0.5, 1.5) cells * 8
		4, 4, // cy
		8, 16, // w: (0.5+0.5, 1+1) * 8
		8, 16, // h
		0.5, 0.75, // sigmoid(0), sigmoid(ln 3)
	}
	for i := range want {
		if math.Abs(float64(dst[i]-want[i])) > 1e-5 {
			t.Fatalf("decoded %v, want %v", dst, want)
		}
	}
	bad := []struct {
		name   string
		levels []Level
		dst    []float32
	}{
		{"short box", []Level{{H: 1, W: 2, Box: Plane{Data: box[:3], C: 8}, Cls: Plane{Data: cls, C: 1}}}, dst},
		{"short dst", []Level{{H: 1, W: 2, Box: Plane{Data: box, C: 8}, Cls: Plane{Data: cls, C: 1}}}, dst[:3]},
		{"offset beyond channels", []Level{{H: 1, W: 2, Box: Plane{Data: box, C: 8, Offset: 4}, Cls: Plane{Data: cls, C: 1}}}, dst},
		{"empty grid", []Level{{H: 0, W: 2, Box: Plane{Data: box, C: 8}, Cls: Plane{Data: cls, C: 1}}}, dst},
		{"no levels", nil, dst},
	}
	for _, tc := range bad {
		t.Run(tc.name, func(t *testing.T) {
			if err := DecodeYOLOv8(tc.dst, 1, tc.levels, 2, 1, 8, 16); err == nil {
				t.Fatal("DecodeYOLOv8 accepted inconsistent sizes")
			}
		})
	}
}

// weightless drops the float values of every initializer, keeping dims.
func weightless(m *onnx.ModelProto) *onnx.ModelProto {
	for _, t := range m.GetGraph().GetInitializer() {
		t.FloatData = nil
	}
	return m
}

// Graphs are outside input: finding and cutting a head must return an
// error, never panic, whatever the bytes.
func FuzzFindDetectHead(f *testing.F) {
	// Seeds (also under testdata/fuzz) are the test graphs without their
	// weights' values: the head finder reads only shapes.
	for _, m := range []*onnx.ModelProto{tinyYOLO(true), tinyYOLO(false), tinyClassifier()} {
		raw, err := proto.Marshal(weightless(m))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(raw)
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		var m onnx.ModelProto
		if proto.Unmarshal(raw, &m) != nil {
			return
		}
		head, err := FindDetectHead(&m, "")
		if err != nil {
			return
		}
		if _, err := CutDetectHead(&m, head); err != nil {
			return
		}
	})
}

// BenchmarkDecodeYOLOv8 is the host side of the OpenCV YOLOv8 path: the
// DFL and sigmoid of one 640x640 image's 8400 anchors and 80 classes.
func BenchmarkDecodeYOLOv8(b *testing.B) {
	const nc, regMax = 80, 16
	var levels []Level
	anchors := 0
	for _, s := range []int{80, 40, 20} {
		data := make([]float32, (4*regMax+nc)*s*s)
		fillScene(data[:min(len(data), 3*s*s)], s, s)
		levels = append(levels, Level{H: s, W: s, Box: Plane{Data: data, C: 4*regMax + nc}, Cls: Plane{Data: data, C: 4*regMax + nc, Offset: 4 * regMax}})
		anchors += s * s
	}
	dst := make([]float32, (4+nc)*anchors)
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()
	for range b.N {
		if err := DecodeYOLOv8(dst, 1, levels, regMax, nc, 640, 640); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(time.Since(start).Microseconds())/1000/float64(b.N), "ms/image")
}

func TestExp32(t *testing.T) {
	// Over the logits a head produces the error is float32 rounding; far
	// out, the float32 product x*log2(e) itself loses digits.
	for _, r := range []struct{ lo, hi, tol float64 }{{-20, 20, 1e-6}, {-87, 88, 2e-5}} {
		worst := 0.0
		for x := r.lo; x <= r.hi; x += 0.00137 {
			want := math.Exp(float64(float32(x)))
			worst = max(worst, math.Abs(float64(exp32(float32(x)))-want)/want)
		}
		if worst > r.tol {
			t.Errorf("exp32 on [%v,%v]: relative error up to %g, want %g", r.lo, r.hi, worst, r.tol)
		}
	}
	if exp32(-100) != 0 || !math.IsInf(float64(exp32(100)), 1) || !math.IsNaN(float64(exp32(float32(math.NaN())))) {
		t.Error("exp32 mishandles the edges")
	}
	if s := sigmoid(-200); s != 0 {
		t.Errorf("sigmoid(-200) = %v", s)
	}
	if s := sigmoid(200); s != 1 {
		t.Errorf("sigmoid(200) = %v", s)
	}
}
