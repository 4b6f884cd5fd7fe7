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

// writeMetaGraph writes a graph like writeGraph, with metadata_props and
// a last node of op producing the first output.
func writeMetaGraph(t *testing.T, path string, meta map[string]string, op string, in, out *onnx.ValueInfoProto) {
	t.Helper()
	m := &onnx.ModelProto{
		IrVersion: 8,
		Graph: &onnx.GraphProto{
			Name:   "g",
			Node:   []*onnx.NodeProto{{OpType: op, Input: []string{in.GetName()}, Output: []string{out.GetName()}}},
			Input:  []*onnx.ValueInfoProto{in},
			Output: []*onnx.ValueInfoProto{out},
		},
	}
	for _, k := range sortedKeys(meta) {
		m.MetadataProps = append(m.MetadataProps, &onnx.StringStringEntryProto{Key: k, Value: meta[k]})
	}
	raw, err := proto.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, raw, 0o644); err != nil {
		t.Fatal(err)
	}
}

var ultralyticsMeta = map[string]string{
	"author": "Ultralytics", "task": "detect", "stride": "32", "batch": "1", "end2end": "False",
	"imgsz": "[480, 640]",
	"names": `{0: 'person', 1: "it's", 2: 'back\\slash'}`,
}

func yoloIO(dynamic bool) (*onnx.ValueInfoProto, *onnx.ValueInfoProto) {
	h, w := int64(480), int64(640)
	if dynamic {
		h, w = -1, -1
	}
	return valueInfo("images", onnx.TensorProto_FLOAT, 1, 3, h, w), valueInfo("output0", onnx.TensorProto_FLOAT, 1, 7, 6300)
}

func TestZeroConfigUltralytics(t *testing.T) {
	for _, dynamic := range []bool{false, true} {
		root := t.TempDir()
		in, out := yoloIO(dynamic)
		writeMetaGraph(t, filepath.Join(root, "yolo", "model.onnx"), ultralyticsMeta, "Concat", in, out)
		m, err := Load(root, "yolo")
		if err != nil {
			t.Fatal(err)
		}
		c := m.Config
		if c.Task != TaskDetect || c.Input.Width != 640 || c.Input.Height != 480 || c.Input.Resize != ResizeLetterbox ||
			c.Input.PadValue != 114 || c.Input.Color != "RGB" || c.Input.Scale != 1.0/255 || c.Input.Mean != [3]float32{} ||
			c.Input.Std != [3]float32{1, 1, 1} || c.Output.Decoding != DecodeYOLOv8 {
			t.Errorf("dynamic=%v: config %+v", dynamic, c)
		}
		if want := []string{"person", "it's", `back\slash`}; !slices.Equal(m.LabelNames, want) {
			t.Errorf("labels %q, want %q", m.LabelNames, want)
		}
		wantSize := SourceGraph
		if dynamic {
			wantSize = SourceMetadata
		}
		for key, want := range map[string]Source{"task": SourceMetadata, "labels": SourceMetadata, "input.pad_value": SourceMetadata,
			"input.width": wantSize, "input.height": wantSize, "input.name": SourceGraph} {
			if got := m.Sources[key]; got != want {
				t.Errorf("dynamic=%v: source of %s = %q, want %q (%s)", dynamic, key, got, want, m.SettingSources())
			}
		}
	}
}

// TestConfigOverridesDetected: config.yaml wins over the metadata for the
// fields it sets, even a zero value; the rest still comes from metadata.
func TestConfigOverridesDetected(t *testing.T) {
	root := t.TempDir()
	in, out := yoloIO(false)
	writeMetaGraph(t, filepath.Join(root, "yolo", "model.onnx"), ultralyticsMeta, "Concat", in, out)
	cfg := "input:\n  pad_value: 0\ndefaults:\n  confidence: 0.5\n"
	if err := os.WriteFile(filepath.Join(root, "yolo", ConfigFile), []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	m, err := Load(root, "yolo")
	if err != nil {
		t.Fatal(err)
	}
	if m.Input.PadValue != 0 || m.Sources["input.pad_value"] != SourceConfig {
		t.Errorf("pad_value %d from %s, want 0 from config", m.Input.PadValue, m.Sources["input.pad_value"])
	}
	if m.Defaults.Confidence != 0.5 || m.Task != TaskDetect || m.Sources["task"] != SourceMetadata || m.NumClasses != 3 {
		t.Errorf("confidence %v, task %s from %s, %d classes", m.Defaults.Confidence, m.Task, m.Sources["task"], m.NumClasses)
	}
	if m.Sources["input.resize"] != SourceMetadata || m.Sources["input.color"] != SourceMetadata {
		t.Errorf("sources %s", m.SettingSources())
	}
}

func TestZeroConfigImageNetPreset(t *testing.T) {
	root := t.TempDir()
	// A bare NAME.onnx in the repository root, output [N,1000] from Softmax.
	writeMetaGraph(t, filepath.Join(root, "net.onnx"), nil, "Softmax",
		valueInfo("x", onnx.TensorProto_FLOAT, -1, 3, 224, 224), valueInfo("prob", onnx.TensorProto_FLOAT, -1, 1000))
	// One with a dynamic size and logits.
	writeMetaGraph(t, filepath.Join(root, "dyn", "model.onnx"), nil, "Gemm",
		valueInfo("x", onnx.TensorProto_FLOAT, -1, 3, -1, -1), valueInfo("logits", onnx.TensorProto_FLOAT, -1, 1000))
	repo, err := LoadRepo(root)
	if err != nil {
		t.Fatal(err)
	}
	if got := repo.Names(); !slices.Equal(got, []string{"dyn", "net"}) {
		t.Fatalf("models %v", got)
	}
	for name, decoding := range map[string]Decoding{"net": DecodeProbabilities, "dyn": DecodeLogits} {
		m, _ := repo.Get(name)
		c := m.Config
		if c.Task != TaskClassify || c.Input.Mean != [3]float32{0.485, 0.456, 0.406} || c.Input.Std != [3]float32{0.229, 0.224, 0.225} ||
			c.Input.Resize != ResizeShorterCrop || c.Input.ResizeShorter != 256 || c.Input.Width != 224 || c.Output.Decoding != decoding {
			t.Errorf("%s: config %+v", name, c)
		}
		if m.NumClasses != 1000 || m.LabelNames[258] != "Samoyed" || m.Sources["labels"] != SourcePreset || m.Sources["input.mean"] != SourcePreset {
			t.Errorf("%s: %d labels, [258] %q, sources %s", name, m.NumClasses, m.LabelNames[258], m.SettingSources())
		}
	}
	// preset: none turns it off, and the model is then refused.
	if err := os.WriteFile(filepath.Join(root, "dyn", ConfigFile), []byte("preset: none\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(root, "dyn"); err == nil || !strings.Contains(err.Error(), "sets no task") {
		t.Errorf("preset none: %v", err)
	}
}

// TestZeroConfigRefusals: what cannot be understood is refused, naming
// what to add.
func TestZeroConfigRefusals(t *testing.T) {
	tests := []struct {
		name string
		meta map[string]string
		out  *onnx.ValueInfoProto
		want []string
	}{
		{"no metadata, not a classifier", nil, valueInfo("o", onnx.TensorProto_FLOAT, 1, 84, 8400),
			[]string{"no config.yaml", "[1 84 8400]", "set task", "labels"}},
		{"segmentation export", map[string]string{"task": "segment", "names": "{0: 'a'}"}, valueInfo("o", onnx.TensorProto_FLOAT, 1, 5, 10),
			[]string{`task "segment" is not served`}},
		{"end-to-end export", map[string]string{"task": "detect", "names": "{0: 'a'}", "end2end": "True"}, valueInfo("o", onnx.TensorProto_FLOAT, 1, 300, 6),
			[]string{"end2end", "nms=False"}},
		{"names with a gap", map[string]string{"task": "detect", "names": "{0: 'a', 2: 'c'}"}, valueInfo("o", onnx.TensorProto_FLOAT, 1, 7, 10),
			[]string{"class 1 is missing"}},
		{"names disagree with the output", map[string]string{"task": "detect", "names": "{0: 'a'}"}, valueInfo("o", onnx.TensorProto_FLOAT, 1, 7, 10),
			[]string{"not 4 + 1 labels"}},
		{"bad imgsz", map[string]string{"task": "detect", "names": "{0: 'a'}", "imgsz": "[big]"}, valueInfo("o", onnx.TensorProto_FLOAT, 1, 5, 10),
			[]string{"imgsz"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := t.TempDir()
			writeMetaGraph(t, filepath.Join(root, "m", "model.onnx"), tt.meta, "Concat", valueInfo("images", onnx.TensorProto_FLOAT, 1, 3, 64, 64), tt.out)
			_, err := Load(root, "m")
			if err == nil {
				t.Fatal("accepted")
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
		})
	}
}

// TestVersionLayout: Triton's NAME/VERSION/model.onnx serves the highest
// version; config.yaml and labels stay in NAME.
func TestVersionLayout(t *testing.T) {
	root := t.TempDir()
	newModelDir(t, root, "cls", classifyConfig)
	if err := os.Remove(filepath.Join(root, "cls", "model.onnx")); err != nil {
		t.Fatal(err)
	}
	for _, v := range []string{"1", "3", "10x"} {
		writeGraph(t, filepath.Join(mkdir(t, root, "cls", v), "model.onnx"),
			[]*onnx.ValueInfoProto{valueInfo("images", onnx.TensorProto_FLOAT, -1, 3, 224, 224)},
			[]*onnx.ValueInfoProto{valueInfo("logits", onnx.TensorProto_FLOAT, -1, 3)})
	}
	mkdir(t, root, "cls", "7") // a version folder without a model is not a version
	m, err := Load(root, "cls")
	if err != nil {
		t.Fatal(err)
	}
	if m.Version != 3 || m.Path != filepath.Join(root, "cls", "3", "model.onnx") || m.NumClasses != 3 {
		t.Errorf("version %d path %s classes %d", m.Version, m.Path, m.NumClasses)
	}
}

func TestLoadFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "my-net.onnx")
	writeMetaGraph(t, path, nil, "Gemm", valueInfo("x", onnx.TensorProto_FLOAT, 1, 3, 224, 224), valueInfo("y", onnx.TensorProto_FLOAT, 1, 1000))
	m, err := LoadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if m.Name != "my-net" || m.Path != path || m.Task != TaskClassify {
		t.Errorf("%s %s %s", m.Name, m.Path, m.Task)
	}
	if _, err := LoadFile(filepath.Join(dir, "weights.bin")); err == nil {
		t.Error("a file not named NAME.onnx was accepted")
	}
}

func mkdir(t *testing.T, parts ...string) string {
	t.Helper()
	p := filepath.Join(parts...)
	if err := os.MkdirAll(p, 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestZeroConfigRealExports: the real Ultralytics and Model Zoo exports of
// the shared test data, with no config file, resolve to what the
// hand-written configs of the server tests say.
func TestZeroConfigRealExports(t *testing.T) {
	dir := filepath.Join("..", "..", "..", "shared", "testdata")
	if _, err := os.Stat(filepath.Join(dir, "models")); err != nil {
		t.Skipf("real test data %s absent", dir)
	}
	root := t.TempDir()
	for file, name := range map[string]string{"yolov8n_int8.onnx": "yolov8n.onnx", "mobilenetv2-12-int8.onnx": "mobilenetv2.onnx"} {
		abs, _ := filepath.Abs(filepath.Join(dir, "models", file))
		if err := os.Symlink(abs, filepath.Join(root, name)); err != nil {
			t.Fatal(err)
		}
	}
	repo, err := LoadRepo(root)
	if err != nil {
		t.Fatal(err)
	}
	if len(repo.Failed) > 0 {
		t.Fatalf("failed: %v", repo.Failed[0].Err)
	}
	readLabels := func(name string) []string {
		l, err := ReadLabels(filepath.Join(dir, "labels", name))
		if err != nil {
			t.Fatal(err)
		}
		return l
	}
	y, _ := repo.Get("yolov8n")
	if y.Task != TaskDetect || y.Input.Width != 640 || y.Input.Resize != ResizeLetterbox || y.Input.PadValue != 114 ||
		y.Input.Scale != 1.0/255 || y.Config.Output.Decoding != DecodeYOLOv8 || !slices.Equal(y.LabelNames, readLabels("coco80.txt")) {
		t.Errorf("yolov8n: %+v, %d labels", y.Config, y.NumClasses)
	}
	mb, _ := repo.Get("mobilenetv2")
	if mb.Task != TaskClassify || mb.Input.Width != 224 || mb.Input.ResizeShorter != 256 || mb.Input.Mean != [3]float32{0.485, 0.456, 0.406} ||
		mb.Config.Output.Decoding != DecodeLogits || !slices.Equal(mb.LabelNames, readLabels("imagenet.txt")) {
		t.Errorf("mobilenetv2: %+v", mb.Config)
	}
	t.Logf("yolov8n: %s", y.SettingSources())
	t.Logf("mobilenetv2: %s", mb.SettingSources())
}

func TestParseNames(t *testing.T) {
	got, err := parseNames(`{0: 'a b', 1: "c'd", 2: 'e\'f'}`)
	if err != nil || !slices.Equal(got, []string{"a b", "c'd", "e'f"}) {
		t.Errorf("parseNames = %q, %v", got, err)
	}
	for _, bad := range []string{"", "{}", "[0, 1]", "{0: a}", "{0: 'a', 0: 'b'}", "{0: 'a' 1: 'b'}", "{-1: 'a'}", "{0: 'unterminated}", "{0: ''}"} {
		if _, err := parseNames(bad); err == nil {
			t.Errorf("parseNames(%q) accepted", bad)
		}
	}
}

func FuzzParseNames(f *testing.F) {
	f.Add(ultralyticsMeta["names"])
	f.Add(`{0: 'a', 1: "b"}`)
	f.Fuzz(func(t *testing.T, s string) {
		names, err := parseNames(s)
		if err != nil {
			return
		}
		if len(names) == 0 || len(names) > len(s) {
			t.Fatalf("%d names from %d bytes", len(names), len(s))
		}
		for _, n := range names {
			if strings.TrimSpace(n) == "" {
				t.Fatalf("empty name from %q", s)
			}
		}
	})
}

func FuzzParseImgsz(f *testing.F) {
	f.Add("[640, 640]")
	f.Add("320")
	f.Fuzz(func(t *testing.T, s string) {
		h, w, err := parseImgsz(s)
		if err == nil && (h < 1 || w < 1 || h > MaxInputSide || w > MaxInputSide) {
			t.Fatalf("%q gave %dx%d", s, w, h)
		}
	})
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}
