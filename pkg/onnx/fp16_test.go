package onnx

import (
	"math"
	"os"
	"path/filepath"
	"testing"

	"google.golang.org/protobuf/proto"
)

func TestFloat16Bits(t *testing.T) {
	for _, c := range []struct {
		f    float32
		want uint16
	}{
		{0, 0}, {1, 0x3c00}, {-2, 0xc000}, {65504, 0x7bff}, {1e6, 0x7bff}, {-1e6, 0xfbff},
		{float32(math.Inf(1)), 0x7bff}, {6.103515625e-05, 0x0400}, {5.960464477539063e-08, 0x0001},
		{1e-9, 0}, {0.1, 0x2e66}, {1 + 1.0/2048, 0x3c00}, // a tie rounds to even
		{1 + 3.0/2048, 0x3c02},
	} {
		if got := Float16Bits(c.f); got != c.want {
			t.Errorf("Float16Bits(%g) = %#04x, want %#04x", c.f, got, c.want)
		}
	}
	if h := Float16Bits(float32(math.NaN())); h&0x7c00 != 0x7c00 || h&0x3ff == 0 {
		t.Errorf("NaN became %#04x", h)
	}
	// Every finite half survives the round trip.
	for h := range 1 << 16 {
		if h&0x7c00 == 0x7c00 {
			continue
		}
		if got := Float16Bits(Float16Value(uint16(h))); got != uint16(h) {
			t.Fatalf("half %#04x -> %g -> %#04x", h, Float16Value(uint16(h)), got)
		}
	}
}

func FuzzFloat16Bits(f *testing.F) {
	f.Add(float32(0.1))
	f.Add(float32(65519))
	f.Fuzz(func(t *testing.T, v float32) {
		if math.IsNaN(float64(v)) {
			return
		}
		r := Float16Value(Float16Bits(v))
		if math.Abs(float64(v)) <= 65504 && math.Abs(float64(r-v)) > math.Max(math.Abs(float64(v))/1024, 3e-8) {
			t.Fatalf("%g rounded to %g", v, r)
		}
	})
}

func TestToFP16Graph(t *testing.T) {
	f32 := int32(TensorProto_FLOAT)
	vi := func(name string, elem int32) *ValueInfoProto {
		return &ValueInfoProto{Name: name, Type: &TypeProto{Value: &TypeProto_TensorType{TensorType: &TypeProto_Tensor{ElemType: elem}}}}
	}
	m := &ModelProto{Graph: &GraphProto{
		Input:       []*ValueInfoProto{vi("x", f32)},
		Output:      []*ValueInfoProto{vi("y", f32)},
		Initializer: []*TensorProto{{Name: "w", DataType: f32, Dims: []int64{2}, FloatData: []float32{0.1, 70000}}, {Name: "scales", DataType: f32, Dims: []int64{1}, FloatData: []float32{2}}},
		Node: []*NodeProto{
			{OpType: "Mul", Input: []string{"x", "w"}, Output: []string{"a"}},
			{OpType: "Resize", Input: []string{"a", "", "scales"}, Output: []string{"r"}},
			{OpType: "Cast", Input: []string{"r"}, Output: []string{"c"}, Attribute: []*AttributeProto{{Name: "to", Type: AttributeProto_INT, I: ptr(int64(f32))}}},
			{OpType: "Softmax", Input: []string{"c"}, Output: []string{"y"}},
		},
	}}
	h, err := ToFP16(m, nil)
	if err != nil {
		t.Fatal(err)
	}
	var ops []string
	for _, n := range h.GetGraph().GetNode() {
		op := n.GetOpType()
		if op == "Cast" {
			op += map[int64]string{1: "32", 10: "16"}[Attr(n, "to").GetI()]
		}
		ops = append(ops, op)
	}
	// x cast down; Mul in fp16; Resize's inputs cast up and its output
	// down; the model's own Cast to float now to float16; Softmax in
	// fp32 writes y, cast down and back up for the graph output.
	want := "Cast16 Mul Cast32 Cast32 Resize Cast16 Cast16 Cast32 Softmax Cast16 Cast32"
	if got := join(ops); got != want {
		t.Errorf("nodes %s\nwant  %s", got, want)
	}
	for _, init := range h.GetGraph().GetInitializer() {
		if init.GetDataType() != int32(TensorProto_FLOAT16) || len(init.GetRawData()) != 2*int(NumElements(init)) {
			t.Errorf("initializer %s: type %d, %d raw bytes", init.GetName(), init.GetDataType(), len(init.GetRawData()))
		}
	}
	if w := h.GetGraph().GetInitializer()[0].GetRawData(); Float16Value(uint16(w[2])|uint16(w[3])<<8) != 65504 {
		t.Error("70000 not clamped to 65504")
	}
	if h.GetGraph().GetInput()[0].GetType().GetTensorType().GetElemType() != f32 || h.GetGraph().GetOutput()[0].GetName() != "y" {
		t.Error("the model's interface changed")
	}
	if m.GetGraph().GetInitializer()[0].GetDataType() != f32 {
		t.Error("ToFP16 changed its argument")
	}
	if _, err := ToFP16(h, nil); err == nil {
		t.Error("a float16 model converted twice")
	}
	sub := &ModelProto{Graph: &GraphProto{Node: []*NodeProto{{OpType: "If", Attribute: []*AttributeProto{{Name: "then_branch", G: &GraphProto{}}}}}}}
	if _, err := ToFP16(sub, nil); err == nil {
		t.Error("a graph with a subgraph converted")
	}
}

func ptr[T any](v T) *T { return &v }

func join(s []string) string {
	out := ""
	for i, x := range s {
		if i > 0 {
			out += " "
		}
		out += x
	}
	return out
}

func TestConvertFileFP16(t *testing.T) {
	dir := t.TempDir()
	m := &ModelProto{Graph: &GraphProto{Initializer: []*TensorProto{{Name: "w", DataType: int32(TensorProto_FLOAT), Dims: []int64{1}, FloatData: []float32{3}}}}}
	raw, _ := proto.Marshal(m)
	src := filepath.Join(dir, "m.onnx")
	if err := os.WriteFile(src, raw, 0o644); err != nil {
		t.Fatal(err)
	}
	cache := filepath.Join(dir, "cache")
	a, err := ConvertFileFP16(src, cache)
	if err != nil {
		t.Fatal(err)
	}
	b, err := ConvertFileFP16(src, cache)
	if err != nil || a != b {
		t.Fatalf("second conversion %q %v, want the cached %q", b, err, a)
	}
	h, err := ReadModel(a)
	if err != nil || h.GetGraph().GetInitializer()[0].GetDataType() != int32(TensorProto_FLOAT16) {
		t.Fatalf("converted file: %v", err)
	}
	if _, err := ConvertFileFP16(filepath.Join(dir, "missing.onnx"), cache); err == nil {
		t.Error("a missing file converted")
	}
}

func TestCacheDirWithoutAHome(t *testing.T) {
	t.Setenv("XDG_CACHE_HOME", "")
	tmp := t.TempDir()
	// A home no folder can be made under, even by root: a file.
	notDir := filepath.Join(tmp, "file")
	if err := os.WriteFile(notDir, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Setenv("HOME", notDir)
	t.Setenv("TMPDIR", tmp)
	if got := CacheDir("x"); got != filepath.Join(tmp, "visionserve-x") {
		t.Errorf("CacheDir with an unwritable home = %q, want the temporary folder", got)
	}
	home := t.TempDir()
	t.Setenv("HOME", home)
	if got := CacheDir("x"); got != filepath.Join(home, ".cache", "visionserve", "x") {
		t.Errorf("CacheDir = %q, want under the home's cache", got)
	}
}
