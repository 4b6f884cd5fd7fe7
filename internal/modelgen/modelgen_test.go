package modelgen_test

import (
	"bytes"
	"crypto/sha256"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/visionserve/visionserve/internal/modelgen"
	"github.com/visionserve/visionserve/pkg/onnx"
	"google.golang.org/protobuf/proto"
)

// built caches one generation per model (seed 1) for the tests that only
// read it; building ResNet-50 and YOLOv8s takes seconds each.
type built struct {
	once sync.Once
	m    *onnx.ModelProto
	data []byte
	err  error
}

var cache sync.Map // model name -> *built

// model returns the seed-1 model and its serialised bytes.
func model(t testing.TB, name string) (*onnx.ModelProto, []byte) {
	t.Helper()
	v, _ := cache.LoadOrStore(name, &built{})
	b := v.(*built)
	b.once.Do(func() {
		b.m, b.err = modelgen.Build(name, 1)
		if b.err == nil {
			b.data, b.err = modelgen.Marshal(b.m)
		}
	})
	if b.err != nil {
		t.Fatal(b.err)
	}
	return b.m, b.data
}

// spec is what a model must look like; the parameter counts are the
// published (unfused) counts minus one per BatchNorm channel.
var specs = []struct {
	name          string
	params        int64
	input, output string
	inShape       []int64
	outShape      []int64
	convs         int
	ops           []string
}{
	{"mobilenetv3_large", 5_470_832, "images", "logits", []int64{-1, 3, 224, 224}, []int64{-1, 1000}, 62,
		[]string{"Add", "Conv", "Flatten", "Gemm", "GlobalAveragePool", "HardSigmoid", "HardSwish", "Mul", "Relu"}},
	{"resnet50", 25_530_472, "images", "logits", []int64{-1, 3, 224, 224}, []int64{-1, 1000}, 53,
		[]string{"Add", "Conv", "Flatten", "Gemm", "GlobalAveragePool", "MaxPool", "Relu"}},
	{"yolov8s", 11_156_544, "images", "output0", []int64{-1, 3, 640, 640}, []int64{-1, 84, 8400}, 64,
		[]string{"Add", "Concat", "Constant", "Conv", "Div", "MaxPool", "Mul", "Reshape", "Resize", "Sigmoid", "Slice", "Softmax", "Split", "Sub", "Transpose"}},
}

func TestNames(t *testing.T) {
	var want []string
	for _, s := range specs {
		want = append(want, s.name)
	}
	if got := modelgen.Names(); !reflect.DeepEqual(got, want) {
		t.Errorf("Names() = %v, want %v", got, want)
	}
	if _, err := modelgen.Build("resnet18", 1); err == nil || !strings.Contains(err.Error(), "resnet18") {
		t.Errorf("Build of an unknown model: err = %v", err)
	}
}

func TestModelStructure(t *testing.T) {
	for _, s := range specs {
		t.Run(s.name, func(t *testing.T) {
			m, _ := model(t, s.name)
			g := m.GetGraph()
			if m.GetIrVersion() != 8 || onnx.OpsetVersion(m, "") != 17 || len(m.GetOpsetImport()) != 1 {
				t.Errorf("ir_version %d, opsets %v; want 8 and only ai.onnx 17", m.GetIrVersion(), m.GetOpsetImport())
			}
			if got := onnx.FloatInitializerCount(g); got != s.params {
				t.Errorf("float initializer elements = %d, want %d", got, s.params)
			}
			if len(g.GetInput()) != 1 || g.GetInput()[0].GetName() != s.input || !reflect.DeepEqual(onnx.Shape(g.GetInput()[0]), s.inShape) {
				t.Errorf("inputs = %v, want %s %v", g.GetInput(), s.input, s.inShape)
			}
			if len(g.GetOutput()) != 1 || g.GetOutput()[0].GetName() != s.output || !reflect.DeepEqual(onnx.Shape(g.GetOutput()[0]), s.outShape) {
				t.Errorf("outputs = %v, want %s %v", g.GetOutput(), s.output, s.outShape)
			}
			for _, vi := range []*onnx.ValueInfoProto{g.GetInput()[0], g.GetOutput()[0]} {
				if p := onnx.DimParams(vi)[0]; p != modelgen.BatchDim {
					t.Errorf("%s batch dim_param = %q, want %q", vi.GetName(), p, modelgen.BatchDim)
				}
			}

			// Topological order, unique names, every input defined, every
			// initializer used.
			defined := map[string]bool{s.input: true}
			used := map[string]bool{}
			for _, init := range g.GetInitializer() {
				if defined[init.GetName()] {
					t.Errorf("duplicate initializer %s", init.GetName())
				}
				defined[init.GetName()] = true
			}
			names := map[string]bool{}
			ops := map[string]int{}
			for _, n := range g.GetNode() {
				ops[n.GetOpType()]++
				if names[n.GetName()] {
					t.Errorf("duplicate node name %s", n.GetName())
				}
				names[n.GetName()] = true
				for _, in := range n.GetInput() {
					if in != "" && !defined[in] {
						t.Fatalf("node %s reads %s before it is defined", n.GetName(), in)
					}
					used[in] = true
				}
				for _, o := range n.GetOutput() {
					if defined[o] {
						t.Errorf("value %s defined twice", o)
					}
					defined[o] = true
				}
			}
			if !defined[s.output] {
				t.Errorf("graph output %s is never produced", s.output)
			}
			for _, init := range g.GetInitializer() {
				if !used[init.GetName()] {
					t.Errorf("initializer %s is unused", init.GetName())
				}
			}
			var gotOps []string
			for op := range ops {
				gotOps = append(gotOps, op)
			}
			slices.Sort(gotOps)
			if !reflect.DeepEqual(gotOps, s.ops) {
				t.Errorf("op types = %v, want %v", gotOps, s.ops)
			}
			if ops["Conv"] != s.convs {
				t.Errorf("%d Conv nodes, want %d", ops["Conv"], s.convs)
			}
		})
	}
}

// TestYOLOHead checks the contract the OpenCV engine relies on: the three
// per-level head tensors exist as Concat outputs of the box (64 channel)
// and class (80 channel) convolutions, can be found structurally, and
// cutting there leaves only ops OpenCV 4.6 imports.
func TestYOLOHead(t *testing.T) {
	m, _ := model(t, "yolov8s")
	g := m.GetGraph()
	heads, err := onnx.DetectHeadOutputs(g)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(heads, modelgen.YOLOv8sHeadOutputs) {
		t.Fatalf("DetectHeadOutputs = %v, want %v", heads, modelgen.YOLOv8sHeadOutputs)
	}
	dims := map[string][]int64{}
	for _, init := range g.GetInitializer() {
		dims[init.GetName()] = init.GetDims()
	}
	declared := map[string][]int64{}
	for _, vi := range g.GetValueInfo() {
		declared[vi.GetName()] = onnx.Shape(vi)
	}
	for i, h := range heads {
		cat := onnx.Producer(g, h)
		if cat.GetOpType() != "Concat" || len(cat.GetInput()) != 2 || onnx.Attr(cat, "axis").GetI() != 1 {
			t.Fatalf("head %s produced by %v, want a 2-input Concat on axis 1", h, cat)
		}
		for j, wantC := range []int64{64, 80} {
			conv := onnx.Producer(g, cat.GetInput()[j])
			if conv.GetOpType() != "Conv" || dims[conv.GetInput()[1]][0] != wantC {
				t.Errorf("head %s input %d from %s with weight %v, want a Conv with %d outputs", h, j, conv.GetName(), dims[conv.GetInput()[1]], wantC)
			}
		}
		side := int64(640 / (8 << i))
		if want := []int64{-1, 144, side, side}; !reflect.DeepEqual(declared[h], want) {
			t.Errorf("value_info of %s = %v, want %v", h, declared[h], want)
		}
	}
	sub, err := onnx.Extract(m, heads)
	if err != nil {
		t.Fatal(err)
	}
	allowed := map[string]bool{"Conv": true, "Sigmoid": true, "Mul": true, "Add": true, "Split": true, "Concat": true, "MaxPool": true, "Resize": true, "Constant": true}
	for _, n := range sub.GetGraph().GetNode() {
		if !allowed[n.GetOpType()] {
			t.Errorf("cut graph contains %s (%s)", n.GetOpType(), n.GetName())
		}
	}
	// Everything but the DFL's fixed arange(16) weight is before the cut.
	if got, want := onnx.FloatInitializerCount(sub.GetGraph()), int64(11_156_544-16); got != want {
		t.Errorf("cut graph has %d parameters, want %d", got, want)
	}
	// Anchors and strides are Constant nodes, not initializers.
	var anchorConst bool
	for _, n := range g.GetNode() {
		if n.GetOpType() == "Constant" && reflect.DeepEqual(onnx.Attr(n, "value").GetT().GetDims(), []int64{1, 2, 8400}) {
			anchorConst = true
		}
	}
	if !anchorConst {
		t.Errorf("no Constant node holds the [1, 2, 8400] anchor points")
	}
}

func TestDeterminism(t *testing.T) {
	if testing.Short() {
		t.Skip("rebuilds every model; skipped in -short mode")
	}
	for _, s := range specs {
		t.Run(s.name, func(t *testing.T) {
			_, first := model(t, s.name)
			m, err := modelgen.Build(s.name, 1)
			if err != nil {
				t.Fatal(err)
			}
			again, err := modelgen.Marshal(m)
			if err != nil {
				t.Fatal(err)
			}
			if sha256.Sum256(first) != sha256.Sum256(again) {
				t.Errorf("two generations with seed 1 differ (%d and %d bytes)", len(first), len(again))
			}
		})
	}
	// A different seed must change the weights (MobileNet is the quickest).
	_, one := model(t, "mobilenetv3_large")
	m2, err := modelgen.Build("mobilenetv3_large", 2)
	if err != nil {
		t.Fatal(err)
	}
	two, err := modelgen.Marshal(m2)
	if err != nil {
		t.Fatal(err)
	}
	if sha256.Sum256(one) == sha256.Sum256(two) {
		t.Errorf("seeds 1 and 2 gave identical models")
	}
	if len(one) != len(two) {
		t.Errorf("seed changed the file size: %d vs %d bytes (the graph must not depend on the seed)", len(one), len(two))
	}
}

// TestWriteFile writes every model to a temporary repository and reads it
// back through pkg/onnx.
func TestWriteFile(t *testing.T) {
	root := t.TempDir()
	for _, s := range specs {
		t.Run(s.name, func(t *testing.T) {
			m, data := model(t, s.name)
			dir := filepath.Join(root, s.name)
			if err := os.Mkdir(dir, 0o755); err != nil {
				t.Fatal(err)
			}
			path := filepath.Join(dir, modelgen.FileName)
			// A stale file is replaced.
			if err := os.WriteFile(path, []byte("stale"), 0o644); err != nil {
				t.Fatal(err)
			}
			var progress bytes.Buffer
			if err := modelgen.WriteFile(path, m, &progress); err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(progress.String(), s.name+"/"+modelgen.FileName) || !strings.Contains(progress.String(), "(100%)") {
				t.Errorf("progress output:\n%s", progress.String())
			}
			entries, err := os.ReadDir(dir)
			if err != nil {
				t.Fatal(err)
			}
			if len(entries) != 1 || entries[0].Name() != modelgen.FileName {
				t.Errorf("directory holds %v, want only %s (no temporary files)", entries, modelgen.FileName)
			}
			onDisk, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(onDisk, data) {
				t.Errorf("file differs from Marshal output")
			}
			back, err := onnx.ReadModel(path)
			if err != nil {
				t.Fatal(err)
			}
			if !proto.Equal(back, m) {
				t.Errorf("model read back differs from the one written")
			}
			if got := onnx.FloatInitializerCount(back.GetGraph()); got != s.params {
				t.Errorf("read back %d parameters, want %d", got, s.params)
			}
		})
	}
	m, _ := model(t, "mobilenetv3_large")
	if err := modelgen.WriteFile(filepath.Join(root, "missing", "model.onnx"), m, nil); err == nil {
		t.Errorf("WriteFile into a missing directory succeeded")
	}
}
