package enginetest

import (
	"context"
	"math"
	"os"
	"path/filepath"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/visionserve/visionserve/internal/testenv/onnxrttest"
	"github.com/visionserve/visionserve/pkg/engine"
	"github.com/visionserve/visionserve/pkg/engine/onnxrt"
	"github.com/visionserve/visionserve/pkg/modelrepo"
	"github.com/visionserve/visionserve/pkg/onnx"
	"github.com/visionserve/visionserve/pkg/pipeline"
)

// writeVariant writes m's graph rewritten by f beside a copy of m, and
// returns the model pointing at it.
func writeVariant(t *testing.T, m *modelrepo.Model, suffix string, f func(*onnx.ModelProto) (*onnx.ModelProto, error)) *modelrepo.Model {
	t.Helper()
	src, err := onnx.ReadModel(m.Path)
	if err != nil {
		t.Fatal(err)
	}
	out, err := f(src)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := proto.Marshal(out)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), m.Name+suffix+".onnx")
	if err := os.WriteFile(path, raw, 0o644); err != nil {
		t.Fatal(err)
	}
	v := *m
	v.Path = path
	return &v
}

// engineOutputs runs the photos, prepared as m says, through an ONNX
// Runtime CPU engine of m and returns the first output per photo.
func engineOutputs(t *testing.T, m *modelrepo.Model) [][]float32 {
	t.Helper()
	onnxrttest.Init(t)
	e, err := onnxrt.NewForModel(m, onnxrt.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	pre, err := pipeline.NewPreprocessor(m, pipeline.PreprocessOptions{})
	if err != nil {
		t.Fatal(err)
	}
	c, h, w := pre.InputShape()
	var outs [][]float32
	for _, img := range testImages(t) {
		p, err := pre.Prepare(img)
		if err != nil {
			t.Fatal(err)
		}
		b := engine.NewBatch(1, c, h, w)
		b.N = 1
		if err := p.Fill(b.Slot(0)); err != nil {
			t.Fatal(err)
		}
		p.Close()
		res, err := e.Run(context.Background(), b)
		if err != nil {
			t.Fatal(err)
		}
		outs = append(outs, append([]float32(nil), res[0].Data...))
	}
	return outs
}

func argmax(v []float32) int {
	best := 0
	for i, x := range v {
		if x > v[best] {
			best = i
		}
	}
	return best
}

// TestFP16Numerics checks, without a GPU, what --precision fp16 does to a
// model's answers: the generated classifiers with their weights rounded
// to float16 (RoundToFP16, the values ToFP16 stores) against float32 on
// the photos, and ToFP16's graph itself run on ONNX Runtime's CPU.
func TestFP16Numerics(t *testing.T) {
	for _, name := range []string{"resnet50", "mobilenetv3_large"} {
		t.Run(name, func(t *testing.T) {
			m := generated(t, name)
			want := engineOutputs(t, m)
			got := engineOutputs(t, writeVariant(t, m, ".rounded", onnx.RoundToFP16))
			agree, worst := 0, 0.0
			for i := range want {
				if argmax(got[i]) == argmax(want[i]) {
					agree++
				}
				for j := range want[i] {
					worst = math.Max(worst, math.Abs(float64(got[i][j]-want[i][j])))
				}
			}
			t.Logf("%s with fp16-rounded weights: top-1 agrees on %d of %d photos, largest logit difference %.3g", name, agree, len(want), worst)
			if agree != len(want) {
				t.Errorf("top-1 changed on %d photos", len(want)-agree)
			}
			half := writeVariant(t, m, ".fp16", func(p *onnx.ModelProto) (*onnx.ModelProto, error) { return onnx.ToFP16(p, nil) })
			onnxrttest.Init(t)
			e, err := onnxrt.NewForModel(half, onnxrt.Options{})
			if err != nil {
				t.Fatalf("ONNX Runtime CPU cannot load the float16 graph: %v", err)
			}
			e.Close()
			fp16 := engineOutputs(t, half)
			worst, scale := 0.0, 0.0
			agree = 0
			for i := range want {
				if argmax(fp16[i]) == argmax(want[i]) {
					agree++
				}
				for j := range want[i] {
					worst = math.Max(worst, math.Abs(float64(fp16[i][j]-want[i][j])))
					scale = math.Max(scale, math.Abs(float64(want[i][j])))
				}
			}
			t.Logf("%s as float16 (ToFP16) on ONNX Runtime CPU: top-1 agrees on %d of %d photos, largest logit difference %.3g (largest logit %.3g)", name, agree, len(want), worst, scale)
			if agree != len(want) || worst > 0.05*scale {
				t.Errorf("float16 graph: top-1 agrees on %d of %d, difference %.3g over 5%% of %.3g", agree, len(want), worst, scale)
			}
		})
	}
}

// TestFP16YOLOv8s: ToFP16 on the generated YOLOv8s, whose Resize and DFL
// Softmax stay in float32 islands, runs on ONNX Runtime's CPU, and its
// boxes and class probabilities stay close to float32's.
func TestFP16YOLOv8s(t *testing.T) {
	m := generated(t, "yolov8s")
	want := engineOutputs(t, m)
	got := engineOutputs(t, writeVariant(t, m, ".fp16", func(p *onnx.ModelProto) (*onnx.ModelProto, error) { return onnx.ToFP16(p, nil) }))
	// output0 is [1, 4+80, 8400]: rows 0-3 boxes in input pixels, then
	// class probabilities.
	const anchors = 8400
	var box, cls float64
	for i := range want {
		for j := range want[i] {
			d := math.Abs(float64(got[i][j] - want[i][j]))
			if j < 4*anchors {
				box = math.Max(box, d)
			} else {
				cls = math.Max(cls, d)
			}
		}
	}
	t.Logf("yolov8s as float16 on ONNX Runtime CPU: largest box difference %.3g px, class probability %.3g", box, cls)
	if box > 4 || cls > 0.02 {
		t.Errorf("float16 yolov8s: box difference %.3g px, class probability %.3g", box, cls)
	}
}
