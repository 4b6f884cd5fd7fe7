package pipeline

import (
	"context"
	"errors"
	"image"
	"image/color"
	"math"
	"strings"
	"testing"

	"github.com/visionserve/visionserve/pkg/engine"
	"github.com/visionserve/visionserve/pkg/modelrepo"
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

func flatPNG(t *testing.T, red uint8) []byte {
	c := color.NRGBA{red, 0, 0, 255}
	return encodePNG(t, rectImage(300, 200, image.Rectangle{}, c, c))
}

func TestRunnerInfer(t *testing.T) {
	checkMats(t)
	m := testModel(modelrepo.TaskClassify, modelrepo.ResizeShorterCrop, 32, 32, 256)
	m.Batching.MaxBatchSize = 4
	eng := &fakeClassifier{m: m}
	r, err := New(m, eng, PreprocessOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var images [][]byte
	for k := range 9 {
		images = append(images, flatPNG(t, uint8(10+20*k)))
	}
	res, err := r.Infer(context.Background(), images, Options{TopK: 1})
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
	m := testModel(modelrepo.TaskClassify, modelrepo.ResizeShorterCrop, 32, 32, 256)
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
		opts    Options
		wantErr error
		wantMsg string
	}{
		{"bad image names its index", &fakeClassifier{m: m}, context.Background(), [][]byte{good, good, good, good, good, []byte("junk")}, Options{}, ErrUnknownFormat, "image 5"},
		{"empty image", &fakeClassifier{m: m}, context.Background(), [][]byte{good, nil}, Options{}, ErrEmptyImage, "image 1"},
		{"engine error", &fakeClassifier{m: m, err: boom}, context.Background(), [][]byte{good}, Options{}, boom, "fake"},
		{"cancelled", &fakeClassifier{m: m}, cancelled, [][]byte{good}, Options{}, context.Canceled, ""},
		{"wrong output shape", &fakeClassifier{m: m, shape: []int64{1, 255}}, context.Background(), [][]byte{good}, Options{}, nil, "want [N 256]"},
		{"bad options", &fakeClassifier{m: m}, context.Background(), [][]byte{good}, Options{TopK: -3}, ErrBadOptions, "top_k"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			checkMats(t)
			r, err := New(m, tt.eng, PreprocessOptions{})
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

func TestBatchPool(t *testing.T) {
	p, err := engine.NewBatchPool(2, 3, 4, 5, 1, nil)
	if err != nil {
		t.Fatal(err)
	}
	a, _ := p.Get()
	b, _ := p.Get()
	if a == b || len(a.Data) != 2*3*4*5 || a.SlotSize() != 60 {
		t.Fatalf("bad batches %p %p len %d", a, b, len(a.Data))
	}
	a.N = 2
	p.Put(a)
	p.Put(b) // beyond maxIdle: dropped
	c, _ := p.Get()
	if c != a || c.N != 0 {
		t.Errorf("Get did not reuse the idle batch (or left N=%d)", c.N)
	}
	p.Close()
	if _, err := p.Get(); err == nil {
		t.Error("Get after Close: no error")
	}
	if _, err := engine.NewBatchPool(0, 3, 4, 5, 1, nil); err == nil {
		t.Error("zero capacity: no error")
	}
}
