package server

import (
	"context"
	"io"
	"log/slog"
	"net"
	"os"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/visionserve/visionserve/internal/config"
	"github.com/visionserve/visionserve/internal/server/servertest"
	"github.com/visionserve/visionserve/internal/testenv"
	"github.com/visionserve/visionserve/pkg/engine"
	"github.com/visionserve/visionserve/pkg/modelrepo"
	"github.com/visionserve/visionserve/pkg/pipeline"
	"github.com/visionserve/visionserve/proto/inference"
	visionv1 "github.com/visionserve/visionserve/proto/visionserve/v1"
)

// realServer runs Run on a repository of the real shared models with the
// given backend and returns a client connection once it reports SERVING.
func realServer(t testing.TB, repo, backendName string, tweak ...func(*config.Config)) (*grpc.ClientConn, chan<- os.Signal, <-chan error) {
	t.Helper()
	cfg := config.Default()
	cfg.ORTLib = testenv.ORTLib(t)
	cfg.ModelRepo, cfg.Backend = repo, backendName
	for _, f := range tweak {
		f(&cfg)
	}
	cfg.GRPCAddr, cfg.HTTPAddr, cfg.RESTAddr = "127.0.0.1:0", "127.0.0.1:0", ""
	cfg.GracePeriod = 10 * time.Second
	stop := make(chan os.Signal, 1)
	addrs := make(chan net.Addr, 1)
	done := make(chan error, 1)
	var logTo io.Writer = testLogWriter{t}
	if _, bench := t.(*testing.B); bench {
		logTo = io.Discard // keep benchmark output to its metrics
	}
	go func() {
		done <- Run(context.Background(), cfg, RunOptions{
			Logger:   slog.New(slog.NewTextHandler(logTo, nil)),
			Stop:     stop,
			OnListen: func(g, _ net.Addr) { addrs <- g },
		})
	}()
	var addr string
	select {
	case a := <-addrs:
		addr = a.String()
	case err := <-done:
		t.Fatalf("Run: %v", err)
	case <-time.After(2 * time.Minute):
		t.Fatal("server did not listen")
	}
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	health := healthpb.NewHealthClient(conn)
	deadline := time.Now().Add(3 * time.Minute)
	for {
		r, err := health.Check(ctxT(t), &healthpb.HealthCheckRequest{Service: VisionServiceName})
		if err == nil && r.Status == healthpb.HealthCheckResponse_SERVING {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("not SERVING after warm-up: %v %v", r, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return conn, stop, done
}

// stopServer sends SIGTERM to a Run and checks it returns nil.
func stopServer(t testing.TB, stop chan<- os.Signal, done <-chan error) {
	t.Helper()
	stop <- syscall.SIGTERM
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run after SIGTERM: %v", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("Run did not return after SIGTERM")
	}
}

// TestRunRealModels serves the real int8 models through Run. With auto
// (OpenCV on a machine without GPU) yolov8n_int8, whose ConvInteger
// OpenCV 4.6 cannot import, fails the probe in a child process and falls
// back to ONNX Runtime, which must not end this process.
func TestRunRealModels(t *testing.T) {
	for _, tt := range []struct{ backend, mobilenet, yolo string }{
		{"auto", "", "ort-cpu"},
		{"ort-cpu", "ort-cpu", "ort-cpu"},
	} {
		t.Run(tt.backend, func(t *testing.T) { testRealModels(t, tt.backend, tt.mobilenet, tt.yolo) })
	}
}

func testRealModels(t *testing.T, backendName, wantMobileNet, wantYOLO string) {
	repo := servertest.Repo(t, servertest.MobileNetV2, servertest.YOLOv8n)
	conn, stop, done := realServer(t, repo, backendName)
	vision := visionv1.NewVisionServiceClient(conn)
	ctx := ctxT(t)

	info, err := vision.ModelInfo(ctx, &visionv1.ModelInfoRequest{Model: servertest.MobileNetV2})
	if err != nil {
		t.Fatal(err)
	}
	if (wantMobileNet != "" && info.Backend != wantMobileNet) || info.LabelsCount != 1000 || info.InputWidth != 224 {
		t.Errorf("mobilenetv2 info: %v", info)
	}
	yinfo, err := vision.ModelInfo(ctx, &visionv1.ModelInfoRequest{Model: servertest.YOLOv8n})
	if err != nil {
		t.Fatal(err)
	}
	if yinfo.Backend != wantYOLO {
		t.Errorf("yolov8n served on %s, want %s", yinfo.Backend, wantYOLO)
	}

	cls, err := vision.Classify(ctx, &visionv1.ClassifyRequest{Model: servertest.MobileNetV2, Images: []*visionv1.Image{encoded(servertest.Image(t, "dog.jpg"))}})
	if err != nil {
		t.Fatal(err)
	}
	top := cls.Results[0].Classes[0]
	if top.Label != "Samoyed" || top.Score < 0.75 || top.Score > 0.95 {
		t.Errorf("dog.jpg top-1 %q %.3f, want Samoyed ~0.87", top.Label, top.Score)
	}
	if r := cls.Results[0]; r.Width != 1546 || r.Height != 1213 || r.Backend != info.Backend {
		t.Errorf("dog.jpg result %dx%d on %s", r.Width, r.Height, r.Backend)
	}

	det, err := vision.Detect(ctx, &visionv1.DetectRequest{Model: servertest.YOLOv8n, Images: []*visionv1.Image{
		encoded(servertest.Image(t, "bus.jpg")), encoded(servertest.Image(t, "zidane.jpg")),
	}})
	if err != nil {
		t.Fatal(err)
	}
	count := func(r *visionv1.ImageResult, label string, minScore float32) int {
		n := 0
		for _, d := range r.Detections {
			if d.Label == label && d.Score >= minScore {
				n++
				if d.Box.X1 < 0 || d.Box.Y1 < 0 || d.Box.X2 > float32(r.Width) || d.Box.Y2 > float32(r.Height) || d.Box.X2 <= d.Box.X1 {
					t.Errorf("box outside the %dx%d image: %v", r.Width, r.Height, d.Box)
				}
			}
		}
		return n
	}
	if bus := det.Results[0]; count(bus, "bus", 0.7) != 1 || count(bus, "person", 0.8) < 3 || bus.Width != 810 || bus.Height != 1080 {
		t.Errorf("bus.jpg: %v", bus.Detections)
	}
	if z := det.Results[1]; count(z, "person", 0.7) != 2 {
		t.Errorf("zidane.jpg: %v", z.Detections)
	}

	// OIP on preprocessed FP32 input (dog.jpg as the pipeline prepares
	// it) equals the serving backend's engine output bit for bit.
	m, err := modelrepo.Load(repo, servertest.MobileNetV2)
	if err != nil {
		t.Fatal(err)
	}
	pre, err := pipeline.NewPreprocessor(m, pipeline.PreprocessOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p, err := pre.Prepare(servertest.Image(t, "dog.jpg"))
	if err != nil {
		t.Fatal(err)
	}
	in := make([]float32, 3*224*224)
	if err := p.Fill(in); err != nil {
		t.Fatal(err)
	}
	p.Close()
	checkRawMatchesEngine(t, conn, m, info.Backend, in)
	stopServer(t, stop, done)
}

type testLogWriter struct{ t testing.TB }

func (w testLogWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

// checkRawMatchesEngine sends in ([N,3,H,W] floats) to ModelInfer as raw
// FP32 and checks that the answer equals, bit for bit, the output of an
// engine of the serving backend loaded here and run on the same batch.
func checkRawMatchesEngine(t *testing.T, conn *grpc.ClientConn, m *modelrepo.Model, backendName string, in []float32) {
	t.Helper()
	ctx := ctxT(t)
	h, w := m.Input.Height, m.Input.Width
	n := len(in) / (3 * h * w)
	cfg := config.Default()
	cfg.ORTLib = testenv.ORTLib(t)
	backends, _, err := Backends(cfg)
	if err != nil {
		t.Fatal(err)
	}
	engines, _, err := backends.Load(ctx, backendName, m, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer engines[0].Close()
	batch := engine.NewBatch(n, 3, h, w)
	batch.N = n
	copy(batch.Data, in)
	outs, err := engines[0].Run(ctx, batch)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := inference.NewGRPCInferenceServiceClient(conn).ModelInfer(ctx, &inference.ModelInferRequest{
		ModelName:        m.Name,
		Inputs:           []*inferInput{{Name: m.Input.Name, Datatype: "FP32", Shape: []int64{int64(n), 3, int64(h), int64(w)}}},
		RawInputContents: [][]byte{fp32Raw(in)},
	})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(resp.Outputs[0].Shape, outs[0].Shape) || !slices.Equal(resp.RawOutputContents[0], fp32Raw(outs[0].Data)) {
		t.Errorf("%s on %s: OIP raw output %v differs from the engine's %v", m.Name, backendName, resp.Outputs[0].Shape, outs[0].Shape)
	}
}

// TestRunGeneratedModels serves the project's generated fp32 models on
// OpenCV, the default backend of a machine without GPU: the classifier as
// it is, the YOLOv8s detector through the engine's cut graph and host
// decode. OIP answers must be what the engine gives.
func TestRunGeneratedModels(t *testing.T) {
	if testing.Short() {
		t.Skip("loads the generated fp32 models")
	}
	repo := servertest.GeneratedRepo(t, "mobilenetv3_large", "yolov8s")
	conn, stop, done := realServer(t, repo, "opencv")
	vision := visionv1.NewVisionServiceClient(conn)
	list, err := vision.ListModels(ctxT(t), &visionv1.ListModelsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, info := range list.Models {
		if info.Backend != "opencv" || !info.Ready {
			t.Errorf("%s: backend %s ready %v, want opencv and ready", info.Name, info.Backend, info.Ready)
		}
	}
	for _, name := range []string{"mobilenetv3_large", "yolov8s"} {
		m, err := modelrepo.Load(repo, name)
		if err != nil {
			t.Fatal(err)
		}
		in := make([]float32, 3*m.Input.Height*m.Input.Width)
		for i := range in {
			in[i] = float32(i%251) / 251
		}
		checkRawMatchesEngine(t, conn, m, "opencv", in)
	}
	det, err := vision.Detect(ctxT(t), &visionv1.DetectRequest{Model: "yolov8s", Images: []*visionv1.Image{encoded(jpegBytes(t, 320, 200, 90))}})
	if err != nil {
		t.Fatal(err)
	}
	if r := det.Results[0]; r.Width != 320 || r.Height != 200 || r.Backend != "opencv" {
		t.Errorf("detect result %dx%d on %s", r.Width, r.Height, r.Backend)
	}
	stopServer(t, stop, done)
}
