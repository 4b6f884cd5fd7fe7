package metrics_test

import (
	"bytes"
	"errors"
	"log/slog"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/visionserve/visionserve/internal/metrics"
)

// fakeNVML is a GPUSource with a fixed snapshot, or a fixed error.
type fakeNVML struct {
	snap metrics.GPUSnapshot
	err  error
}

func (f *fakeNVML) GPUSnapshot() (metrics.GPUSnapshot, error) { return f.snap, f.err }

var gpuNames = []string{
	metrics.GPUMemoryUsedBytes, metrics.GPUMemoryTotalBytes,
	metrics.GPUUtilizationRatio, metrics.GPUModelMemoryBytes,
}

func TestGPUSeriesAbsentWithoutGPU(t *testing.T) {
	reg := metrics.NewRegistry()
	if _, err := metrics.New(reg); err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	if err := metrics.RegisterGPU(reg, nil, "NVML: libnvidia-ml.so.1 not found", log); err != nil {
		t.Fatal(err)
	}
	f := scrape(t, reg)
	for _, name := range gpuNames {
		if f[name] != nil {
			t.Errorf("%s present on a machine without a GPU", name)
		}
	}
	if got := strings.Count(logs.String(), "\n"); got != 1 || !strings.Contains(logs.String(), "libnvidia-ml.so.1 not found") {
		t.Errorf("startup log = %q, want one line with the reason", logs.String())
	}
}

func TestGPUSeriesFromSnapshot(t *testing.T) {
	reg := prometheus.NewRegistry()
	src := &fakeNVML{snap: metrics.GPUSnapshot{
		Devices: []metrics.GPUDevice{
			{Index: 0, UUID: "GPU-aaaa", Name: "NVIDIA H100 80GB HBM3", MemoryUsedBytes: 6 << 30, MemoryTotalBytes: 80 << 30, Utilization: 0.42},
			{Index: 1, UUID: "GPU-bbbb", Name: "NVIDIA H100 80GB HBM3", MemoryUsedBytes: 1 << 30, MemoryTotalBytes: 80 << 30, Utilization: -1},
		},
		Models: []metrics.GPUModelMemory{
			{Model: "yolov8s", DeviceIndex: 0, Bytes: 300 << 20},
			{Model: "yolov8s", DeviceIndex: 0, Bytes: 100 << 20}, // a second instance
			{Model: "resnet50", DeviceIndex: 1, Bytes: 200 << 20},
		},
	}}
	if err := metrics.RegisterGPU(reg, src, "", slog.New(slog.DiscardHandler)); err != nil {
		t.Fatal(err)
	}
	f := scrape(t, reg)
	gpu0 := map[string]string{"gpu": "0", "uuid": "GPU-aaaa", "name": "NVIDIA H100 80GB HBM3"}
	for _, c := range []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{metrics.GPUMemoryUsedBytes, gpu0, 6 << 30},
		{metrics.GPUMemoryTotalBytes, gpu0, 80 << 30},
		{metrics.GPUUtilizationRatio, gpu0, 0.42},
		{metrics.GPUMemoryUsedBytes, map[string]string{"gpu": "1"}, 1 << 30},
		{metrics.GPUModelMemoryBytes, map[string]string{"gpu": "0", "model": "yolov8s"}, 400 << 20},
		{metrics.GPUModelMemoryBytes, map[string]string{"gpu": "1", "model": "resnet50"}, 200 << 20},
	} {
		if got := value(t, f, c.name, c.labels); got != c.want {
			t.Errorf("%s%v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}
	if find(f, metrics.GPUUtilizationRatio, map[string]string{"gpu": "1"}) != nil {
		t.Error("utilisation the driver did not report appears as a sample")
	}

	// When NVML fails at scrape time the series go missing; the rest of
	// the scrape still succeeds.
	src.err = errors.New("NVML: GPU is lost")
	f = scrape(t, reg)
	for _, name := range gpuNames {
		if f[name] != nil {
			t.Errorf("%s present while NVML fails", name)
		}
	}
}
