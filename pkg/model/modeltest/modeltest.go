// Package modeltest holds what tests of served models share: a fake
// engine whose outputs look like a real classifier's or YOLOv8 detector's
// and are a fixed function of the batch, and the small model config that
// goes with it. It links no native code of its own.
package modeltest

import (
	"bytes"
	"context"
	"fmt"
	"image"
	"image/jpeg"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/visionserve/visionserve/pkg/engine"
	"github.com/visionserve/visionserve/pkg/engine/enginefake"
	"github.com/visionserve/visionserve/pkg/modelrepo"
	"github.com/visionserve/visionserve/pkg/onnx"
	"google.golang.org/protobuf/proto"
)

// Engine stands in for a model: its outputs are a fixed function of the
// batch, so results can be predicted and compared bit for bit.
type Engine struct {
	// Classes is the number of classes (logits per image, or class rows
	// of a detector's output).
	Classes int
	// Detect makes it a YOLOv8-style detector with Anchors anchors, one
	// object in the centre of every image.
	Detect  bool
	Anchors int
	// Delay is how long each Run takes (ended early by ctx).
	Delay time.Duration
	// Cost adds a run time by batch size, like a model on a CPU where
	// some sizes are slower per image than others.
	Cost map[int]time.Duration
	// Fail, when set, fails every Run.
	Fail error
	// Gate, when set, blocks each Run until it is closed or receives.
	Gate chan struct{}
	// Started is signalled (non-blocking) when a Run begins.
	Started chan struct{}

	runs   atomic.Int64
	images atomic.Int64
	closed atomic.Bool
}

// Backend implements engine.Engine.
func (e *Engine) Backend() string { return "fake" }

// Close implements engine.Engine.
func (e *Engine) Close() error {
	e.closed.Store(true)
	return nil
}

// Runs is how many batches ran successfully.
func (e *Engine) Runs() int64 { return e.runs.Load() }

// Images is how many images those batches held.
func (e *Engine) Images() int64 { return e.images.Load() }

// Closed reports whether Close was called.
func (e *Engine) Closed() bool { return e.closed.Load() }

// Run implements engine.Engine.
func (e *Engine) Run(ctx context.Context, b *engine.Batch) ([]engine.Tensor, error) {
	if e.Started != nil {
		select {
		case e.Started <- struct{}{}:
		default:
		}
	}
	if e.Gate != nil {
		select {
		case <-e.Gate:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if err := enginefake.Sleep(ctx, e.Delay+e.Cost[b.N]); err != nil {
		return nil, err
	}
	if e.Fail != nil {
		return nil, e.Fail
	}
	e.runs.Add(1)
	e.images.Add(int64(b.N))
	return e.Outputs(b), nil
}

// Outputs computes the fake model's output for a batch.
func (e *Engine) Outputs(b *engine.Batch) []engine.Tensor {
	if !e.Detect {
		out := make([]float32, b.N*e.Classes)
		for n := range b.N {
			slot := b.Slot(n)
			var sum float32
			for _, v := range slot {
				sum += v
			}
			mean := sum / float32(len(slot))
			// Class k's logit peaks where k/classes is near the mean
			// pixel value: brighter images score higher classes.
			for k := range e.Classes {
				d := mean - float32(k)/float32(e.Classes)
				out[n*e.Classes+k] = -d * d * 100
			}
		}
		return []engine.Tensor{{Name: "logits", Shape: []int64{int64(b.N), int64(e.Classes)}, Data: out}}
	}
	rows, a := 4+e.Classes, e.Anchors
	out := make([]float32, b.N*rows*a)
	for n := range b.N {
		o := out[n*rows*a : (n+1)*rows*a]
		// One object in the centre of the input, half its size, class 0.
		o[0*a], o[1*a], o[2*a], o[3*a] = float32(b.W)/2, float32(b.H)/2, float32(b.W)/2, float32(b.H)/2
		o[4*a] = 0.9
	}
	return []engine.Tensor{{Name: "output0", Shape: []int64{int64(b.N), int64(rows), int64(a)}, Data: out}}
}

var _ engine.Engine = (*Engine)(nil)

// SizedCosts are Engine.Cost for a model on which batch 2 is 2.5 times
// slower per image than batch 1 and batch 4 twice as fast, so that the
// self-tuner has a clear choice to make.
var SizedCosts = map[int]time.Duration{1: 2 * time.Millisecond, 2: 10 * time.Millisecond, 3: 12 * time.Millisecond, 4: 4 * time.Millisecond}

// Model describes a small model of the given task, 64×64 input, batches
// of up to 4, that Engine serves: a classifier with logits "logits", or a
// detector with a YOLOv8 output "output0" over 84 anchors.
func Model(name string, task modelrepo.Task, classes int) *modelrepo.Model {
	labels := make([]string, classes)
	for i := range labels {
		labels[i] = "class" + string(rune('A'+i%26)) + string(rune('a'+i/26))
	}
	cfg := modelrepo.Config{
		Name: name, Task: task, ModelFile: "model.onnx", Labels: "labels.txt",
		Input: modelrepo.InputConfig{
			Name: "images", Width: 64, Height: 64, Layout: "NCHW", Color: "RGB",
			Scale: 1.0 / 255, Std: [3]float32{1, 1, 1}, Resize: modelrepo.ResizeStretch,
		},
		Defaults: modelrepo.DefaultOptions{TopK: 5, Confidence: 0.25, IoU: 0.45, MaxDetections: 300},
		Batching: modelrepo.BatchingConfig{MaxBatchSize: 4, MaxQueueDelay: time.Millisecond, QueueSize: 16, Instances: 1},
	}
	out := modelrepo.TensorInfo{Name: "logits", ElemType: 1, Shape: []int64{-1, int64(classes)}}
	cfg.Output = modelrepo.OutputConfig{Name: "logits", Decoding: modelrepo.DecodeLogits}
	if task == modelrepo.TaskDetect {
		cfg.Input.Resize, cfg.Input.PadValue = modelrepo.ResizeLetterbox, 114
		cfg.Output = modelrepo.OutputConfig{Name: "output0", Decoding: modelrepo.DecodeYOLOv8}
		out = modelrepo.TensorInfo{Name: "output0", ElemType: 1, Shape: []int64{-1, int64(4 + classes), 84}}
	}
	return &modelrepo.Model{
		Config: cfg, LabelNames: labels, NumClasses: classes,
		Graph: &modelrepo.GraphIO{
			Inputs:  []modelrepo.TensorInfo{{Name: "images", ElemType: 1, Shape: []int64{-1, 3, 64, 64}}},
			Outputs: []modelrepo.TensorInfo{out},
		},
	}
}

// JPEG encodes a w×h image of one grey level v.
func JPEG(tb testing.TB, w, h int, v uint8) []byte {
	tb.Helper()
	img := image.NewGray(image.Rect(0, 0, w, h))
	for i := range img.Pix {
		img.Pix[i] = v
	}
	var buf bytes.Buffer
	if err := jpeg.Encode(&buf, img, &jpeg.Options{Quality: 95}); err != nil {
		tb.Fatal(err)
	}
	return buf.Bytes()
}

// WriteDir writes a model folder root/name that modelrepo reads as a
// classifier of the given classes with a 64×64 input: a model.onnx
// holding only the graph's input and output (the engines of these tests
// are fakes), config.yaml and labels.txt. extra is appended to
// config.yaml. It returns the folder.
func WriteDir(tb testing.TB, root, name string, classes int, extra string) string {
	tb.Helper()
	dir := filepath.Join(root, name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		tb.Fatal(err)
	}
	WriteGraph(tb, filepath.Join(dir, "model.onnx"), classes)
	var labels strings.Builder
	for i := range classes {
		fmt.Fprintf(&labels, "class%d\n", i)
	}
	cfg := "task: classify\nlabels: labels.txt\ninput:\n  resize: stretch\nbatching:\n  max_batch_size: 4\n  max_queue_delay: 1ms\n  queue_size: 64\n" + extra
	for file, data := range map[string]string{"labels.txt": labels.String(), "config.yaml": cfg} {
		if err := os.WriteFile(filepath.Join(dir, file), []byte(data), 0o644); err != nil {
			tb.Fatal(err)
		}
	}
	return dir
}

// WriteGraph writes an ONNX file whose graph has only an input
// images [N,3,64,64] and an output logits [N,classes].
func WriteGraph(tb testing.TB, path string, classes int) {
	tb.Helper()
	vi := func(name string, dims ...int64) *onnx.ValueInfoProto {
		shape := &onnx.TensorShapeProto{}
		for _, d := range dims {
			dim := &onnx.TensorShapeProto_Dimension{Value: &onnx.TensorShapeProto_Dimension_DimValue{DimValue: d}}
			if d < 0 {
				dim.Value = &onnx.TensorShapeProto_Dimension_DimParam{DimParam: "N"}
			}
			shape.Dim = append(shape.Dim, dim)
		}
		return &onnx.ValueInfoProto{Name: name, Type: &onnx.TypeProto{Value: &onnx.TypeProto_TensorType{
			TensorType: &onnx.TypeProto_Tensor{ElemType: int32(onnx.TensorProto_FLOAT), Shape: shape}}}}
	}
	m := &onnx.ModelProto{IrVersion: 8, Graph: &onnx.GraphProto{Name: "g",
		Input:  []*onnx.ValueInfoProto{vi("images", -1, 3, 64, 64)},
		Output: []*onnx.ValueInfoProto{vi("logits", -1, int64(classes))}}}
	raw, err := proto.Marshal(m)
	if err != nil {
		tb.Fatal(err)
	}
	if err := os.WriteFile(path, raw, 0o644); err != nil {
		tb.Fatal(err)
	}
}
