package onnx

import (
	"encoding/binary"
	"math"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"
)

// testdataModels is where the real reference exports live; they are never
// copied into the repository.
func testdataModels(t *testing.T) string {
	t.Helper()
	dir := os.Getenv("VISIONSERVE_TESTDATA_MODELS")
	if dir == "" {
		dir = "/work/shared/testdata/models"
	}
	if _, err := os.Stat(dir); err != nil {
		t.Skipf("reference models folder %s absent (set VISIONSERVE_TESTDATA_MODELS): %v", dir, err)
	}
	return dir
}

// TestReadRealModels parses real exports written by other tools, which is
// the check that our field numbers match the published schema.
func TestReadRealModels(t *testing.T) {
	dir := testdataModels(t)
	tests := []struct {
		file                string
		opset               int64
		input, output       string
		inShape, outShape   []int64
		batchParam          string
		wantInitializerType TensorProto_DataType
	}{
		{"yolov8n_int8.onnx", 20, "images", "output0", []int64{1, 3, 640, 640}, []int64{1, 84, 8400}, "", TensorProto_UINT8},
		{"mobilenetv2-12-int8.onnx", 12, "input", "output", []int64{-1, 3, 224, 224}, []int64{-1, 1000}, "batch_size", TensorProto_UINT8},
	}
	for _, tc := range tests {
		t.Run(tc.file, func(t *testing.T) {
			m, err := ReadModel(filepath.Join(dir, tc.file))
			if err != nil {
				t.Fatal(err)
			}
			if got := OpsetVersion(m, ""); got != tc.opset {
				t.Errorf("opset = %d, want %d", got, tc.opset)
			}
			g := m.GetGraph()
			if len(g.GetInput()) != 1 || g.GetInput()[0].GetName() != tc.input {
				t.Fatalf("inputs = %v, want [%s]", g.GetInput(), tc.input)
			}
			if len(g.GetOutput()) != 1 || g.GetOutput()[0].GetName() != tc.output {
				t.Fatalf("outputs = %v, want [%s]", g.GetOutput(), tc.output)
			}
			if got := Shape(g.GetInput()[0]); !reflect.DeepEqual(got, tc.inShape) {
				t.Errorf("input shape = %v, want %v", got, tc.inShape)
			}
			if got := Shape(g.GetOutput()[0]); !reflect.DeepEqual(got, tc.outShape) {
				t.Errorf("output shape = %v, want %v", got, tc.outShape)
			}
			if got := DimParams(g.GetInput()[0])[0]; got != tc.batchParam {
				t.Errorf("batch dim_param = %q, want %q", got, tc.batchParam)
			}
			if g.GetInput()[0].GetType().GetTensorType().GetElemType() != int32(TensorProto_FLOAT) {
				t.Errorf("input elem type = %d, want FLOAT", g.GetInput()[0].GetType().GetTensorType().GetElemType())
			}
			// Every tensor's payload must agree with its dims, which
			// exercises dims, data_type and raw_data together.
			sizes := map[TensorProto_DataType]int64{TensorProto_FLOAT: 4, TensorProto_INT64: 8, TensorProto_UINT8: 1, TensorProto_INT8: 1, TensorProto_INT32: 4}
			seen := map[TensorProto_DataType]int{}
			for _, init := range g.GetInitializer() {
				dt := TensorProto_DataType(init.GetDataType())
				seen[dt]++
				size, ok := sizes[dt]
				if !ok || init.GetRawData() == nil {
					continue
				}
				if int64(len(init.GetRawData())) != size*NumElements(init) {
					t.Errorf("initializer %s: %d raw bytes for dims %v of %s", init.GetName(), len(init.GetRawData()), init.GetDims(), dt)
				}
			}
			if seen[tc.wantInitializerType] == 0 {
				t.Errorf("no %s initializers; saw %v", tc.wantInitializerType, seen)
			}
			for _, n := range g.GetNode() {
				if n.GetOpType() == "" || len(n.GetOutput()) == 0 {
					t.Fatalf("node %q has no op_type or outputs", n.GetName())
				}
				for _, a := range n.GetAttribute() {
					if a.GetType() == AttributeProto_UNDEFINED {
						t.Errorf("node %s attribute %s has no type", n.GetName(), a.GetName())
					}
				}
			}
		})
	}
}

// TestRealYOLOv8nExport checks facts about the Ultralytics export that the
// generator mimics: SiLU as Sigmoid+Mul, nearest Resize with a scales
// input, and a 16-bin DFL softmax.
func TestRealYOLOv8nExport(t *testing.T) {
	m, err := ReadModel(filepath.Join(testdataModels(t), "yolov8n_int8.onnx"))
	if err != nil {
		t.Fatal(err)
	}
	g := m.GetGraph()
	var resize, softmax *NodeProto
	for _, n := range g.GetNode() {
		switch n.GetOpType() {
		case "Resize":
			resize = n
		case "Softmax":
			softmax = n
		}
	}
	if resize == nil || softmax == nil {
		t.Fatalf("missing Resize (%v) or Softmax (%v)", resize != nil, softmax != nil)
	}
	if got := string(Attr(resize, "mode").GetS()); got != "nearest" {
		t.Errorf("Resize mode = %q, want nearest", got)
	}
	if len(resize.GetInput()) != 3 || resize.GetInput()[1] != "" {
		t.Errorf("Resize inputs = %q, want (x, \"\", scales)", resize.GetInput())
	}
	if got := axisOf(softmax); got != 1 {
		t.Errorf("DFL Softmax axis = %d, want 1", got)
	}
	mul := Consumers(g, "/model.0/act/Sigmoid_output_0")
	if len(mul) != 1 || mul[0].GetOpType() != "Mul" {
		t.Errorf("first SiLU Sigmoid feeds %v, want one Mul", mul)
	}
	// This 8.4 export reshapes cv2 and cv3 separately, so the classic
	// per-level Concat pattern is absent and the finder must say so.
	if _, err := DetectHeadOutputs(g); err == nil {
		t.Errorf("DetectHeadOutputs matched an export without per-level concats")
	}
}

func TestTensorDecoding(t *testing.T) {
	raw := make([]byte, 12)
	for i, v := range []float32{1.5, -2, float32(math.Pi)} {
		binary.LittleEndian.PutUint32(raw[4*i:], math.Float32bits(v))
	}
	raw64 := make([]byte, 16)
	binary.LittleEndian.PutUint64(raw64, uint64(1<<40))
	binary.LittleEndian.PutUint64(raw64[8:], uint64(math.MaxUint64)) // -1
	tests := []struct {
		name    string
		t       *TensorProto
		floats  []float32
		ints    []int64
		wantErr bool
	}{
		{"raw floats", &TensorProto{Dims: []int64{3}, DataType: int32(TensorProto_FLOAT), RawData: raw}, []float32{1.5, -2, float32(math.Pi)}, nil, false},
		{"float_data", &TensorProto{Dims: []int64{1, 2}, DataType: int32(TensorProto_FLOAT), FloatData: []float32{7, 8}}, []float32{7, 8}, nil, false},
		{"raw short", &TensorProto{Dims: []int64{4}, DataType: int32(TensorProto_FLOAT), RawData: raw}, nil, nil, true},
		{"float_data short", &TensorProto{Dims: []int64{3}, DataType: int32(TensorProto_FLOAT), FloatData: []float32{7}}, nil, nil, true},
		{"raw int64", &TensorProto{Dims: []int64{2}, DataType: int32(TensorProto_INT64), RawData: raw64}, nil, []int64{1 << 40, -1}, false},
		{"int64_data scalar", &TensorProto{DataType: int32(TensorProto_INT64), Int64Data: []int64{5}}, nil, []int64{5}, false},
		{"wrong type", &TensorProto{Dims: []int64{1}, DataType: int32(TensorProto_UINT8), RawData: []byte{1}}, nil, nil, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var got any
			var err error
			if tc.ints != nil || (tc.wantErr && tc.t.GetDataType() == int32(TensorProto_INT64)) {
				got, err = Int64s(tc.t)
			} else {
				got, err = Floats(tc.t)
			}
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, wantErr %v", err, tc.wantErr)
			}
			if tc.wantErr {
				return
			}
			want := any(tc.floats)
			if tc.ints != nil {
				want = tc.ints
			}
			if !reflect.DeepEqual(got, want) {
				t.Errorf("got %v, want %v", got, want)
			}
		})
	}
}

// headGraph is a miniature of a classic YOLOv8 export tail with two levels
// plus an unrelated branch, for Extract and DetectHeadOutputs.
func headGraph() *ModelProto {
	node := func(op, name string, in, out []string, attrs ...*AttributeProto) *NodeProto {
		return &NodeProto{OpType: op, Name: name, Input: in, Output: out, Attribute: attrs}
	}
	axis := func(v int64) *AttributeProto {
		return &AttributeProto{Name: "axis", Type: AttributeProto_INT, I: proto.Int64(v)}
	}
	f := func(name string) *ValueInfoProto {
		return &ValueInfoProto{Name: name, Type: &TypeProto{Value: &TypeProto_TensorType{TensorType: &TypeProto_Tensor{ElemType: int32(TensorProto_FLOAT)}}}}
	}
	return &ModelProto{
		IrVersion:   8,
		OpsetImport: []*OperatorSetIdProto{{Version: 17}},
		Graph: &GraphProto{
			Name: "mini",
			Node: []*NodeProto{
				node("Conv", "box0", []string{"x", "w"}, []string{"b0"}),
				node("Relu", "cls0", []string{"x"}, []string{"c0"}),
				node("Concat", "lvl0", []string{"b0", "c0"}, []string{"l0"}, axis(1)),
				node("Sigmoid", "box1", []string{"x"}, []string{"b1"}),
				node("Relu", "cls1", []string{"x"}, []string{"c1"}),
				node("Concat", "lvl1", []string{"b1", "c1"}, []string{"l1"}, axis(1)),
				node("Reshape", "r0", []string{"l0", "shape"}, []string{"f0"}),
				node("Reshape", "r1", []string{"l1", "shape"}, []string{"f1"}),
				node("Concat", "cat", []string{"f0", "f1"}, []string{"all"}, axis(2)),
				node("Split", "split", []string{"all", "sizes"}, []string{"box", "cls"}, axis(1)),
				node("Neg", "other", []string{"y"}, []string{"z"}),
			},
			Initializer: []*TensorProto{
				{Name: "w", Dims: []int64{2, 2}, DataType: int32(TensorProto_FLOAT), FloatData: []float32{1, 2, 3, 4}},
				{Name: "shape", Dims: []int64{3}, DataType: int32(TensorProto_INT64), Int64Data: []int64{0, 4, -1}},
				{Name: "sizes", Dims: []int64{2}, DataType: int32(TensorProto_INT64), Int64Data: []int64{2, 2}},
			},
			Input:  []*ValueInfoProto{f("x"), f("y")},
			Output: []*ValueInfoProto{f("box"), f("cls"), f("z")},
		},
	}
}

func TestDetectHeadOutputs(t *testing.T) {
	m := headGraph()
	got, err := DetectHeadOutputs(m.GetGraph())
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"l0", "l1"}; !reflect.DeepEqual(got, want) {
		t.Errorf("head outputs = %v, want %v", got, want)
	}
	// Break the pattern: the level concat along the wrong axis.
	m.GetGraph().GetNode()[2].Attribute[0].I = proto.Int64(2)
	if got, err := DetectHeadOutputs(m.GetGraph()); err == nil {
		t.Errorf("broken pattern matched: %v", got)
	}
}

func TestExtract(t *testing.T) {
	tests := []struct {
		outputs    []string
		wantNodes  []string
		wantInits  []string
		wantInputs []string
		wantErr    bool
	}{
		{[]string{"l0", "l1"}, []string{"box0", "cls0", "lvl0", "box1", "cls1", "lvl1"}, []string{"w"}, []string{"x"}, false},
		{[]string{"c1"}, []string{"cls1"}, nil, []string{"x"}, false},
		{[]string{"z"}, []string{"other"}, nil, []string{"y"}, false},
		{[]string{"cls"}, []string{"box0", "cls0", "lvl0", "box1", "cls1", "lvl1", "r0", "r1", "cat", "split"}, []string{"w", "shape", "sizes"}, []string{"x"}, false},
		{[]string{"nope"}, nil, nil, nil, true},
	}
	for _, tc := range tests {
		t.Run(strings.Join(tc.outputs, ","), func(t *testing.T) {
			m := headGraph()
			sub, err := Extract(m, tc.outputs)
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, wantErr %v", err, tc.wantErr)
			}
			if tc.wantErr {
				return
			}
			names := func(n int, name func(int) string) []string {
				var out []string
				for i := 0; i < n; i++ {
					out = append(out, name(i))
				}
				return out
			}
			g := sub.GetGraph()
			if got := names(len(g.Node), func(i int) string { return g.Node[i].GetName() }); !reflect.DeepEqual(got, tc.wantNodes) {
				t.Errorf("nodes = %v, want %v", got, tc.wantNodes)
			}
			if got := names(len(g.Initializer), func(i int) string { return g.Initializer[i].GetName() }); !reflect.DeepEqual(got, tc.wantInits) {
				t.Errorf("initializers = %v, want %v", got, tc.wantInits)
			}
			if got := names(len(g.Input), func(i int) string { return g.Input[i].GetName() }); !reflect.DeepEqual(got, tc.wantInputs) {
				t.Errorf("inputs = %v, want %v", got, tc.wantInputs)
			}
			if got := names(len(g.Output), func(i int) string { return g.Output[i].GetName() }); !reflect.DeepEqual(got, tc.outputs) {
				t.Errorf("outputs = %v, want %v", got, tc.outputs)
			}
			for _, o := range g.Output {
				if o.GetType().GetTensorType().GetElemType() != int32(TensorProto_FLOAT) {
					t.Errorf("output %s has no float tensor type", o.GetName())
				}
				if o.GetType().GetTensorType().GetShape() == nil {
					t.Errorf("output %s has no shape field (OpenCV requires one)", o.GetName())
				}
			}
			// The source model must be untouched.
			if len(m.GetGraph().GetNode()) != 11 || len(m.GetGraph().GetOutput()) != 3 {
				t.Errorf("Extract modified its input model")
			}
		})
	}
}

// TestRoundTrip checks that what we marshal parses back identically,
// including oneof dims and typed attributes.
func TestRoundTrip(t *testing.T) {
	m := headGraph()
	// A zero-valued INT attribute must still be written: OpenCV decides
	// an attribute's kind by has_i().
	m.GetGraph().GetNode()[0].Attribute = append(m.GetGraph().GetNode()[0].Attribute,
		&AttributeProto{Name: "ceil_mode", Type: AttributeProto_INT, I: proto.Int64(0)})
	m.GetGraph().GetInput()[0].GetType().GetTensorType().Shape = &TensorShapeProto{Dim: []*TensorShapeProto_Dimension{
		{Value: &TensorShapeProto_Dimension_DimParam{DimParam: "N"}},
		{Value: &TensorShapeProto_Dimension_DimValue{DimValue: 3}},
	}}
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "m.onnx")
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	back, err := ReadModel(path)
	if err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(m, back) {
		t.Errorf("round trip changed the model")
	}
	if a := Attr(back.GetGraph().GetNode()[0], "ceil_mode"); a == nil || a.I == nil {
		t.Errorf("zero INT attribute lost its presence: %v", a)
	}
	if got := Shape(back.GetGraph().GetInput()[0]); !reflect.DeepEqual(got, []int64{-1, 3}) {
		t.Errorf("shape = %v, want [-1 3]", got)
	}
	if got := DimParams(back.GetGraph().GetInput()[0]); !reflect.DeepEqual(got, []string{"N", ""}) {
		t.Errorf("dim params = %v", got)
	}
	if got := FloatInitializerCount(back.GetGraph()); got != 4 {
		t.Errorf("float initializer count = %d, want 4 (int64 tensors excluded)", got)
	}
	if _, err := ReadModel(filepath.Join(t.TempDir(), "missing.onnx")); err == nil {
		t.Errorf("ReadModel of a missing file succeeded")
	}
}
