package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/visionserve/visionserve/internal/machine"
	visionv1 "github.com/visionserve/visionserve/proto/visionserve/v1"
)

var update = flag.Bool("update", false, "rewrite the golden files")

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func TestOpenLoopOffersTheRate(t *testing.T) {
	var n atomic.Int64
	call := func(ctx context.Context) error {
		time.Sleep(time.Millisecond)
		if n.Add(1)%4 == 0 {
			return status.Error(codes.ResourceExhausted, "full")
		}
		return nil
	}
	p := openLoop(context.Background(), 200, 500*time.Millisecond, 64, call)
	// 200/s for 0.5 s is 100 requests, evenly spaced from t=0.
	if p.Requests != 100 || p.Dropped != 0 {
		t.Fatalf("%d requests, %d dropped, want 100 and 0", p.Requests, p.Dropped)
	}
	if p.Errors != 25 || p.ErrorCodes["ResourceExhausted"] != 25 {
		t.Errorf("errors %d %v, want 25 ResourceExhausted", p.Errors, p.ErrorCodes)
	}
	if p.P50 < time.Millisecond || p.P99 < p.P50 || p.P90 < p.P50 {
		t.Errorf("latencies p50 %v p90 %v p99 %v", p.P50, p.P90, p.P99)
	}
	if p.Throughput <= 0 || p.Throughput > 200 {
		t.Errorf("throughput %v, want successes over the elapsed time, at most the rate", p.Throughput)
	}
}

func TestOpenLoopCountsWhatItCannotSend(t *testing.T) {
	release := make(chan struct{})
	call := func(ctx context.Context) error {
		<-release
		return nil
	}
	done := make(chan Point)
	go func() { done <- openLoop(context.Background(), 1000, 100*time.Millisecond, 2, call) }()
	time.Sleep(150 * time.Millisecond)
	close(release)
	p := <-done
	if p.Requests != 2 || p.Dropped < 90 {
		t.Fatalf("%d requests, %d dropped; want 2 sent and the rest dropped", p.Requests, p.Dropped)
	}
	// Latency runs from the scheduled send: the held calls waited.
	if p.P50 < 100*time.Millisecond {
		t.Errorf("p50 %v, want the time the calls were held", p.P50)
	}
}

func TestOpenLoopStopsWithContext(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	start := time.Now()
	p := openLoop(ctx, 100, time.Hour, 8, func(context.Context) error { return nil })
	if time.Since(start) > 5*time.Second || p.Requests == 0 {
		t.Fatalf("took %v with %d requests", time.Since(start), p.Requests)
	}
}

func TestPercentiles(t *testing.T) {
	var lat []time.Duration
	for i := 100; i >= 1; i-- {
		lat = append(lat, time.Duration(i)*time.Millisecond)
	}
	p50, p90, p99 := percentiles(lat)
	if p50 != 51*time.Millisecond || p90 != 91*time.Millisecond || p99 != 100*time.Millisecond {
		t.Fatalf("p50 %v p90 %v p99 %v", p50, p90, p99)
	}
	if a, b, c := percentiles(nil); a != 0 || b != 0 || c != 0 {
		t.Fatal("percentiles of nothing are not zero")
	}
}

func TestParseFlags(t *testing.T) {
	tests := []struct {
		args []string
		bad  string
	}{
		{[]string{"-concurrency", "1,x"}, "-concurrency"},
		{[]string{"-concurrency", "0"}, "-concurrency"},
		{[]string{"-concurrency", ""}, "no client count"},
		{[]string{"-rates", "-3"}, "-rates"},
		{[]string{"-rate-fractions", "NaN"}, "-rate-fractions"},
		{[]string{"-step", "0s"}, "-step"},
		{[]string{"-addr", " , "}, "no address"},
		{[]string{"extra"}, "unexpected"},
	}
	for _, tt := range tests {
		_, err := parseFlags(tt.args, &bytes.Buffer{})
		if err == nil || !strings.Contains(err.Error(), tt.bad) {
			t.Errorf("parseFlags(%q) = %v, want an error about %s", tt.args, err, tt.bad)
		}
	}
	o, err := parseFlags([]string{"-addr", "a:1,b:2", "-concurrency", "1, 4", "-rates", "2.5", "-machine", "my box/1"}, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	if len(o.addrs) != 2 || len(o.concurrency) != 2 || o.concurrency[1] != 4 || o.rates[0] != 2.5 || o.machine != "my-box-1" {
		t.Errorf("options %+v", o)
	}
}

func TestHelpers(t *testing.T) {
	for in, want := range map[float64]float64{0: 0.1, 3.14159: 3.1, 47.36: 47, 123.4: 120, 0.0456: 0.046} {
		if got := roundRate(in); got != want {
			t.Errorf("roundRate(%v) = %v, want %v", in, got, want)
		}
	}
	for in, want := range map[string]string{"": "machine", "..": "machine", "ci-box": "ci-box", "a b/c": "a-b-c"} {
		if got := sanitize(in); got != want {
			t.Errorf("sanitize(%q) = %q, want %q", in, got, want)
		}
	}
	if got := commandLine([]string{"-addr", "x:1", "-models", "a b"}); got != "loadsweep -addr x:1 -models 'a b'" {
		t.Errorf("commandLine = %q", got)
	}
}

// sampleReport is a fixed report for the golden file and the plot.
func sampleReport() Report {
	ms := time.Millisecond
	return Report{
		Date:    time.Date(2026, 11, 23, 8, 0, 0, 0, time.UTC),
		Command: "loadsweep -addr 127.0.0.1:8001 -step 10s",
		Machine: machine.Machine{Name: "ci", CPUModel: "AMD EPYC", Cores: 2, MemBytes: 24 << 30, OS: "Debian GNU/Linux 12 (bookworm)",
			Kernel: "6.1", Go: "go1.26.8", ORT: "1.29.0", OpenCV: "4.6.0", Commit: "abc123", LoadStart: "0.5 0.4 0.3", LoadEnd: "2.0 1.0 0.5"},
		Step: 10 * time.Second, Warmup: 3 * time.Second,
		Sweeps: []ModelSweep{{
			Model: "resnet50", Backend: "ort-cpu", Task: "classify", Addr: "127.0.0.1:8001", Image: "synthetic 640x480 JPEG", Plot: "resnet50-ort-cpu.png",
			Points: []Point{
				{Mode: ModeClosed, Concurrency: 1, Requests: 400, Throughput: 40, P50: 24 * ms, P90: 26 * ms, P99: 30 * ms},
				{Mode: ModeClosed, Concurrency: 4, Requests: 450, Throughput: 45, P50: 88 * ms, P90: 95 * ms, P99: 110 * ms},
				{Mode: ModeOpen, Rate: 22, Requests: 220, Throughput: 22, P50: 26 * ms, P90: 40 * ms, P99: 60 * ms},
				{Mode: ModeOpen, Rate: 50, Requests: 470, Errors: 20, Dropped: 3, Throughput: 45, P50: 900 * ms, P90: 1500 * ms, P99: 2000 * ms,
					ErrorCodes: map[string]int{"ResourceExhausted": 15, "DeadlineExceeded": 5}},
			},
		}},
	}
}

func TestReportGolden(t *testing.T) {
	var buf bytes.Buffer
	if err := sampleReport().writeMarkdown(&buf); err != nil {
		t.Fatal(err)
	}
	golden := filepath.Join("testdata", "report.golden.md")
	if *update {
		if err := os.WriteFile(golden, buf.Bytes(), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatalf("%v (run go test -update to write it)", err)
	}
	if !bytes.Equal(buf.Bytes(), want) {
		t.Errorf("report differs from %s (go test -update rewrites it):\n%s", golden, buf.String())
	}
	h := sampleReport().headlines()
	if len(h) != 1 || h[0].Peak != 45 || h[0].PeakAt != "conc 4" || h[0].P50One != 24*time.Millisecond {
		t.Errorf("headlines %+v", h)
	}
}

func TestWritePlot(t *testing.T) {
	s := sampleReport().Sweeps[0]
	// A point where nothing succeeded must not break the log axis.
	s.Points = append(s.Points, Point{Mode: ModeOpen, Rate: 500, Requests: 10, Errors: 10})
	path := filepath.Join(t.TempDir(), "p.png")
	if err := writePlot(s, path); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(b, []byte("\x89PNG\r\n\x1a\n")) || len(b) < 5000 {
		t.Fatalf("not a drawn PNG: %d bytes", len(b))
	}
}

// fakeVision serves one ready classifier that answers after a short
// delay, so a sweep can run against a real gRPC server.
type fakeVision struct {
	visionv1.UnimplementedVisionServiceServer
	calls atomic.Int64
}

func (f *fakeVision) ListModels(context.Context, *visionv1.ListModelsRequest) (*visionv1.ListModelsResponse, error) {
	return &visionv1.ListModelsResponse{Models: []*visionv1.ModelInfoResponse{
		{Name: "cls", Task: visionv1.Task_TASK_CLASSIFY, Backend: "fake", Ready: true},
	}}, nil
}

func (f *fakeVision) Classify(_ context.Context, r *visionv1.ClassifyRequest) (*visionv1.ClassifyResponse, error) {
	f.calls.Add(1)
	time.Sleep(2 * time.Millisecond)
	return &visionv1.ClassifyResponse{Model: r.GetModel(), Results: make([]*visionv1.ImageResult, len(r.GetImages()))}, nil
}

func TestSweepWritesReport(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	fake := &fakeVision{}
	visionv1.RegisterVisionServiceServer(srv, fake)
	go srv.Serve(lis)
	defer srv.Stop()

	out := t.TempDir()
	var stdout, stderr bytes.Buffer
	args := []string{"-addr", lis.Addr().String(), "-concurrency", "1,2", "-rate-fractions", "0.5", "-step", "200ms", "-warmup", "50ms", "-out", out, "-machine", "test"}
	if code := run(context.Background(), args, &stdout, &stderr); code != 0 {
		t.Fatalf("exit %d: %s", code, stderr.String())
	}
	dirs, _ := filepath.Glob(filepath.Join(out, "*-test"))
	if len(dirs) != 1 {
		t.Fatalf("result folders %v", dirs)
	}
	md, err := os.ReadFile(filepath.Join(dirs[0], "report.md"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"## cls on fake", "conc 1", "conc 2", "rate ", "![cls on fake", "Git commit", "Load average"} {
		if !strings.Contains(string(md), want) {
			t.Errorf("report lacks %q:\n%s", want, md)
		}
	}
	if _, err := os.Stat(filepath.Join(dirs[0], "cls-fake.png")); err != nil {
		t.Error(err)
	}
	var rep Report
	js, err := os.ReadFile(filepath.Join(dirs[0], "results.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(js, &rep); err != nil {
		t.Fatal(err)
	}
	if len(rep.Sweeps) != 1 || len(rep.Sweeps[0].Points) != 3 || rep.Sweeps[0].Points[0].Requests == 0 {
		t.Fatalf("results %+v", rep.Sweeps)
	}
	if !strings.Contains(stdout.String(), "cls on fake: peak") {
		t.Errorf("stdout %q lacks the headline", stdout.String())
	}
	if fake.calls.Load() == 0 {
		t.Error("the server saw no call")
	}
}

func TestSweepRefusesUnknownModel(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	visionv1.RegisterVisionServiceServer(srv, &fakeVision{})
	go srv.Serve(lis)
	defer srv.Stop()
	var stdout, stderr bytes.Buffer
	code := run(context.Background(), []string{"-addr", lis.Addr().String(), "-models", "nope", "-out", t.TempDir()}, &stdout, &stderr)
	if code != 1 || !strings.Contains(stderr.String(), `model "nope" not served`) {
		t.Fatalf("exit %d, stderr %q", code, stderr.String())
	}
}
