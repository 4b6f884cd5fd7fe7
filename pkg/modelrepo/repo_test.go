package modelrepo

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/visionserve/visionserve/pkg/onnx"
)

// valueInfo builds a float tensor value; a negative dim is symbolic.
func valueInfo(name string, elem onnx.TensorProto_DataType, dims ...int64) *onnx.ValueInfoProto {
	shape := &onnx.TensorShapeProto{}
	for _, d := range dims {
		dim := &onnx.TensorShapeProto_Dimension{}
		if d < 0 {
			dim.Value = &onnx.TensorShapeProto_Dimension_DimParam{DimParam: "N"}
		} else {
			dim.Value = &onnx.TensorShapeProto_Dimension_DimValue{DimValue: d}
		}
		shape.Dim = append(shape.Dim, dim)
	}
	return &onnx.ValueInfoProto{
		Name: name,
		Type: &onnx.TypeProto{Value: &onnx.TypeProto_TensorType{TensorType: &onnx.TypeProto_Tensor{
			ElemType: int32(elem), Shape: shape,
		}}},
	}
}

// writeGraph writes a model whose graph has the given inputs and outputs
// and one initializer that is also listed as an input, as old exporters do.
func writeGraph(t *testing.T, path string, inputs, outputs []*onnx.ValueInfoProto) {
	t.Helper()
	w := &onnx.TensorProto{Name: "w", DataType: int32(onnx.TensorProto_FLOAT), Dims: []int64{2}, FloatData: []float32{1, 2}}
	m := &onnx.ModelProto{
		IrVersion: 8,
		Graph: &onnx.GraphProto{
			Name:        "g",
			Initializer: []*onnx.TensorProto{w},
			Input:       append(inputs, valueInfo("w", onnx.TensorProto_FLOAT, 2)),
			Output:      outputs,
		},
	}
	raw, err := proto.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, raw, 0o644); err != nil {
		t.Fatal(err)
	}
}

const classifyConfig = `
task: classify
labels: labels.txt
input:
  mean: [0.485, 0.456, 0.406]
  std: [0.229, 0.224, 0.225]
  resize: shorter_crop
  resize_shorter: 256
`

// newModelDir writes a model folder with a [N,3,224,224] -> [N,3] graph.
func newModelDir(t *testing.T, root, name, config string) {
	t.Helper()
	dir := filepath.Join(root, name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	writeGraph(t, filepath.Join(dir, "model.onnx"),
		[]*onnx.ValueInfoProto{valueInfo("images", onnx.TensorProto_FLOAT, -1, 3, 224, 224)},
		[]*onnx.ValueInfoProto{valueInfo("logits", onnx.TensorProto_FLOAT, -1, 3)})
	if err := os.WriteFile(filepath.Join(dir, "labels.txt"), []byte("cat\ndog\nbird\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, ConfigFile), []byte(config), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestLoadFillsFromGraph(t *testing.T) {
	root := t.TempDir()
	newModelDir(t, root, "cls", classifyConfig)
	m, err := Load(root, "cls")
	if err != nil {
		t.Fatal(err)
	}
	if m.Input.Name != "images" || m.Input.Width != 224 || m.Input.Height != 224 {
		t.Errorf("input = %q %dx%d, want images 224x224", m.Input.Name, m.Input.Width, m.Input.Height)
	}
	if m.Output().Name != "logits" || m.NumClasses != 3 || m.LabelNames[1] != "dog" {
		t.Errorf("output %q, %d classes, labels %v", m.Output().Name, m.NumClasses, m.LabelNames)
	}
	if len(m.Graph.Inputs) != 1 {
		t.Errorf("initializer listed as input was not dropped: %+v", m.Graph.Inputs)
	}
	if m.Batching.MaxBatchSize != 8 || m.Defaults.TopK != 5 || m.Input.Color != "RGB" {
		t.Errorf("defaults not applied: %+v %+v", m.Batching, m.Defaults)
	}
}

func TestConfigValidation(t *testing.T) {
	tests := []struct {
		name    string
		config  string
		wantErr []string // substrings, all required
	}{
		{"missing task", strings.Replace(classifyConfig, "task: classify", "", 1), []string{"config.yaml sets no task", "not a 1000-way classifier"}},
		{"unknown task", strings.Replace(classifyConfig, "task: classify", "task: segment", 1), []string{`unknown task "segment"`}},
		{"missing label file", strings.Replace(classifyConfig, "labels: labels.txt", "labels: names.txt", 1), []string{"names.txt"}},
		{"label path escapes", strings.Replace(classifyConfig, "labels: labels.txt", "labels: ../../etc/passwd", 1), []string{"plain file name"}},
		{"unknown field", classifyConfig + "colour: red\n", []string{"field colour not found"}},
		{"width contradicts graph", classifyConfig + "  width: 300\n", []string{"input.width 300: the graph fixes it to 224"}},
		{"wrong input name", classifyConfig + "  name: data\n", []string{`input.name "data"`}},
		{"crop smaller than input", strings.Replace(classifyConfig, "resize_shorter: 256", "resize_shorter: 100", 1), []string{"resize_shorter 100"}},
		{"unknown resize", strings.Replace(classifyConfig, "resize: shorter_crop", "resize: fill", 1), []string{`unknown input.resize "fill"`}},
		{"zero std", strings.Replace(classifyConfig, "std: [0.229, 0.224, 0.225]", "std: [0.229, 0, 0.225]", 1), []string{"input.std[1]"}},
		{"bad colour order", classifyConfig + "  color: RGBA\n", []string{`input.color "RGBA"`}},
		{"detect decoding on classifier", classifyConfig + "output:\n  decoding: yolov8\n", []string{"does not fit task classify"}},
		{"batch too large", classifyConfig + "batching:\n  max_batch_size: 100000\n", []string{"max_batch_size 100000"}},
		{"preferred above max", classifyConfig + "batching:\n  max_batch_size: 4\n  preferred_batch_sizes: [2, 8]\n", []string{"preferred_batch_sizes: 8"}},
		{"preferred unsorted", classifyConfig + "batching:\n  preferred_batch_sizes: [4, 2]\n", []string{"increasing order"}},
		{"queue smaller than batch", classifyConfig + "batching:\n  max_batch_size: 8\n  queue_size: 4\n", []string{"queue_size 4"}},
		{"confidence above one", classifyConfig + "defaults:\n  confidence: 1.5\n", []string{"defaults.confidence 1.5"}},
		{"several problems at once", "task: segment\ninput:\n  color: XYZ\n", []string{"unknown task", "input.color", "resize_shorter"}},
		{"name differs from folder", "name: other\n" + classifyConfig, []string{`config names the model "other"`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := t.TempDir()
			newModelDir(t, root, "cls", tt.config)
			_, err := Load(root, "cls")
			if err == nil {
				t.Fatal("config accepted, want an error")
			}
			for _, want := range tt.wantErr {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q does not mention %q", err, want)
				}
			}
			if !strings.Contains(err.Error(), `model "cls"`) {
				t.Errorf("error %q does not name the model", err)
			}
		})
	}
}

func TestLabelsMustMatchOutput(t *testing.T) {
	root := t.TempDir()
	newModelDir(t, root, "cls", classifyConfig)
	if err := os.WriteFile(filepath.Join(root, "cls", "labels.txt"), []byte("a\nb\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := Load(root, "cls")
	if err == nil || !strings.Contains(err.Error(), "3 classes but the label file has 2 names") {
		t.Fatalf("err = %v, want a class count mismatch", err)
	}
}

func TestMissingModelFile(t *testing.T) {
	root := t.TempDir()
	newModelDir(t, root, "cls", classifyConfig)
	os.Remove(filepath.Join(root, "cls", "model.onnx"))
	_, err := Load(root, "cls")
	if err == nil || !strings.Contains(err.Error(), "make models") {
		t.Fatalf("err = %v, want a hint to run make models", err)
	}
}

func TestNonImageGraphs(t *testing.T) {
	tests := []struct {
		name    string
		inputs  []*onnx.ValueInfoProto
		wantErr string
	}{
		{"two inputs", []*onnx.ValueInfoProto{
			valueInfo("a", onnx.TensorProto_FLOAT, 1, 3, 224, 224), valueInfo("b", onnx.TensorProto_FLOAT, 1),
		}, "2 inputs"},
		{"uint8 input", []*onnx.ValueInfoProto{valueInfo("images", onnx.TensorProto_UINT8, 1, 3, 224, 224)}, "element type UINT8"},
		{"rank 3", []*onnx.ValueInfoProto{valueInfo("images", onnx.TensorProto_FLOAT, 3, 224, 224)}, "want [N,3,H,W]"},
		{"one channel", []*onnx.ValueInfoProto{valueInfo("images", onnx.TensorProto_FLOAT, 1, 1, 224, 224)}, "1 channels"},
		{"dynamic size not configured", []*onnx.ValueInfoProto{valueInfo("images", onnx.TensorProto_FLOAT, -1, 3, -1, -1)}, "input size 0x0 out of range"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := t.TempDir()
			newModelDir(t, root, "m", classifyConfig)
			writeGraph(t, filepath.Join(root, "m", "model.onnx"), tt.inputs,
				[]*onnx.ValueInfoProto{valueInfo("logits", onnx.TensorProto_FLOAT, -1, 3)})
			_, err := Load(root, "m")
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("err = %v, want %q", err, tt.wantErr)
			}
		})
	}
}

func TestValidName(t *testing.T) {
	for name, want := range map[string]bool{
		"resnet50": true, "yolov8s": true, "mobilenetv3_large": true, "a.b-c": true,
		"": false, ".": false, "..": false, "../x": false, "a/b": false, `a\b`: false,
		".hidden": false, "a..b": false, strings.Repeat("a", 129): false, "a b": false, "é": false,
	} {
		if got := ValidName(name); got != want {
			t.Errorf("ValidName(%q) = %v, want %v", name, got, want)
		}
	}
	if _, err := Load(t.TempDir(), "../etc"); err == nil || !strings.Contains(err.Error(), "invalid model name") {
		t.Errorf("Load(../etc) = %v, want invalid model name", err)
	}
}

func TestLoadRepo(t *testing.T) {
	root := t.TempDir()
	newModelDir(t, root, "b", classifyConfig)
	newModelDir(t, root, "a", classifyConfig)
	if err := os.MkdirAll(filepath.Join(root, "not-a-model"), 0o755); err != nil {
		t.Fatal(err)
	}
	repo, err := LoadRepo(root)
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(repo.Names(), ","); got != "a,b" {
		t.Errorf("names = %s, want a,b", got)
	}
	if _, ok := repo.Get("b"); !ok {
		t.Error("Get(b) not found")
	}
	if _, ok := repo.Get("c"); ok {
		t.Error("Get(c) found")
	}
	if _, err := LoadRepo(t.TempDir()); err == nil || !strings.Contains(err.Error(), "holds no model") {
		t.Errorf("empty repo: %v", err)
	}
	// A folder that cannot be read is listed as failed; the others load.
	newModelDir(t, root, "broken", "name: broken\ntask: classify\n")
	newModelDir(t, root, "truncated", strings.ReplaceAll(classifyConfig, "name: a", "name: truncated"))
	onnxPath := filepath.Join(root, "truncated", "model.onnx")
	whole, err := os.ReadFile(onnxPath)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(onnxPath, whole[:len(whole)/2], 0o644); err != nil {
		t.Fatal(err)
	}
	repo, err = LoadRepo(root)
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(repo.Names(), ","); got != "a,b" || len(repo.Failed) != 2 || repo.Failed[0].Name != "broken" || repo.Failed[1].Name != "truncated" || repo.Failed[1].Err == nil {
		t.Errorf("with a broken folder: models %s, failed %+v", got, repo.Failed)
	}
	// Nothing loads: the error names why.
	only := t.TempDir()
	newModelDir(t, only, "broken", "name: broken\ntask: classify\n")
	if _, err := LoadRepo(only); err == nil || !strings.Contains(err.Error(), "broken") {
		t.Errorf("only a broken model: %v", err)
	}
}

// TestShippedRepository loads the committed configs against the generated
// models, so a config that drifts from modelgen fails here.
func TestShippedRepository(t *testing.T) {
	root := filepath.Join("..", "..", "models")
	for _, name := range []string{"resnet50", "mobilenetv3_large", "yolov8s"} {
		if _, err := os.Stat(filepath.Join(root, name, "model.onnx")); err != nil {
			t.Skipf("%s/%s/model.onnx not generated: run `make models`", root, name)
		}
	}
	repo, err := LoadRepo(root)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]struct {
		task         Task
		side, labels int
		output       string
	}{
		"resnet50":          {TaskClassify, 224, 1000, "logits"},
		"mobilenetv3_large": {TaskClassify, 224, 1000, "logits"},
		"yolov8s":           {TaskDetect, 640, 80, "output0"},
	}
	for name, w := range want {
		m, ok := repo.Get(name)
		if !ok {
			t.Errorf("%s missing", name)
			continue
		}
		if m.Task != w.task || m.Input.Width != w.side || m.Input.Height != w.side || m.NumClasses != w.labels || m.Output().Name != w.output {
			t.Errorf("%s: task %s %dx%d %d labels output %q; want %+v", name, m.Task, m.Input.Width, m.Input.Height, m.NumClasses, m.Output().Name, w)
		}
	}
}

// TestRealExports reads graphs written by real exporters.
func TestRealExports(t *testing.T) {
	dir := filepath.Join("..", "..", "..", "shared", "testdata", "models")
	if _, err := os.Stat(dir); err != nil {
		t.Skipf("real models folder %s absent", dir)
	}
	io, err := ReadGraphIO(filepath.Join(dir, "yolov8n_int8.onnx"))
	if err != nil {
		t.Fatal(err)
	}
	if len(io.Inputs) != 1 || io.Inputs[0].Name != "images" || !slices.Equal(io.Inputs[0].Shape, []int64{1, 3, 640, 640}) {
		t.Errorf("yolov8n inputs %+v", io.Inputs)
	}
	if len(io.Outputs) != 1 || io.Outputs[0].Name != "output0" || !slices.Equal(io.Outputs[0].Shape, []int64{1, 84, 8400}) {
		t.Errorf("yolov8n outputs %+v", io.Outputs)
	}
	io, err = ReadGraphIO(filepath.Join(dir, "mobilenetv2-12-int8.onnx"))
	if err != nil {
		t.Fatal(err)
	}
	if len(io.Inputs) != 1 || io.Inputs[0].Name != "input" || len(io.Outputs) != 1 || io.Outputs[0].Name != "output" {
		t.Errorf("mobilenetv2 io %+v", io)
	}
}

func FuzzParseConfig(f *testing.F) {
	f.Add([]byte(classifyConfig))
	f.Add([]byte("task: detect\nbatching:\n  max_queue_delay: 5ms\n"))
	f.Fuzz(func(t *testing.T, raw []byte) {
		cfg, err := ParseConfig(raw)
		if err != nil {
			return
		}
		cfg.applyDefaults()
		_ = cfg.validate()
	})
}

func FuzzReadGraphIO(f *testing.F) {
	dir := f.TempDir()
	path := filepath.Join(dir, "seed.onnx")
	writeGraph(&testing.T{}, path,
		[]*onnx.ValueInfoProto{valueInfo("images", onnx.TensorProto_FLOAT, -1, 3, 224, 224)},
		[]*onnx.ValueInfoProto{valueInfo("logits", onnx.TensorProto_FLOAT, -1, 3)})
	seed, _ := os.ReadFile(path)
	f.Add(seed)
	f.Add([]byte{0x3a, 0x05, 0x5a, 0x03, 0x0a, 0x01, 0x61})
	f.Fuzz(func(t *testing.T, raw []byte) {
		p := filepath.Join(t.TempDir(), "m.onnx")
		if err := os.WriteFile(p, raw, 0o644); err != nil {
			t.Fatal(err)
		}
		_, _ = ReadGraphIO(p)
	})
}
