package cvdnn

import (
	"context"
	"math"
	"slices"
	"strings"
	"testing"

	"github.com/visionserve/visionserve/internal/testenv"
	"github.com/visionserve/visionserve/pkg/engine"
	"github.com/visionserve/visionserve/pkg/engine/onnxrt"
	"github.com/visionserve/visionserve/pkg/onnx"
)

func fillPattern(data []float32, seed uint32) {
	x := seed*2654435761 + 1
	for i := range data {
		x ^= x << 13
		x ^= x >> 17
		x ^= x << 5
		data[i] = float32(x%1000) / 1000
	}
}

func maxDiff(a, b []float32) float64 {
	if len(a) != len(b) {
		return math.Inf(1)
	}
	var d float64
	for i := range a {
		d = max(d, math.Abs(float64(a[i]-b[i])))
	}
	return d
}

// ortReference runs the model on ONNX Runtime: the full graph for a
// classifier; for a detector the cut graph followed by the host decode,
// since the tiny test detectors have a stand-in tail.
func ortReference(t *testing.T, path string, outputs []string, b *engine.Batch) [][]float32 {
	t.Helper()
	if err := onnxrt.Init(testenv.ORTLib(t)); err != nil {
		t.Fatal(err)
	}
	e, err := onnxrt.New(path, onnxrt.Options{OutputNames: outputs})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	outs, err := e.Run(context.Background(), b)
	if err != nil {
		t.Fatal(err)
	}
	var res [][]float32
	for _, o := range outs {
		res = append(res, append([]float32(nil), o.Data...))
	}
	return res
}

func TestClassifierMatchesORT(t *testing.T) {
	path := writeModel(t, tinyClassifier(), "tiny_cls.onnx")
	e, err := New(context.Background(), path, Options{MaxBatch: 4})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	if e.Backend() != "opencv" || e.Head() != nil {
		t.Fatalf("Backend %q head %v, want opencv without a cut", e.Backend(), e.Head())
	}
	b := engine.NewBatch(4, 3, 32, 32)
	for i := range 4 {
		fillPattern(b.Slot(i), uint32(i))
	}
	for _, n := range []int{1, 4, 1} {
		b.N = n
		got, err := e.Run(context.Background(), b)
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != 1 || got[0].Name != "scores" || len(got[0].Shape) != 2 || got[0].Shape[0] != int64(n) || got[0].Shape[1] != 5 {
			t.Fatalf("batch %d: outputs %+v, want one [%d,5] tensor named scores", n, got, n)
		}
		want := ortReference(t, path, nil, b)
		if d := maxDiff(got[0].Data, want[0]); d > 1e-4 {
			t.Errorf("batch %d: OpenCV and ONNX Runtime differ by %g", n, d)
		}
	}
}

// A YOLOv8-shaped graph is cut at its head on OpenCV and decoded on the
// host; the result equals ONNX Runtime on the same cut graph plus the same
// decode, for both export structures and at batch 1 and 2.
func TestDetectorCutMatchesORT(t *testing.T) {
	for _, combined := range []bool{true, false} {
		name := map[bool]string{true: "combined", false: "separate"}[combined]
		t.Run(name, func(t *testing.T) {
			path := writeModel(t, tinyYOLO(combined), "tiny_yolo.onnx")
			cache := t.TempDir()
			e, err := New(context.Background(), path, Options{CacheDir: cache, MaxBatch: 2})
			if err != nil {
				t.Fatal(err)
			}
			defer e.Close()
			head := e.Head()
			if head == nil || head.Combined() != combined {
				t.Fatalf("head %+v, want a cut graph (combined=%v)", head, combined)
			}
			b := engine.NewBatch(2, 3, tinySize, tinySize)
			fillPattern(b.Slot(0), 1)
			fillPattern(b.Slot(1), 2)
			for _, n := range []int{2, 1} {
				b.N = n
				got, err := e.Run(context.Background(), b)
				if err != nil {
					t.Fatal(err)
				}
				const anchors = 8*8 + 4*4 + 2*2
				if len(got) != 1 || got[0].Name != "output0" || !equal64(got[0].Shape, []int64{int64(n), 4 + tinyClasses, anchors}) {
					t.Fatalf("outputs %v, want one [%d,%d,%d] output0", got[0].Shape, n, 4+tinyClasses, anchors)
				}
				heads := ortReference(t, e.path, head.Outputs(), b)
				var shapes [][]int
				for i := range heads {
					side := tinySize / []int{8, 16, 32}[i%3]
					c := 4*tinyRegMax + tinyClasses
					if !combined {
						c = []int{4 * tinyRegMax, tinyClasses}[i/3]
					}
					shapes = append(shapes, []int{n, c, side, side})
				}
				levels, err := head.levels(heads, shapes)
				if err != nil {
					t.Fatal(err)
				}
				want := make([]float32, n*(4+tinyClasses)*anchors)
				if err := DecodeYOLOv8(want, n, levels, tinyRegMax, tinyClasses, tinySize, tinySize); err != nil {
					t.Fatal(err)
				}
				// Boxes are in input pixels: a hundredth of a pixel is
				// float rounding of two runtimes; scores are probabilities.
				for img := range n {
					for r := range 4 + tinyClasses {
						row := (img*(4+tinyClasses) + r) * anchors
						d := maxDiff(got[0].Data[row:row+anchors], want[row:row+anchors])
						if tol := map[bool]float64{true: 1e-2, false: 1e-3}[r < 4]; d > tol {
							t.Errorf("batch %d image %d row %d: OpenCV and ONNX Runtime differ by %g (tolerance %g)", n, img, r, d, tol)
						}
					}
				}
			}
		})
	}
}

func equal64(a, b []int64) bool {
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

func TestEngineErrors(t *testing.T) {
	ctx := context.Background()
	if _, err := New(ctx, writeModel(t, unsupportedModel(), "unsupported.onnx"), Options{}); err == nil || !strings.Contains(err.Error(), "unsupported.onnx") {
		t.Fatalf("New on an unsupported graph: %v, want an error naming the model", err)
	}
	path := writeModel(t, tinyClassifier(), "tiny_cls.onnx")
	if _, err := New(ctx, path, Options{InputName: "images"}); err == nil || !strings.Contains(err.Error(), `no input named "images"`) {
		t.Fatalf("New with a wrong input name: %v", err)
	}
	if _, err := New(ctx, path, Options{OutputNames: []string{"logits"}}); err == nil || !strings.Contains(err.Error(), `no output named "logits"`) {
		t.Fatalf("New with a wrong output name: %v", err)
	}
	e, err := New(ctx, path, Options{MaxBatch: 2})
	if err != nil {
		t.Fatal(err)
	}
	good := engine.NewBatch(4, 3, 32, 32)
	tests := []struct {
		name  string
		batch *engine.Batch
		want  string
	}{
		{"nil", nil, "nil batch"},
		{"empty", &engine.Batch{N: 0, Cap: 4, C: 3, H: 32, W: 32, Data: good.Data}, "want 1..4"},
		{"wrong size", &engine.Batch{N: 1, Cap: 1, C: 3, H: 64, W: 64, Data: make([]float32, 3*64*64)}, "model input is 3x32x32"},
		{"short buffer", &engine.Batch{N: 2, Cap: 4, C: 3, H: 32, W: 32, Data: good.Data[:10]}, "need"},
		{"over max batch", &engine.Batch{N: 3, Cap: 4, C: 3, H: 32, W: 32, Data: good.Data}, "probed maximum 2"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := e.Run(ctx, tc.batch); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Run: %v, want an error containing %q", err, tc.want)
			}
		})
	}
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	good.N = 1
	if _, err := e.Run(cancelled, good); err == nil {
		t.Error("Run with a cancelled context succeeded")
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	if err := e.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if _, err := e.Run(ctx, good); err == nil || !strings.Contains(err.Error(), "closed") {
		t.Fatalf("Run after Close: %v", err)
	}
}

// OpenCV 4.6 fails a squeeze-excite product above batch 1; the engine
// finds that out in the probe and runs such batches image by image, with
// the same results as ONNX Runtime. A second instance takes the probe
// outcome from the cache even when told to skip probing.
func TestPerImageFallback(t *testing.T) {
	path := writeModel(t, squeezeExcite(), "tiny_se.onnx")
	for instance := range 2 {
		e, err := New(context.Background(), path, Options{MaxBatch: 3, SkipProbe: instance > 0})
		if err != nil {
			t.Fatal(err)
		}
		defer e.Close()
		if !e.PerImage() {
			t.Fatalf("instance %d: PerImage() = false; the probe should have found batch 3 failing", instance)
		}
		b := engine.NewBatch(3, 3, 16, 16)
		b.N = 3
		for i := range 3 {
			fillPattern(b.Slot(i), uint32(10+i))
		}
		got, err := e.Run(context.Background(), b)
		if err != nil {
			t.Fatal(err)
		}
		if !equal64(got[0].Shape, []int64{3, 4}) {
			t.Fatalf("shape %v, want [3 4]", got[0].Shape)
		}
		want := ortReference(t, path, nil, b)
		if d := maxDiff(got[0].Data, want[0]); d > 1e-4 {
			t.Errorf("instance %d: OpenCV per image and ONNX Runtime batched differ by %g", instance, d)
		}
	}
}

// A model whose zero-valued attributes carry no value (a proto3 writer's)
// would abort OpenCV's importer; the engine rewrites it with the values
// and runs it.
func TestAttributesWithoutPresence(t *testing.T) {
	path := writeModel(t, withoutPresence(maxPoolNet()), "tiny_pool.onnx")
	if err := Probe(context.Background(), path); err == nil || !strings.Contains(err.Error(), "ceil_mode") {
		t.Fatalf("OpenCV on the model as written: %v, want the ceil_mode import failure this test is about", err)
	}
	cache := t.TempDir()
	e, err := New(context.Background(), path, Options{CacheDir: cache})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	if e.path == path {
		t.Error("the model was not rewritten for OpenCV")
	}
	b := engine.NewBatch(1, 3, 16, 16)
	b.N = 1
	fillPattern(b.Data, 5)
	got, err := e.Run(context.Background(), b)
	if err != nil {
		t.Fatal(err)
	}
	want := ortReference(t, path, nil, b)
	if d := maxDiff(got[0].Data, want[0]); d > 1e-4 {
		t.Errorf("OpenCV and ONNX Runtime differ by %g", d)
	}
	// A model that carries its values is loaded as it is.
	plain := writeModel(t, maxPoolNet(), "plain.onnx")
	e2, err := New(context.Background(), plain, Options{CacheDir: cache})
	if err != nil {
		t.Fatal(err)
	}
	defer e2.Close()
	if e2.path != plain {
		t.Errorf("a well-formed model was rewritten to %s", e2.path)
	}
}

// An export that fixes its batch at 1 still serves batches, image by image.
func TestFixedBatchOne(t *testing.T) {
	path := writeModel(t, tinyClassifierBatch(1), "tiny_cls_b1.onnx")
	e, err := New(context.Background(), path, Options{MaxBatch: 4})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	if !e.PerImage() {
		t.Error("PerImage() = false for a batch-1 graph")
	}
	b := engine.NewBatch(3, 3, 32, 32)
	b.N = 3
	for i := range 3 {
		fillPattern(b.Slot(i), uint32(20+i))
	}
	got, err := e.Run(context.Background(), b)
	if err != nil {
		t.Fatal(err)
	}
	want := ortReference(t, path, nil, b)
	if !equal64(got[0].Shape, []int64{3, 5}) || maxDiff(got[0].Data, want[0]) > 1e-4 {
		t.Fatalf("shape %v, difference %g from ONNX Runtime", got[0].Shape, maxDiff(got[0].Data, want[0]))
	}
	if _, err := New(context.Background(), path, Options{OutputNames: []string{}}); err == nil {
		t.Error("New with no outputs succeeded")
	}
}

// SiLU written as x·Sigmoid(x) is fused into single Swish nodes for
// OpenCV, except where the Sigmoid is needed elsewhere; the result equals
// ONNX Runtime on the original graph.
func TestSiLUFusion(t *testing.T) {
	m := siluNet()
	if n := fuseSiLU(m.GetGraph()); n != 2 {
		t.Fatalf("fused %d products, want 2 (the third Sigmoid has two consumers)", n)
	}
	ops := map[string]int{}
	for _, n := range m.GetGraph().GetNode() {
		ops[n.GetOpType()]++
	}
	if ops["Swish"] != 2 || ops["Sigmoid"] != 1 || ops["Mul"] != 1 {
		t.Errorf("ops after fusion %v, want 2 Swish, 1 Sigmoid, 1 Mul", ops)
	}

	path := writeModel(t, siluNet(), "tiny_silu.onnx")
	checkAgainstORT(t, path, 9, "fused graph on OpenCV and original on ONNX Runtime")
}

// identityNet is a small net as torch.onnx.export writes a shared weight:
// the second use of an initializer goes through Identity nodes (here a
// chain of two), and a graph output is the Identity of one.
func identityNet() *onnx.ModelProto {
	b := newGraph("tiny_identity")
	b.g.Input = []*onnx.ValueInfoProto{valueInfo("x", -1, 3, 16, 16)}
	w := b.weights("c1.w", 3, 3, 3, 3)
	bias := b.weights("c1.b", 3)
	c1 := b.node("Conv", "c1", []string{"x", w, bias}, intsAttr("kernel_shape", 3, 3), intsAttr("pads", 1, 1, 1, 1))
	w2 := b.node("Identity", "w.shared", []string{w})
	w3 := b.node("Identity", "w.shared2", []string{w2})
	c2 := b.node("Conv", "c2", []string{c1, w3, bias}, intsAttr("kernel_shape", 3, 3), intsAttr("pads", 1, 1, 1, 1))
	b.node("Relu", "y", []string{c2})
	b.g.Output = []*onnx.ValueInfoProto{valueInfo("y", -1, 3, 16, 16)}
	return b.model()
}

// TestIdentityFolding: Identity nodes on initializers are folded away,
// chains included, and the folded graph on OpenCV equals the original on
// ONNX Runtime.
func TestIdentityFolding(t *testing.T) {
	m := identityNet()
	// A graph output that is the Identity of a weight keeps its name.
	m.Graph.Node = append(m.Graph.Node, &onnx.NodeProto{OpType: "Identity", Input: []string{"c1.b"}, Output: []string{"bias.out"}})
	m.Graph.Output = append(m.Graph.Output, valueInfo("bias.out", 3))
	if n := foldIdentityInitializers(m.GetGraph()); n != 3 {
		t.Fatalf("folded %d Identity nodes, want 3", n)
	}
	for _, n := range m.GetGraph().GetNode() {
		if n.GetOpType() == "Identity" {
			t.Errorf("Identity %v left", n.GetOutput())
		}
		if n.GetOutput()[0] == "c2" && n.GetInput()[1] != "c1.w" {
			t.Errorf("c2 reads weight %q, want c1.w", n.GetInput()[1])
		}
	}
	found := false
	for _, init := range m.GetGraph().GetInitializer() {
		found = found || init.GetName() == "bias.out"
	}
	if !found {
		t.Error("the graph output bias.out lost its value")
	}
	// An Identity of a computed value stays.
	g := &onnx.GraphProto{Node: []*onnx.NodeProto{{OpType: "Identity", Input: []string{"x"}, Output: []string{"y"}}}}
	if n := foldIdentityInitializers(g); n != 0 || len(g.Node) != 1 {
		t.Errorf("folded an Identity of a graph input")
	}

	path := writeModel(t, identityNet(), "tiny_identity.onnx")
	checkAgainstORT(t, path, 5, "folded graph on OpenCV and original on ONNX Runtime")
}

// chunkNet splits a convolution's 4 channels in two halves the way
// torch.onnx.export writes Tensor.chunk(2, 1): the split point is shape
// arithmetic on Shape(x)[1].
func chunkNet() *onnx.ModelProto {
	b := newGraph("tiny_chunk")
	b.g.Input = []*onnx.ValueInfoProto{valueInfo("x", -1, 3, 16, 16)}
	c1 := b.node("Conv", "c1", []string{"x", b.weights("c1.w", 4, 3, 3, 3), b.weights("c1.b", 4)}, intsAttr("kernel_shape", 3, 3), intsAttr("pads", 1, 1, 1, 1))
	s := b.node("Shape", "s", []string{c1})
	g := b.node("Gather", "g", []string{s, b.ints("one", 1)})
	a := b.node("Add", "a", []string{g, b.ints("plus", 1)})
	d := b.node("Div", "d", []string{a, b.ints("two", 2)})
	m1 := b.node("Mul", "m1", []string{d, b.ints("times1", 1)})
	m2 := b.node("Mul", "m2", []string{d, b.ints("times2", 2)})
	lo := b.node("Slice", "lo", []string{c1, b.ints("zero", 0), m1, b.ints("axis", 1)})
	hi := b.node("Slice", "hi", []string{c1, m1, m2, "axis"})
	b.node("Add", "y", []string{lo, hi})
	b.g.Output = []*onnx.ValueInfoProto{valueInfo("y", -1, 2, 16, 16)}
	return b.model()
}

// TestChannelArithmeticFolding: the chunk arithmetic becomes constants
// (the split at channel 2), and the folded graph on OpenCV equals the
// original on ONNX Runtime.
func TestChannelArithmeticFolding(t *testing.T) {
	m := chunkNet()
	if n := foldChannelArithmetic(m.GetGraph()); n != 5 {
		t.Fatalf("folded %d nodes, want 5 (Gather, Add, Div and two Mul)", n)
	}
	var ops []string
	for _, n := range m.GetGraph().GetNode() {
		ops = append(ops, n.GetOpType())
	}
	if !slices.Equal(ops, []string{"Conv", "Slice", "Slice", "Add"}) {
		t.Errorf("nodes after folding %v", ops)
	}
	for _, init := range m.GetGraph().GetInitializer() {
		if init.GetName() == "m1" {
			if v, _ := onnx.Int64s(init); !slices.Equal(v, []int64{2}) {
				t.Errorf("split point %v, want [2]", v)
			}
		}
	}
	// Unknown channels (a graph input) are left alone.
	b := newGraph("unknown")
	b.g.Input = []*onnx.ValueInfoProto{valueInfo("x", -1, -1, 8, 8)}
	s := b.node("Shape", "s", []string{"x"})
	b.node("Gather", "g", []string{s, b.ints("one", 1)})
	if n := foldChannelArithmetic(&b.g); n != 0 {
		t.Errorf("folded %d nodes of a graph input's shape", n)
	}

	path := writeModel(t, chunkNet(), "tiny_chunk.onnx")
	if err := Probe(context.Background(), path); err == nil {
		t.Error("OpenCV imports the chunk arithmetic as written; the rewrite this test is about is not needed")
	}
	checkAgainstORT(t, path, 11, "folded graph on OpenCV and original on ONNX Runtime")
}

// checkAgainstORT runs the model at path (a [N,3,16,16] input) on OpenCV,
// after its rewrites, and on ONNX Runtime as written, on a batch of two
// patterned images, and fails when the outputs differ by more than 1e-4;
// what names the comparison in the failure.
func checkAgainstORT(t *testing.T, path string, seed uint32, what string) {
	t.Helper()
	e, err := New(context.Background(), path, Options{CacheDir: t.TempDir(), MaxBatch: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	b := engine.NewBatch(2, 3, 16, 16)
	b.N = 2
	fillPattern(b.Data, seed)
	got, err := e.Run(context.Background(), b)
	if err != nil {
		t.Fatal(err)
	}
	want := ortReference(t, path, nil, b)
	if d := maxDiff(got[0].Data, want[0]); d > 1e-4 {
		t.Errorf("%s differ by %g", what, d)
	}
}
