package pipelinetest

import (
	"bytes"
	"context"
	"errors"
	"image"
	"image/png"
	"math"
	"strings"
	"testing"

	"github.com/visionserve/visionserve/pkg/engine"
	"github.com/visionserve/visionserve/pkg/modelrepo"
	"github.com/visionserve/visionserve/pkg/pipeline"
)

// fakeClassifier is an Engine for a classifier whose "logits" put 10 on
// the class equal to the red value of the image's first pixel (undoing
// the model normalisation), so results show which image went where.
type fakeClassifier struct {
	m       *modelrepo.Model
	runs    []int // batch sizes seen
	err     error
	shape   []int64 // overrides the output shape when set
	allocs  int
	frees   int
	useHeap bool
}

func (f *fakeClassifier) Run(ctx context.Context, b *engine.Batch) ([]engine.Tensor, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if f.err != nil {
		return nil, f.err
	}
	f.runs = append(f.runs, b.N)
	nc := f.m.NumClasses
	out := make([]float32, b.N*nc)
	in := f.m.Input
	for i := range b.N {
		r := int(math.Round(float64((b.Slot(i)[0]*in.Std[0] + in.Mean[0]) / in.Scale)))
		out[i*nc+r%nc] = 10
	}
	shape := []int64{int64(b.N), int64(nc)}
	if f.shape != nil {
		shape = f.shape
	}
	return []engine.Tensor{{Name: "logits", Shape: shape, Data: out}}, nil
}

func (f *fakeClassifier) Backend() string { return "fake" }
func (f *fakeClassifier) Close() error    { return nil }

// AllocBatch makes the fake a BatchAllocator, counting buffers.
func (f *fakeClassifier) AllocBatch(maxN, c, h, w int) ([]float32, func(), error) {
	f.allocs++
	return make([]float32, maxN*c*h*w), func() { f.frees++ }, nil
}

// flatPNG is a 300×200 PNG of one colour whose red value is red.
func flatPNG(t *testing.T, red uint8) []byte {
	t.Helper()
	img := image.NewNRGBA(image.Rect(0, 0, 300, 200))
	for i := 0; i < len(img.Pix); i += 4 {
		img.Pix[i], img.Pix[i+3] = red, 255
	}
	var b bytes.Buffer
	if err := png.Encode(&b, img); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// classifier is a 32×32 classifier of 256 classes, resized shorter side
// and centre-cropped, with ImageNet normalisation.
func classifier() *modelrepo.Model {
	labels := make([]string, 256)
	for i := range labels {
		labels[i] = "c" + string(rune('a'+i%26)) + string(rune('a'+i/26%26))
	}
	return &modelrepo.Model{Config: modelrepo.Config{
		Name: "test", Task: modelrepo.TaskClassify, Labels: "labels.txt",
		Input: modelrepo.InputConfig{
			Name: "images", Width: 32, Height: 32, Layout: "NCHW", Color: "RGB", Scale: 1.0 / 255,
			Resize: modelrepo.ResizeShorterCrop, ResizeShorter: 36,
			Mean: [3]float32{0.485, 0.456, 0.406}, Std: [3]float32{0.229, 0.224, 0.225},
		},
		Output:   modelrepo.OutputConfig{Name: "logits", Decoding: modelrepo.DecodeLogits},
		Defaults: modelrepo.DefaultOptions{TopK: 5, Confidence: 0.25, IoU: 0.45, MaxDetections: 300},
		Batching: modelrepo.BatchingConfig{MaxBatchSize: 4, QueueSize: 16, Instances: 1},
	}, LabelNames: labels, NumClasses: 256}
}

func TestRunnerInfer(t *testing.T) {
	m := classifier()
	m.Batching.MaxBatchSize = 4
	eng := &fakeClassifier{m: m}
	r, err := New(m, eng, pipeline.PreprocessOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var images [][]byte
	for k := range 9 {
		images = append(images, flatPNG(t, uint8(10+20*k)))
	}
	res, err := r.Infer(context.Background(), images, pipeline.Options{TopK: 1})
	if err != nil {
		t.Fatal(err)
	}
	if len(res) != 9 {
		t.Fatalf("%d results for 9 images", len(res))
	}
	for k, re := range res {
		if len(re.Classes) != 1 || re.Classes[0].Index != 10+20*k {
			t.Errorf("image %d: classes %+v, want index %d", k, re.Classes, 10+20*k)
		}
		wantBatch := 4
		if k == 8 {
			wantBatch = 1
		}
		if re.BatchSize != wantBatch || re.Backend != "fake" || re.Width != 300 || re.Height != 200 {
			t.Errorf("image %d: batch %d backend %q size %dx%d", k, re.BatchSize, re.Backend, re.Width, re.Height)
		}
		if re.Timings.Decode <= 0 || re.Timings.Preprocess <= 0 || re.Timings.Inference <= 0 || re.Timings.Postprocess <= 0 {
			t.Errorf("image %d: a stage time is zero: %+v", k, re.Timings)
		}
	}
	if got := eng.runs; len(got) != 3 || got[0] != 4 || got[1] != 4 || got[2] != 1 {
		t.Errorf("engine runs %v, want [4 4 1]", got)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if eng.allocs != 1 || eng.frees != 1 {
		t.Errorf("allocator: %d buffers allocated, %d freed; want 1 and 1 (one reused buffer)", eng.allocs, eng.frees)
	}
}

func TestRunnerErrors(t *testing.T) {
	m := classifier()
	m.Batching.MaxBatchSize = 4
	good := flatPNG(t, 50)
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	boom := errors.New("boom")
	tests := []struct {
		name    string
		eng     *fakeClassifier
		ctx     context.Context
		images  [][]byte
		opts    pipeline.Options
		wantErr error
		wantMsg string
	}{
		{"bad image names its index", &fakeClassifier{m: m}, context.Background(), [][]byte{good, good, good, good, good, []byte("junk")}, pipeline.Options{}, pipeline.ErrUnknownFormat, "image 5"},
		{"empty image", &fakeClassifier{m: m}, context.Background(), [][]byte{good, nil}, pipeline.Options{}, pipeline.ErrEmptyImage, "image 1"},
		{"engine error", &fakeClassifier{m: m, err: boom}, context.Background(), [][]byte{good}, pipeline.Options{}, boom, "fake"},
		{"cancelled", &fakeClassifier{m: m}, cancelled, [][]byte{good}, pipeline.Options{}, context.Canceled, ""},
		{"wrong output shape", &fakeClassifier{m: m, shape: []int64{1, 255}}, context.Background(), [][]byte{good}, pipeline.Options{}, nil, "want [N 256]"},
		{"bad options", &fakeClassifier{m: m}, context.Background(), [][]byte{good}, pipeline.Options{TopK: -3}, pipeline.ErrBadOptions, "top_k"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, err := New(m, tt.eng, pipeline.PreprocessOptions{})
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			_, err = r.Infer(tt.ctx, tt.images, tt.opts)
			if err == nil {
				t.Fatal("no error")
			}
			if tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
				t.Errorf("error %v, want %v", err, tt.wantErr)
			}
			if !strings.Contains(err.Error(), tt.wantMsg) {
				t.Errorf("error %q does not mention %q", err, tt.wantMsg)
			}
		})
	}
}
