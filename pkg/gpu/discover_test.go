package gpu

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
)

// fakeNVML is an NVML with scripted answers.
type fakeNVML struct {
	initErr  error
	driver   string
	cuda     int
	count    int
	countErr error
	devices  map[int]Device
	devErr   map[int]error
	procMem  map[int]uint64
	inits    int
	shutdown int
}

func (f *fakeNVML) Init() error {
	f.inits++
	return f.initErr
}
func (f *fakeNVML) Shutdown() error                 { f.shutdown++; return nil }
func (f *fakeNVML) DriverVersion() (string, error)  { return f.driver, nil }
func (f *fakeNVML) CUDADriverVersion() (int, error) { return f.cuda, nil }
func (f *fakeNVML) DeviceCount() (int, error)       { return f.count, f.countErr }
func (f *fakeNVML) Device(i int) (Device, error)    { return f.devices[i], f.devErr[i] }
func (f *fakeNVML) ProcessMemory(i, pid int) (uint64, bool, error) {
	m, ok := f.procMem[i]
	return m, ok, nil
}

func twoH100s() *fakeNVML {
	return &fakeNVML{
		driver: "580.65.06", cuda: 13000, count: 2,
		devices: map[int]Device{
			0: {Name: "NVIDIA H100 80GB HBM3", MemoryTotal: 80 << 30, MemoryUsed: 1 << 30, MemoryFree: 79 << 30, GPUUtilization: 12},
			1: {Name: "NVIDIA H100 80GB HBM3", MemoryTotal: 80 << 30},
		},
		procMem: map[int]uint64{0: 512 << 20},
	}
}

func TestDiscover(t *testing.T) {
	tests := []struct {
		name      string
		nvml      *fakeNVML
		available bool
		reason    string // substring
		devices   int
	}{
		{"no driver", &fakeNVML{initErr: ErrNoNVML}, false, "NVML library not found (no NVIDIA driver)", 0},
		{"driver without GPUs", &fakeNVML{driver: "580.65.06", cuda: 13000}, false, "no NVIDIA GPU found (driver 580.65.06)", 0},
		{"count fails", &fakeNVML{countErr: errors.New("GPU is lost")}, false, "GPU is lost", 0},
		{"two GPUs", twoH100s(), true, "", 2},
		{"one GPU unreadable", func() *fakeNVML {
			f := twoH100s()
			f.devErr = map[int]error{1: errors.New("memory: ERROR_GPU_IS_LOST")}
			return f
		}(), true, "", 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := Discover(tt.nvml)
			if r.Available != tt.available || len(r.Devices) != tt.devices {
				t.Fatalf("Discover = %+v, want available %v with %d devices", r, tt.available, tt.devices)
			}
			if tt.reason != "" && !strings.Contains(r.Reason, tt.reason) {
				t.Errorf("reason %q, want it to contain %q", r.Reason, tt.reason)
			}
			if tt.nvml.initErr == nil && tt.nvml.shutdown != tt.nvml.inits {
				t.Errorf("NVML initialised %d times, shut down %d", tt.nvml.inits, tt.nvml.shutdown)
			}
		})
	}
	r := Discover(twoH100s())
	if r.CUDADriverVersion != "13.0" || r.DriverVersion != "580.65.06" {
		t.Errorf("versions %q %q, want 580.65.06 and 13.0", r.DriverVersion, r.CUDADriverVersion)
	}
	if d := r.Devices[0]; d.Index != 0 || d.ProcessMemoryUsed != 512<<20 || d.MemoryFree != 79<<30 {
		t.Errorf("device 0 = %+v", d)
	}
}

// TestDiscoverRealNVML runs discovery with the real loader: on a machine
// without the NVIDIA driver it must say so plainly rather than fail.
func TestDiscoverRealNVML(t *testing.T) {
	r := Discover(nil)
	if !r.Available {
		if r.Reason == "" {
			t.Fatal("no GPU and no reason")
		}
		if len(r.Devices) != 0 {
			t.Errorf("unavailable report lists devices %+v", r.Devices)
		}
		t.Logf("no GPU: %s", r.Reason)
		return
	}
	for _, d := range r.Devices {
		if d.Name == "" || d.MemoryTotal == 0 {
			t.Errorf("GPU %d: name %q, %d bytes", d.Index, d.Name, d.MemoryTotal)
		}
	}
	if r.DriverVersion == "" {
		t.Error("GPU present but no driver version")
	}
}

// fakeProber scripts discovery and probe outcomes.
type fakeProber struct {
	report Report
	fail   map[Provider]error // probe failures per provider
	probed []string
}

func (f *fakeProber) Discover() Report { return f.report }
func (f *fakeProber) Probe(ctx context.Context, p Provider, device int) error {
	f.probed = append(f.probed, fmt.Sprintf("%s/%d", p, device))
	return f.fail[p]
}

func TestChooseBackend(t *testing.T) {
	noGPU := Report{Reason: ErrNoNVML.Error()}
	gpus := Discover(twoH100s())
	noTRT := map[Provider]error{ProviderTensorRT: errors.New("libnvinfer.so.10: cannot open shared object file")}
	allFail := map[Provider]error{ProviderTensorRT: errors.New("no TensorRT"), ProviderCUDA: errors.New("CUDA driver version is insufficient")}
	tests := []struct {
		name      string
		requested string
		report    Report
		fail      map[Provider]error
		backend   string
		devices   []int
		err       string // substring; "" means no error
		reason    string // substring of Choice.Reason
	}{
		{"auto without GPU takes OpenCV", "auto", noGPU, nil, BackendOpenCV, nil, "", "no usable GPU: NVML library not found"},
		{"empty means auto", "", noGPU, nil, BackendOpenCV, nil, "", "NVML library not found"},
		{"auto with TensorRT", "auto", gpus, nil, BackendTensorRT, []int{0, 1}, "", "tensorrt runs on GPU [0 1]"},
		{"auto falls back to CUDA", "auto", gpus, noTRT, BackendCUDA, []int{0, 1}, "", "libnvinfer"},
		{"auto when every probe fails", "auto", gpus, allFail, BackendOpenCV, nil, "", "CUDA driver version is insufficient"},
		{"forced cuda without GPU", "ort-cuda", noGPU, nil, "", nil, "ort-cuda: no usable GPU: NVML library not found (no NVIDIA driver)", ""},
		{"forced cuda when its probe fails", "ort-cuda", gpus, allFail, "", nil, "ort-cuda: no usable GPU: cuda on GPU 0: CUDA driver version is insufficient", ""},
		{"forced cuda skips TensorRT", "ort-cuda", gpus, nil, BackendCUDA, []int{0, 1}, "", ""},
		{"forced tensorrt without it", "ort-tensorrt", gpus, noTRT, "", nil, "ort-tensorrt: no usable GPU", ""},
		{"forced opencv", "opencv", gpus, nil, BackendOpenCV, nil, "", "forced"},
		{"forced ort-cpu", "ort-cpu", gpus, nil, BackendORTCPU, nil, "", "forced"},
		{"unknown", "rocm", gpus, nil, "", nil, `unknown backend "rocm"`, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := &fakeProber{report: tt.report, fail: tt.fail}
			c, err := ChooseBackend(context.Background(), tt.requested, p)
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("ChooseBackend: %v, want an error containing %q", err, tt.err)
				}
				if strings.HasPrefix(tt.requested, "ort-") && !errors.Is(err, ErrNoUsableGPU) {
					t.Errorf("error %v does not wrap ErrNoUsableGPU", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if c.Backend != tt.backend || !slices.Equal(c.Devices, tt.devices) {
				t.Errorf("chose %s on %v, want %s on %v", c.Backend, c.Devices, tt.backend, tt.devices)
			}
			if !strings.Contains(c.Reason, tt.reason) {
				t.Errorf("reason %q, want it to contain %q", c.Reason, tt.reason)
			}
			if (tt.requested == "opencv" || tt.requested == "ort-cpu") && len(p.probed) > 0 {
				t.Errorf("a forced CPU backend probed %v", p.probed)
			}
		})
	}
}

// TestForcedCUDAOnThisMachine asks the real machine; without a GPU the
// answer must be the clear error, with one the choice must hold.
func TestForcedCUDAOnThisMachine(t *testing.T) {
	initRuntime(t)
	c, err := ChooseBackend(context.Background(), BackendCUDA, SystemProber{})
	if Discover(nil).Available {
		if err != nil {
			t.Fatalf("GPU present but ort-cuda refused: %v", err)
		}
		if c.Backend != BackendCUDA || len(c.Devices) == 0 {
			t.Errorf("choice %+v", c)
		}
		return
	}
	if err == nil || !strings.HasPrefix(err.Error(), "ort-cuda: no usable GPU: ") {
		t.Fatalf("forcing ort-cuda without a GPU: %v, want \"ort-cuda: no usable GPU: <reason>\"", err)
	}
	auto, err := ChooseBackend(context.Background(), BackendAuto, SystemProber{})
	if err != nil || auto.Backend != BackendOpenCV {
		t.Errorf("auto without a GPU chose %+v, %v; want opencv", auto, err)
	}
}

func TestNVMLMemoryReader(t *testing.T) {
	f := twoH100s()
	r, closeFn, err := NewNVMLMemoryReader(f)
	if err != nil {
		t.Fatal(err)
	}
	if used, err := r.UsedBytes(0); err != nil || used != 1<<30 {
		t.Errorf("UsedBytes(0) = %d, %v; want the device's 1 GiB", used, err)
	}
	f.devErr = map[int]error{5: errors.New("ERROR_INVALID_ARGUMENT")}
	if _, err := r.UsedBytes(5); err == nil {
		t.Error("UsedBytes of a missing device succeeded")
	}
	if err := closeFn(); err != nil || f.shutdown != 1 {
		t.Errorf("close: %v, %d shutdowns", err, f.shutdown)
	}
	if _, _, err := NewNVMLMemoryReader(&fakeNVML{initErr: ErrNoNVML}); !errors.Is(err, ErrNoNVML) {
		t.Errorf("reader without NVML: %v", err)
	}
}
