package benchmarks

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/visionserve/visionserve/internal/config"
	"github.com/visionserve/visionserve/internal/metrics"
	"github.com/visionserve/visionserve/internal/server"
	"github.com/visionserve/visionserve/internal/testenv"
	"github.com/visionserve/visionserve/internal/testimage"
	"github.com/visionserve/visionserve/pkg/engine"
	"github.com/visionserve/visionserve/pkg/engine/cvdnn"
	"github.com/visionserve/visionserve/pkg/gpu"
	"github.com/visionserve/visionserve/pkg/model"
	"github.com/visionserve/visionserve/pkg/modelrepo"
	"github.com/visionserve/visionserve/pkg/pipeline"
	visionv1 "github.com/visionserve/visionserve/proto/visionserve/v1"
)

// The generated models of the repository and the backends measured. GPU
// backends skip, naming what is missing, where this build or machine has
// none.
var (
	benchModels   = []string{"yolov8s", "resnet50", "mobilenetv3_large"}
	benchBackends = []string{engine.ORTCPU, engine.OpenCV, engine.ORTCUDA, engine.ORTTensorRT}
	// concurrencies of the in-process and served load levels.
	concurrencies = []int{1, 4, 16}
)

// sharedRun runs the benchmarks, then frees what they shared (engines,
// servers), so that goleak sees only what leaked.
type sharedRun struct{ m *testing.M }

func (r sharedRun) Run() int {
	code := r.m.Run()
	closeShared()
	return code
}

func TestMain(m *testing.M) {
	// The OpenCV backend probes models by re-executing this binary.
	cvdnn.RunProbeIfRequested()
	// The backends as infer-server builds them: on a machine without a
	// GPU, ort-cuda and ort-tensorrt skip with the discovery's reason.
	// $VISIONSERVE_BENCH_GPU_PADDING picks their batch padding (warmed,
	// max or none; infer-server's --gpu-batch-padding).
	cfg := config.Default()
	cfg.GPUBatchPadding = cmp.Or(os.Getenv("VISIONSERVE_BENCH_GPU_PADDING"), cfg.GPUBatchPadding)
	if lib, err := testenv.FindORTLib(); err == nil {
		cfg.ORTLib = lib
	} else {
		ortMissing = err
	}
	var err error
	if benchEngines, gpuBackends, err = server.Backends(cfg); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	goleak.VerifyTestMain(sharedRun{m}, goleak.IgnoreAnyFunction("github.com/NVIDIA/go-nvml/pkg/dl.(*DynamicLibrary).Open"))
}

var (
	sharedMu sync.Mutex // guards the fields below
	closers  []func()
	shared   = map[string]any{}   // by kind/model/backend
	failures = map[string]error{} // what could not be built, to skip again fast
)

// once builds the value under key the first time and returns it, or the
// error it failed with, every time. close frees it when the run ends.
func once[T any](key string, build func() (T, func(), error)) (T, error) {
	sharedMu.Lock()
	defer sharedMu.Unlock()
	var zero T
	if err, ok := failures[key]; ok {
		return zero, err
	}
	if v, ok := shared[key]; ok {
		return v.(T), nil
	}
	v, closeFn, err := build()
	if err != nil {
		failures[key] = err
		return zero, err
	}
	shared[key] = v
	if closeFn != nil {
		closers = append(closers, closeFn)
	}
	return v, nil
}

func closeShared() {
	sharedMu.Lock()
	defer sharedMu.Unlock()
	for i := len(closers) - 1; i >= 0; i-- {
		closers[i]()
	}
	closers, shared, failures = nil, map[string]any{}, map[string]error{}
}

// skipError is a missing model or backend: the benchmark skips with it.
type skipError struct{ msg string }

func (e skipError) Error() string { return e.msg }

func skipOrFail(b *testing.B, err error) {
	b.Helper()
	var s skipError
	if errors.As(err, &s) {
		b.Skip(s.msg)
	}
	b.Fatal(err)
}

// repoRoot is the repository root, found from this file.
func repoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Dir(filepath.Dir(file))
}

// modelsDir is the model repository measured: models/ of the repository,
// or $VISIONSERVE_BENCH_MODELS.
func modelsDir() string {
	if d := os.Getenv("VISIONSERVE_BENCH_MODELS"); d != "" {
		return d
	}
	return filepath.Join(repoRoot(), "models")
}

// loadModel reads a model of the repository, skipping when its ONNX file
// has not been generated.
func loadModel(name string) (*modelrepo.Model, error) {
	return once("model/"+name, func() (*modelrepo.Model, func(), error) {
		path := filepath.Join(modelsDir(), name, "model.onnx")
		if _, err := os.Stat(path); err != nil {
			return nil, nil, skipError{fmt.Sprintf("model %s missing: %s (run `make models`)", name, path)}
		}
		m, err := modelrepo.Load(modelsDir(), name)
		return m, nil, err
	})
}

var discard = slog.New(slog.NewTextHandler(io.Discard, nil))

// loadEngines builds n engine instances of m on exactly the named backend;
// a backend missing here, or one that cannot serve the model (and would
// fall back), is a skip naming why.
func loadEngines(ctx context.Context, name string, m *modelrepo.Model, n int) ([]engine.Engine, error) {
	if err := backendMissing(name); err != nil {
		return nil, err
	}
	engines, choice, err := benchEngines.Load(ctx, name, m, n)
	if err != nil {
		return nil, err
	}
	if choice.Backend != name {
		for _, e := range engines {
			_ = e.Close()
		}
		return nil, skipError{fmt.Sprintf("backend %s cannot run model %s: %s", name, m.Name, choice.Reason)}
	}
	return engines, nil
}

// backendMissing says, as a skip, why a backend cannot run here: not
// available in this build or machine, or the ONNX Runtime library of the
// ort-* backends not installed.
func backendMissing(name string) error {
	if _, err := benchEngines.Resolve(name); err != nil {
		return skipError{fmt.Sprintf("backend %s missing: %v", name, err)}
	}
	if strings.HasPrefix(name, "ort-") {
		if ortMissing != nil {
			return skipError{fmt.Sprintf("backend %s missing: %v", name, ortMissing)}
		}
	}
	return nil
}

// sharedEngine is one engine of model/backend for the engine and
// synchronous-pipeline levels, loaded once per run.
func sharedEngine(model, backendName string) (engine.Engine, *modelrepo.Model, error) {
	m, err := loadModel(model)
	if err != nil {
		return nil, nil, err
	}
	e, err := once("engine/"+model+"/"+backendName, func() (engine.Engine, func(), error) {
		es, err := loadEngines(context.Background(), backendName, m, 1)
		if err != nil {
			return nil, nil, err
		}
		return es[0], func() { _ = es[0].Close() }, nil
	})
	return e, m, err
}

// served is a real server of one model on one backend, on a loopback TCP
// listener, with a client connection to it.
type served struct {
	model  *modelrepo.Model
	entry  *model.Model // the registry's model: its Runner is the in-process pipeline
	client visionv1.VisionServiceClient
	addr   string
}

// sharedServer starts the server of model/backend once per run, as
// infer-server runs it: server.Run with the production interceptors,
// metrics and traces (server.ObservedRunOptions), loading, warming up
// (with self-tuning when configured) and serving on 127.0.0.1:0.
func sharedServer(name, backendName string) (*served, error) {
	m, err := loadModel(name)
	if err != nil {
		return nil, err
	}
	return once("server/"+name+"/"+backendName, func() (*served, func(), error) {
		if err := backendMissing(backendName); err != nil {
			return nil, nil, err
		}
		cfg := config.Default()
		cfg.Backend = backendName
		cfg.GRPCAddr, cfg.HTTPAddr, cfg.RESTAddr = "127.0.0.1:0", "", ""
		cfg.MaxImagesPerRequest = 64
		cfg.GracePeriod = 10 * time.Second
		prom := metrics.NewRegistry()
		mets, err := metrics.New(prom)
		if err != nil {
			return nil, nil, err
		}
		opts := server.ObservedRunOptions(discard, prom, mets)
		opts.Engines = benchEngines
		opts.Repo = &modelrepo.Repo{Root: modelsDir(), Models: []*modelrepo.Model{m}}
		opts.ServerOptions = append(opts.ServerOptions, windowServerOptions()...)
		addrs := make(chan net.Addr, 1)
		regs := make(chan *model.Registry, 1)
		opts.OnListen = func(g, _ net.Addr) { addrs <- g }
		opts.OnRegistry = func(r *model.Registry) { regs <- r }
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- server.Run(ctx, cfg, opts) }()
		stop := func() { cancel(); <-done }
		var (
			reg  *model.Registry
			addr net.Addr
		)
		for reg == nil || addr == nil {
			select {
			case reg = <-regs:
			case addr = <-addrs:
			case err := <-done:
				cancel()
				return nil, nil, fmt.Errorf("server: %w", err)
			}
		}
		// Ready once the model warmed up (and tuned).
		for ready, _ := reg.Ready(); !ready; ready, _ = reg.Ready() {
			select {
			case err := <-done:
				cancel()
				return nil, nil, fmt.Errorf("server: %v", err)
			case <-time.After(20 * time.Millisecond):
			}
		}
		entry, _ := reg.Get(m.Name)
		if got := entry.Runner.Backend(); got != backendName {
			stop()
			return nil, nil, skipError{fmt.Sprintf("backend %s cannot run model %s (the server fell back to %s)", backendName, m.Name, got)}
		}
		dial := append([]grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64 << 20))}, windowDialOptions()...)
		conn, err := grpc.NewClient(addr.String(), dial...)
		if err != nil {
			stop()
			return nil, nil, err
		}
		s := &served{model: m, entry: entry, client: visionv1.NewVisionServiceClient(conn), addr: addr.String()}
		return s, func() { conn.Close(); stop() }, nil
	})
}

// benchWindow is $VISIONSERVE_BENCH_GRPC_WINDOW: when set, the HTTP/2
// stream and connection flow-control windows of the benchmark server and
// client, in bytes (gRPC's default is 64 KiB growing by BDP estimation).
// It is there to measure what a window as big as an image saves.
func benchWindow() int32 {
	n, err := strconv.Atoi(os.Getenv("VISIONSERVE_BENCH_GRPC_WINDOW"))
	if err != nil || n < 64<<10 || n > 1<<30 {
		return 0
	}
	return int32(n)
}

func windowServerOptions() []grpc.ServerOption {
	if w := benchWindow(); w > 0 {
		return []grpc.ServerOption{grpc.InitialWindowSize(w), grpc.InitialConnWindowSize(w)}
	}
	return nil
}

func windowDialOptions() []grpc.DialOption {
	if w := benchWindow(); w > 0 {
		return []grpc.DialOption{grpc.WithInitialWindowSize(w), grpc.WithInitialConnWindowSize(w)}
	}
	return nil
}

// call sends one image to the served model over gRPC.
func (s *served) call(ctx context.Context, img []byte) error {
	images := []*visionv1.Image{{Source: &visionv1.Image_Encoded{Encoded: img}}}
	if s.model.Task == modelrepo.TaskDetect {
		r, err := s.client.Detect(ctx, &visionv1.DetectRequest{Model: s.model.Name, Images: images})
		if err == nil && len(r.GetResults()) != 1 {
			err = fmt.Errorf("%d results for 1 image", len(r.GetResults()))
		}
		return err
	}
	r, err := s.client.Classify(ctx, &visionv1.ClassifyRequest{Model: s.model.Name, Images: images})
	if err == nil && len(r.GetResults()) != 1 {
		err = fmt.Errorf("%d results for 1 image", len(r.GetResults()))
	}
	return err
}

// infer runs one image through the served model's runner in process: the
// same preprocessing, batcher and engines as a gRPC call, no network.
func (s *served) infer(ctx context.Context, img []byte) error {
	res, err := s.entry.Runner.Infer(ctx, []model.Input{{Encoded: img}}, pipeline.Options{})
	if err == nil && len(res) != 1 {
		err = fmt.Errorf("%d results for 1 image", len(res))
	}
	return err
}

// testImage is the encoded image a model is measured with: a shared test
// photo when there is one (bus.jpg for a detector, dog.jpg for a
// classifier), else a synthetic photo-like JPEG of the same size.
func testImage(m *modelrepo.Model) []byte {
	name, w, h := "dog.jpg", 640, 480
	if m.Task == modelrepo.TaskDetect {
		name, w, h = "bus.jpg", 810, 1080
	}
	v, _ := once("image/"+name, func() ([]byte, func(), error) {
		path := filepath.Join(repoRoot(), "..", "shared", "testdata", "images", name)
		if data, err := os.ReadFile(path); err == nil {
			fmt.Fprintf(os.Stderr, "benchmarks: image %s (%d bytes)\n", path, len(data))
			return data, nil, nil
		}
		// Say so: a synthetic image decodes several times faster than the
		// photo, so figures from the two do not compare.
		fmt.Fprintf(os.Stderr, "benchmarks: %s missing, using a synthetic %dx%d JPEG instead\n", path, w, h)
		return testimage.JPEG(w, h), nil, nil
	})
	return v
}

// measure runs op b.N times from conc goroutines after one untimed op
// (lazy allocations, first-shape work), and reports images/s (b.N ×
// imagesPerOp over the wall time), p50 and p99 latency of one op in ms,
// and allocations per op.
func measure(b *testing.B, conc, imagesPerOp int, op func(context.Context) error) {
	b.Helper()
	ctx := context.Background()
	if err := op(ctx); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	lat := make([]time.Duration, b.N)
	var (
		next    atomic.Int64
		errOnce sync.Once
		firstEr error
		wg      sync.WaitGroup
	)
	b.ResetTimer()
	start := time.Now()
	for range min(conc, b.N) {
		wg.Go(func() {
			for {
				i := next.Add(1) - 1
				if i >= int64(b.N) {
					return
				}
				t := time.Now()
				err := op(ctx)
				lat[i] = time.Since(t)
				if err != nil {
					errOnce.Do(func() { firstEr = err })
					return
				}
			}
		})
	}
	wg.Wait()
	wall := time.Since(start)
	b.StopTimer()
	if firstEr != nil {
		b.Fatal(firstEr)
	}
	reportLatency(b, lat, float64(b.N*imagesPerOp)/wall.Seconds())
}

// reportLatency reports images/s and the p50 and p99 of lat in ms.
func reportLatency(b *testing.B, lat []time.Duration, imagesPerSec float64) {
	slices.Sort(lat)
	pct := func(p float64) float64 {
		return float64(lat[min(len(lat)-1, int(p*float64(len(lat))))].Nanoseconds()) / 1e6
	}
	b.ReportMetric(imagesPerSec, "images/s")
	b.ReportMetric(pct(0.50), "p50-ms")
	b.ReportMetric(pct(0.99), "p99-ms")
	// ns/op is the wall time per op across all goroutines; images/s and
	// the percentiles are what to read.
}

// gpuMemory is implemented by GPU engines that know their device memory
// use; benchmarks report it as gpu-mem-MB.
type gpuMemory interface {
	GPUMemoryBytes() (uint64, error)
}

// benchEngines are the backends, built once in TestMain; ortMissing is why
// the ONNX Runtime library is not there, if it is not.
var (
	benchEngines *engine.Registry
	ortMissing   error
)

// gpuBackends is the GPU backends' state; its ledger holds the GPU
// memory of every model loaded on them.
var gpuBackends *gpu.Backends

// reportServedGPUMemory reports, as gpu-mem-MB, the GPU memory the ledger
// holds for model (all devices); nothing on a model not on a GPU.
func reportServedGPUMemory(b *testing.B, model string) {
	var total uint64
	found := false
	for _, m := range gpuBackends.Ledger().Snapshot() {
		if m.Model == model {
			total += m.Footprint()
			found = true
		}
	}
	if found {
		b.ReportMetric(float64(total)/(1<<20), "gpu-mem-MB")
	}
}

func reportGPUMemory(b *testing.B, e engine.Engine) {
	if g, ok := e.(gpuMemory); ok {
		if n, err := g.GPUMemoryBytes(); err == nil {
			b.ReportMetric(float64(n)/(1<<20), "gpu-mem-MB")
		}
	}
}

// noClose lends a shared engine to a runner that would close it.
type noClose struct{ engine.Engine }

func (noClose) Close() error { return nil }
