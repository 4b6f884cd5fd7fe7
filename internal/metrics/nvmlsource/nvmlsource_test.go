package nvmlsource_test

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/visionserve/visionserve/internal/metrics"
	"github.com/visionserve/visionserve/internal/metrics/nvmlsource"
	"github.com/visionserve/visionserve/pkg/gpu"
)

// fakeNVML is a gpu.NVML with fixed devices, or a fixed Init failure.
type fakeNVML struct {
	initErr error
	devices []gpu.Device
	badDev  int // index whose Device call fails; -1 for none
	inits   int
}

func (f *fakeNVML) Init() error {
	if f.initErr != nil {
		return f.initErr
	}
	f.inits++
	return nil
}
func (f *fakeNVML) Shutdown() error                              { f.inits--; return nil }
func (f *fakeNVML) DriverVersion() (string, error)               { return "580.65.06", nil }
func (f *fakeNVML) CUDADriverVersion() (int, error)              { return 13000, nil }
func (f *fakeNVML) DeviceCount() (int, error)                    { return len(f.devices), nil }
func (f *fakeNVML) ProcessMemory(int, int) (uint64, bool, error) { return 0, false, nil }
func (f *fakeNVML) Device(i int) (gpu.Device, error) {
	if i == f.badDev {
		return gpu.Device{}, errors.New("GPU is lost")
	}
	return f.devices[i], nil
}

func scrape(t *testing.T, reg *prometheus.Registry) string {
	t.Helper()
	ts := httptest.NewServer(promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	defer ts.Close()
	resp, err := ts.Client().Get(ts.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestNoDriverMeansNoSeries(t *testing.T) {
	for name, n := range map[string]*fakeNVML{
		"no driver": {initErr: fmt.Errorf("loading libnvidia-ml.so.1: %w", gpu.ErrNoNVML), badDev: -1},
		"no GPU":    {badDev: -1},
	} {
		t.Run(name, func(t *testing.T) {
			src, reason := nvmlsource.Open(n, nil)
			if src != nil || reason == "" {
				t.Fatalf("Open = %v, %q; want no source and a reason", src, reason)
			}
			if n.inits != 0 {
				t.Error("NVML left initialised")
			}
			reg := prometheus.NewRegistry()
			if err := metrics.RegisterGPU(reg, src.GPUSource(), reason, slog.New(slog.DiscardHandler)); err != nil {
				t.Fatal(err)
			}
			if body := scrape(t, reg); strings.Contains(body, "visionserve_gpu") {
				t.Errorf("GPU series without a GPU:\n%s", body)
			}
		})
	}
}

func TestSeriesFromNVMLAndLedger(t *testing.T) {
	n := &fakeNVML{badDev: 1, devices: []gpu.Device{
		{Name: "NVIDIA H100 80GB HBM3", UUID: "GPU-1", MemoryTotal: 80 << 30, MemoryUsed: 5 << 30, GPUUtilization: 37},
		{Name: "NVIDIA H100 80GB HBM3", UUID: "GPU-2"},
	}}
	ledger := gpu.NewMemoryLedger()
	ledger.Record(gpu.ModelMemory{Model: "yolov8s", Device: 0, EstimateBytes: 300 << 20})
	ledger.Record(gpu.ModelMemory{Model: "resnet50", Device: 0, Measured: true, SessionBytes: 200 << 20, PeakBytes: map[int]uint64{8: 700 << 20}})
	src, reason := nvmlsource.Open(n, ledger)
	if src == nil {
		t.Fatalf("no source: %s", reason)
	}
	reg := prometheus.NewRegistry()
	if err := metrics.RegisterGPU(reg, src, "", nil); err != nil {
		t.Fatal(err)
	}
	body := scrape(t, reg)
	for _, want := range []string{
		`visionserve_gpu_memory_used_bytes{gpu="0",name="NVIDIA H100 80GB HBM3",uuid="GPU-1"} 5.36870912e+09`,
		`visionserve_gpu_memory_total_bytes{gpu="0",name="NVIDIA H100 80GB HBM3",uuid="GPU-1"} 8.589934592e+10`,
		`visionserve_gpu_utilization_ratio{gpu="0",name="NVIDIA H100 80GB HBM3",uuid="GPU-1"} 0.37`,
		`visionserve_gpu_model_memory_bytes{gpu="0",model="yolov8s"} 3.145728e+08`,
		`visionserve_gpu_model_memory_bytes{gpu="0",model="resnet50"} 7.340032e+08`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("missing %s", want)
		}
	}
	if strings.Contains(body, `uuid="GPU-2"`) {
		t.Error("a device NVML could not read appears in the series")
	}
	if err := src.Close(); err != nil {
		t.Fatal(err)
	}
	if n.inits != 0 {
		t.Error("Close left NVML initialised")
	}
	if body := scrape(t, reg); strings.Contains(body, "visionserve_gpu_memory") {
		t.Error("device series after Close")
	}
}
