package server

import (
	"bytes"
	"context"
	"image"
	"image/color"
	"image/jpeg"
	"image/png"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/test/bufconn"

	"github.com/visionserve/visionserve/pkg/engine"
	"github.com/visionserve/visionserve/pkg/engine/cvdnn"
	"github.com/visionserve/visionserve/pkg/modelrepo"
	"github.com/visionserve/visionserve/proto/inference"
	visionv1 "github.com/visionserve/visionserve/proto/visionserve/v1"
)

func TestMain(m *testing.M) {
	// Real-engine tests probe OpenCV models by re-executing this binary.
	cvdnn.RunProbeIfRequested()
	goleak.VerifyTestMain(m)
}

// fakeEngine stands in for a model: its outputs are a fixed function of
// the batch, so results can be predicted and compared bit for bit.
type fakeEngine struct {
	classes int
	detect  bool
	anchors int
	delay   time.Duration
	fail    error

	runs   atomic.Int64
	images atomic.Int64
	closed atomic.Bool
	// gate, when set, blocks each Run until it is closed or receives.
	gate chan struct{}
	// started is signalled (non-blocking) when a Run begins.
	started chan struct{}
}

func (e *fakeEngine) Backend() string { return "fake" }

func (e *fakeEngine) Close() error {
	e.closed.Store(true)
	return nil
}

func (e *fakeEngine) Run(ctx context.Context, b *engine.Batch) ([]engine.Tensor, error) {
	if e.started != nil {
		select {
		case e.started <- struct{}{}:
		default:
		}
	}
	if e.gate != nil {
		select {
		case <-e.gate:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if e.delay > 0 {
		select {
		case <-time.After(e.delay):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if e.fail != nil {
		return nil, e.fail
	}
	e.runs.Add(1)
	e.images.Add(int64(b.N))
	return e.outputs(b), nil
}

// outputs computes the fake model's output for a batch.
func (e *fakeEngine) outputs(b *engine.Batch) []engine.Tensor {
	if !e.detect {
		out := make([]float32, b.N*e.classes)
		for n := range b.N {
			slot := b.Slot(n)
			var sum float32
			for _, v := range slot {
				sum += v
			}
			mean := sum / float32(len(slot))
			// Class k's logit peaks where k/classes is near the mean
			// pixel value: brighter images score higher classes.
			for k := range e.classes {
				d := mean - float32(k)/float32(e.classes)
				out[n*e.classes+k] = -d * d * 100
			}
		}
		return []engine.Tensor{{Name: "logits", Shape: []int64{int64(b.N), int64(e.classes)}, Data: out}}
	}
	rows, a := 4+e.classes, e.anchors
	out := make([]float32, b.N*rows*a)
	for n := range b.N {
		o := out[n*rows*a : (n+1)*rows*a]
		// One object in the centre of the input, half its size, class 0.
		o[0*a], o[1*a], o[2*a], o[3*a] = float32(b.W)/2, float32(b.H)/2, float32(b.W)/2, float32(b.H)/2
		o[4*a] = 0.9
	}
	return []engine.Tensor{{Name: "output0", Shape: []int64{int64(b.N), int64(rows), int64(a)}, Data: out}}
}

// testModel describes a small model of the given task: 64x64 input.
func testModel(name string, task modelrepo.Task, classes int) *modelrepo.Model {
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

// env is a server on an in-memory connection with fake-engine models
// "cls" (classify, 10 classes) and "det" (detect, 3 classes).
type env struct {
	srv    *Server
	conn   *grpc.ClientConn
	vision visionv1.VisionServiceClient
	oip    inference.GRPCInferenceServiceClient
	cls    *fakeEngine
	det    *fakeEngine
	lis    *bufconn.Listener
	served chan error
}

type envOption func(*envConfig)

type envConfig struct {
	opts    Options
	cls     *fakeEngine
	det     *fakeEngine
	clsMod  func(*modelrepo.Model)
	dialOpt []grpc.DialOption
}

func newEnv(t testing.TB, options ...envOption) *env {
	t.Helper()
	c := envConfig{
		opts: Options{
			Limits:          Limits{MaxPixels: 40_000_000, MaxImagesPerRequest: 8, MaxStreams: 64},
			MaxMessageBytes: 4 << 20,
			Logger:          slog.New(slog.NewTextHandler(io.Discard, nil)),
		},
		cls: &fakeEngine{classes: 10},
		det: &fakeEngine{classes: 3, detect: true, anchors: 84},
	}
	for _, o := range options {
		o(&c)
	}
	reg := NewRegistry()
	clsModel := testModel("cls", modelrepo.TaskClassify, 10)
	if c.clsMod != nil {
		c.clsMod(clsModel)
	}
	for _, x := range []struct {
		m *modelrepo.Model
		e *fakeEngine
	}{{clsModel, c.cls}, {testModel("det", modelrepo.TaskDetect, 3), c.det}} {
		r, err := NewPipelineRunner(x.m, []engine.Engine{x.e}, RunnerOptions{MaxPixels: c.opts.Limits.MaxPixels})
		if err != nil {
			t.Fatal(err)
		}
		m := &Model{Model: x.m, Runner: r}
		m.SetReady(true)
		if err := reg.Add(m); err != nil {
			t.Fatal(err)
		}
	}
	c.opts.Registry = reg
	srv, err := New(c.opts)
	if err != nil {
		t.Fatal(err)
	}
	srv.SetServing()
	lis := bufconn.Listen(1 << 20)
	e := &env{srv: srv, cls: c.cls, det: c.det, lis: lis, served: make(chan error, 1)}
	go func() { e.served <- srv.Serve(lis) }()
	dial := append([]grpc.DialOption{
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64 << 20)),
	}, c.dialOpt...)
	conn, err := grpc.NewClient("passthrough:///bufnet", dial...)
	if err != nil {
		t.Fatal(err)
	}
	e.conn = conn
	e.vision = visionv1.NewVisionServiceClient(conn)
	e.oip = inference.NewGRPCInferenceServiceClient(conn)
	t.Cleanup(func() { e.close(t) })
	return e
}

var closeOnce sync.Map

func (e *env) close(t testing.TB) {
	if _, done := closeOnce.LoadOrStore(e, true); done {
		return
	}
	e.conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := e.srv.Shutdown(ctx, 5*time.Second); err != nil {
		t.Errorf("shutdown: %v", err)
	}
	if err := <-e.served; err != nil {
		t.Errorf("serve: %v", err)
	}
}

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// solidImage returns a w×h image of one grey level.
func solidImage(w, h int, v uint8) *image.RGBA {
	img := image.NewRGBA(image.Rect(0, 0, w, h))
	for i := range img.Pix {
		img.Pix[i] = v
		if i%4 == 3 {
			img.Pix[i] = 255
		}
	}
	return img
}

func jpegBytes(t testing.TB, w, h int, v uint8) []byte {
	var buf bytes.Buffer
	if err := jpeg.Encode(&buf, solidImage(w, h, v), &jpeg.Options{Quality: 95}); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func pngBytes(t testing.TB, w, h int) []byte {
	var buf bytes.Buffer
	img := image.NewGray(image.Rect(0, 0, w, h))
	img.Set(0, 0, color.Gray{Y: 7})
	if err := png.Encode(&buf, img); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func encoded(b []byte) *visionv1.Image { return encodedImage(b) }
