package metrics

import (
	"log/slog"
	"strconv"

	"github.com/prometheus/client_golang/prometheus"
)

// GPUDevice is one GPU as NVML reported it at one moment.
type GPUDevice struct {
	Index            int    // NVML device index
	UUID             string // stable across reboots, unlike Index
	Name             string // product name, such as "NVIDIA H100 80GB HBM3"
	MemoryUsedBytes  uint64
	MemoryTotalBytes uint64
	// Utilization is the fraction of the last sample period in which a
	// kernel ran, 0 to 1; negative when the driver does not report it.
	Utilization float64
}

// GPUModelMemory is the device memory one loaded model holds on one GPU.
type GPUModelMemory struct {
	Model       string
	DeviceIndex int
	Bytes       uint64
}

// GPUSnapshot is what a GPUSource reports at one moment.
type GPUSnapshot struct {
	Devices []GPUDevice
	Models  []GPUModelMemory
}

// GPUSource reports the GPUs' state; pkg/gpu implements it over NVML, and
// tests implement it with a fixed snapshot. A scrape calls it once.
type GPUSource interface {
	GPUSnapshot() (GPUSnapshot, error)
}

// gpuCollector turns GPUSnapshot into the GPU series at scrape time.
type gpuCollector struct {
	src                                   GPUSource
	log                                   *slog.Logger
	memUsed, memTotal, util, modelMemDesc *prometheus.Desc
}

// RegisterGPU registers the GPU series on reg, read from src at every
// scrape. With a nil src (no GPU, no driver, no NVML) nothing is
// registered, so the series are absent rather than zero, and one log line
// says why: reason, as the GPU discovery put it.
func RegisterGPU(reg prometheus.Registerer, src GPUSource, reason string, log *slog.Logger) error {
	if log == nil {
		log = slog.Default()
	}
	if src == nil {
		log.Info("GPU metrics disabled", "reason", reason)
		return nil
	}
	device := []string{"gpu", "uuid", "name"}
	c := &gpuCollector{
		src: src,
		log: log,
		memUsed: prometheus.NewDesc(GPUMemoryUsedBytes,
			"Device memory in use on the GPU, by every process.", device, nil),
		memTotal: prometheus.NewDesc(GPUMemoryTotalBytes,
			"Device memory of the GPU.", device, nil),
		util: prometheus.NewDesc(GPUUtilizationRatio,
			"Fraction of the last NVML sample period in which a kernel ran on the GPU.", device, nil),
		modelMemDesc: prometheus.NewDesc(GPUModelMemoryBytes,
			"Device memory attributable to each loaded model.", []string{"gpu", "model"}, nil),
	}
	return reg.Register(c)
}

// Describe implements prometheus.Collector.
func (c *gpuCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.memUsed
	ch <- c.memTotal
	ch <- c.util
	ch <- c.modelMemDesc
}

// Collect implements prometheus.Collector. When NVML fails at scrape time
// the GPU series are left out of that scrape rather than reported as 0.
func (c *gpuCollector) Collect(ch chan<- prometheus.Metric) {
	snap, err := c.src.GPUSnapshot()
	if err != nil {
		c.log.Warn("reading GPU state for metrics", "err", err)
		return
	}
	for _, d := range snap.Devices {
		lv := []string{strconv.Itoa(d.Index), d.UUID, d.Name}
		ch <- prometheus.MustNewConstMetric(c.memUsed, prometheus.GaugeValue, float64(d.MemoryUsedBytes), lv...)
		ch <- prometheus.MustNewConstMetric(c.memTotal, prometheus.GaugeValue, float64(d.MemoryTotalBytes), lv...)
		if d.Utilization >= 0 {
			ch <- prometheus.MustNewConstMetric(c.util, prometheus.GaugeValue, d.Utilization, lv...)
		}
	}
	// A model with several instances on one device is reported once per
	// instance; one series per (device, model) is what the registry accepts.
	type key struct {
		device int
		model  string
	}
	perModel := map[key]uint64{}
	var order []key
	for _, mm := range snap.Models {
		k := key{mm.DeviceIndex, mm.Model}
		if _, ok := perModel[k]; !ok {
			order = append(order, k)
		}
		perModel[k] += mm.Bytes
	}
	for _, k := range order {
		ch <- prometheus.MustNewConstMetric(c.modelMemDesc, prometheus.GaugeValue, float64(perModel[k]),
			strconv.Itoa(k.device), k.model)
	}
}
