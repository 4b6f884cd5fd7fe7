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
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/test/bufconn"

	"github.com/visionserve/visionserve/pkg/engine"
	"github.com/visionserve/visionserve/pkg/engine/cvdnn"
	"github.com/visionserve/visionserve/pkg/model"
	"github.com/visionserve/visionserve/pkg/model/modeltest"
	"github.com/visionserve/visionserve/pkg/modelrepo"
	"github.com/visionserve/visionserve/proto/inference"
	visionv1 "github.com/visionserve/visionserve/proto/visionserve/v1"
)

func TestMain(m *testing.M) {
	// Real-engine tests probe OpenCV models by re-executing this binary.
	cvdnn.RunProbeIfRequested()
	goleak.VerifyTestMain(m)
}

// env is a server on an in-memory connection with fake-engine models
// "cls" (classify, 10 classes) and "det" (detect, 3 classes).
type env struct {
	srv    *Server
	conn   *grpc.ClientConn
	vision visionv1.VisionServiceClient
	oip    inference.GRPCInferenceServiceClient
	cls    *modeltest.Engine
	det    *modeltest.Engine
	lis    *bufconn.Listener
	served chan error
}

type envOption func(*envConfig)

type envConfig struct {
	opts    Options
	cls     *modeltest.Engine
	det     *modeltest.Engine
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
		cls: &modeltest.Engine{Classes: 10},
		det: &modeltest.Engine{Classes: 3, Detect: true, Anchors: 84},
	}
	for _, o := range options {
		o(&c)
	}
	reg := model.NewRegistry(model.RegistryOptions{})
	clsModel := modeltest.Model("cls", modelrepo.TaskClassify, 10)
	if c.clsMod != nil {
		c.clsMod(clsModel)
	}
	for _, x := range []struct {
		m *modelrepo.Model
		e *modeltest.Engine
	}{{clsModel, c.cls}, {modeltest.Model("det", modelrepo.TaskDetect, 3), c.det}} {
		r, err := model.NewPipelineRunner(x.m, []engine.Engine{x.e}, model.RunnerOptions{MaxPixels: c.opts.Limits.MaxPixels})
		if err != nil {
			t.Fatal(err)
		}
		m := model.New(x.m, r)
		if err := reg.Add(m); err != nil {
			t.Fatal(err)
		}
		m.SetState(model.Ready, nil)
	}
	c.opts.Registry = reg
	srv, err := New(c.opts)
	if err != nil {
		t.Fatal(err)
	}
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
