package gpu

import (
	"errors"
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
