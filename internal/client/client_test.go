package client

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
	"gocv.io/x/gocv"

	"github.com/visionserve/visionserve/internal/server"
	"github.com/visionserve/visionserve/pkg/engine"
	"github.com/visionserve/visionserve/pkg/model"
	"github.com/visionserve/visionserve/pkg/modelrepo"
	"github.com/visionserve/visionserve/pkg/pipeline"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// fakeRunner answers every image with a fixed result scaled to its size.
type fakeRunner struct{ delay time.Duration }

func (f *fakeRunner) Infer(ctx context.Context, in []model.Input, _ pipeline.Options) ([]pipeline.Result, error) {
	if f.delay > 0 {
		select {
		case <-time.After(f.delay):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	out := make([]pipeline.Result, len(in))
	for i := range in {
		out[i] = pipeline.Result{
			Width: 64, Height: 48, Backend: "fake", BatchSize: len(in),
			Classes:    []pipeline.Class{{Index: 3, Label: "cat", Score: 0.75}},
			Detections: []pipeline.Detection{{Index: 1, Label: "dog", Score: 0.5, Box: pipeline.Box{X1: 4, Y1: 5, X2: 30, Y2: 40}}},
		}
	}
	return out, nil
}

func (f *fakeRunner) InferRaw(context.Context, []model.Input) ([]engine.Tensor, error) {
	return nil, nil
}
func (f *fakeRunner) Backend() string             { return "fake" }
func (f *fakeRunner) Close(context.Context) error { return nil }

func startServer(t *testing.T, delay time.Duration) string {
	t.Helper()
	reg := model.NewRegistry(model.RegistryOptions{})
	for _, task := range []modelrepo.Task{modelrepo.TaskClassify, modelrepo.TaskDetect} {
		m := model.New(&modelrepo.Model{Config: modelrepo.Config{
			Name: string(task), Task: task, Input: modelrepo.InputConfig{Width: 32, Height: 32},
		}, Graph: &modelrepo.GraphIO{}}, &fakeRunner{delay: delay})
		if err := reg.Add(m); err != nil {
			t.Fatal(err)
		}
		m.SetState(model.Ready, nil)
	}
	srv, err := server.New(server.Options{
		Registry: reg, MaxMessageBytes: 16 << 20,
		Limits: server.Limits{MaxPixels: 1 << 24, MaxImagesPerRequest: 8, MaxStreams: 4},
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(lis) }()
	t.Cleanup(func() {
		if err := srv.Shutdown(context.Background(), 5*time.Second); err != nil {
			t.Error(err)
		}
		<-served
	})
	return lis.Addr().String()
}

func writeJPEG(t *testing.T, path string) {
	t.Helper()
	img := gocv.NewMatWithSizeFromScalar(gocv.NewScalar(60, 120, 180, 0), 48, 64, gocv.MatTypeCV8UC3)
	defer img.Close()
	if !gocv.IMWrite(path, img) {
		t.Fatalf("writing %s", path)
	}
}

func runClient(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	var out, errOut bytes.Buffer
	code := Main(context.Background(), args, &out, &errOut, func(string) string { return "" })
	return out.String(), errOut.String(), code
}

func TestClassifyJSON(t *testing.T) {
	addr := startServer(t, 0)
	dir := t.TempDir()
	for _, n := range []string{"a.jpg", "b.jpg"} {
		writeJPEG(t, filepath.Join(dir, n))
	}
	os.WriteFile(filepath.Join(dir, "notes.txt"), []byte("skip me"), 0o644)
	out, errOut, code := runClient(t, "classify", "--addr", addr, "--model", "classify", "--json", dir)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 2 {
		t.Fatalf("%d lines, want 2: %s", len(lines), out)
	}
	want := `{"image":"` + filepath.Join(dir, "a.jpg") + `","model":"classify","backend":"fake","classes":[{"label":"cat","index":3,"score":0.75}]}`
	if lines[0] != want {
		t.Errorf("got  %s\nwant %s", lines[0], want)
	}
}

func TestDetectTableAndDraw(t *testing.T) {
	addr := startServer(t, 0)
	dir := t.TempDir()
	img := filepath.Join(dir, "x.jpg")
	writeJPEG(t, img)
	drawn := filepath.Join(dir, "out", "x.png")
	out, errOut, code := runClient(t, "detect", "--addr", addr, "--model", "detect", "--draw", drawn, img)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	if !strings.Contains(out, "dog (1)") || !strings.Contains(out, "4.0,5.0,30.0,40.0") || !strings.Contains(out, "64x48") {
		t.Errorf("table:\n%s", out)
	}
	m := gocv.IMRead(drawn, gocv.IMReadColor)
	defer m.Close()
	if m.Empty() || m.Cols() != 64 {
		t.Fatalf("drawn image missing or wrong: %v", m.Size())
	}
	// The box edge is green where the original was not.
	if v := m.GetVecbAt(20, 4); v[1] < 150 || v[0] > 100 {
		t.Errorf("no box drawn at the left edge: %v", v)
	}
	var jd JSONDetection
	out, _, _ = runClient(t, "detect", "--addr", addr, "--model", "detect", "--json", img)
	var line struct{ Detections []JSONDetection }
	if err := json.Unmarshal([]byte(out), &line); err != nil || len(line.Detections) != 1 {
		t.Fatalf("json %q: %v", out, err)
	}
	jd = line.Detections[0]
	if jd.Box != (JSONBox{X1: 4, Y1: 5, X2: 30, Y2: 40}) || jd.Label != "dog" {
		t.Errorf("detection %+v", jd)
	}
}

func TestVideoOverStream(t *testing.T) {
	addr := startServer(t, 30*time.Millisecond)
	dir := t.TempDir()
	path := filepath.Join(dir, "clip.avi")
	vw, err := gocv.VideoWriterFile(path, "MJPG", 25, 64, 48, true)
	if err != nil {
		t.Skipf("no video writer in this OpenCV build: %v", err)
	}
	for i := range 20 {
		f := gocv.NewMatWithSizeFromScalar(gocv.NewScalar(float64(i*10), 100, 50, 0), 48, 64, gocv.MatTypeCV8UC3)
		vw.Write(f)
		f.Close()
	}
	vw.Close()
	out, errOut, code := runClient(t, "detect", "--addr", addr, "--model", "detect", "--json", path)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	// Every frame is a line of its own or counted in the next line's
	// dropped_frames, in order.
	lines := strings.Split(strings.TrimSpace(out), "\n")
	var accounted, last uint64
	for i, l := range lines {
		var r JSONResult
		if err := json.Unmarshal([]byte(l), &r); err != nil {
			t.Fatal(err)
		}
		if r.Frame == nil || *r.Frame != last+1+r.DroppedFrames {
			t.Fatalf("line %d is frame %v with %d dropped after frame %d", i, r.Frame, r.DroppedFrames, last)
		}
		last = *r.Frame
		accounted += 1 + r.DroppedFrames
	}
	if accounted != 20 || len(lines) < 1 {
		t.Errorf("%d lines accounting for %d of 20 frames:\n%s", len(lines), accounted, out)
	}
}

func TestLoad(t *testing.T) {
	addr := startServer(t, 0)
	img := filepath.Join(t.TempDir(), "x.jpg")
	writeJPEG(t, img)
	out, errOut, code := runClient(t, "load", "--addr", addr, "--model", "classify", "--concurrency", "3", "--requests", "30", img)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	if !strings.Contains(out, "30 requests, 0 errors") || !strings.Contains(out, "p99") || !strings.Contains(errOut, "100%") {
		t.Errorf("stdout:\n%s\nstderr:\n%s", out, errOut)
	}
	// A timed run ends without counting the calls cut by its end as errors.
	out, errOut, code = runClient(t, "load", "--addr", addr, "--model", "classify", "--concurrency", "4", "--duration", "300ms", img)
	if code != 0 || !strings.Contains(out, " 0 errors") {
		t.Errorf("timed run: exit %d\n%s\n%s", code, out, errOut)
	}
}

// TestTensorLoad: --tensor sends zero FP32 inputs through ModelInfer.
func TestTensorLoad(t *testing.T) {
	addr := startServer(t, 0)
	out, errOut, code := runClient(t, "load", "--addr", addr, "--model", "classify", "--tensor", "--concurrency", "2", "--requests", "10")
	if code != 0 || !strings.Contains(out, "ModelInfer, FP32") || !strings.Contains(out, "10 requests, 0 errors") {
		t.Errorf("exit %d\n%s\n%s", code, out, errOut)
	}
}

func TestErrors(t *testing.T) {
	addr := startServer(t, 0)
	img := filepath.Join(t.TempDir(), "x.jpg")
	writeJPEG(t, img)
	for _, args := range [][]string{
		{"frobnicate", "--addr", addr},
		{"classify", "--addr", addr, img},
		{"classify", "--addr", addr, "--model", "nope", img},
		{"classify", "--addr", addr, "--model", "classify", "/no/such/file.jpg"},
		{"load", "--addr", addr, "--model", "classify", img},
	} {
		if _, errOut, code := runClient(t, args...); code == 0 || !strings.Contains(errOut, "infer-client:") {
			t.Errorf("%v: exit %d, stderr %q", args, code, errOut)
		}
	}
}
