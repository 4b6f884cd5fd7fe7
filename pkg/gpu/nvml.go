package gpu

import (
	"errors"
	"fmt"
	"os"
	"sync"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
)

// NVML is the part of the NVIDIA Management Library that discovery and
// memory accounting use. RealNVML loads the library at run time; tests
// substitute a fake.
type NVML interface {
	// Init loads and initialises the library. An error wrapping
	// ErrNoNVML means the library is absent (no NVIDIA driver).
	Init() error
	Shutdown() error
	DriverVersion() (string, error)
	// CUDADriverVersion is the newest CUDA version the driver supports,
	// encoded as 1000*major + 10*minor (13000 is 13.0).
	CUDADriverVersion() (int, error)
	DeviceCount() (int, error)
	// Device describes device i (NVML order); Index and the
	// memory/utilisation fields are filled, Err is left to the caller.
	Device(i int) (Device, error)
	// ProcessMemory is the GPU memory process pid uses on device i, and
	// false when the driver does not report per-process use.
	ProcessMemory(i, pid int) (uint64, bool, error)
}

// ErrNoNVML is wrapped by NVML.Init when libnvidia-ml is not installed.
var ErrNoNVML = errors.New("NVML library not found (no NVIDIA driver)")

// Device is one GPU as NVML reports it.
type Device struct {
	Index int
	Name  string
	UUID  string
	// PCIBusID identifies the device across NVML and CUDA numbering.
	PCIBusID string
	// Memory in bytes.
	MemoryTotal, MemoryUsed, MemoryFree uint64
	// GPUUtilization and MemoryUtilization are percentages over the
	// driver's last sample period.
	GPUUtilization, MemoryUtilization uint32
	// ProcessMemoryUsed is what this process uses on the device, when the
	// driver reports it.
	ProcessMemoryUsed uint64
	// Err says what could not be read about this device, "" if nothing.
	Err string
}

// Report is what Discover found. No driver or no GPU is a normal report
// (Available false, Reason saying why), not an error.
type Report struct {
	Available bool
	Reason    string
	// DriverVersion is the NVIDIA driver, e.g. "580.65.06".
	DriverVersion string
	// CUDADriverVersion is the newest CUDA the driver supports, e.g. "13.0".
	CUDADriverVersion string
	Devices           []Device
}

// Discover lists the GPUs through n; nil means RealNVML. It never fails:
// whatever stops it is the report's Reason.
func Discover(n NVML) Report {
	if n == nil {
		n = RealNVML()
	}
	if err := n.Init(); err != nil {
		return Report{Reason: err.Error()}
	}
	defer n.Shutdown()
	var r Report
	var errs []error
	if v, err := n.DriverVersion(); err == nil {
		r.DriverVersion = v
	} else {
		errs = append(errs, fmt.Errorf("driver version: %w", err))
	}
	if v, err := n.CUDADriverVersion(); err == nil {
		r.CUDADriverVersion = fmt.Sprintf("%d.%d", v/1000, v%1000/10)
	} else {
		errs = append(errs, fmt.Errorf("CUDA driver version: %w", err))
	}
	count, err := n.DeviceCount()
	if err != nil {
		r.Reason = fmt.Sprintf("counting NVIDIA GPUs: %v", err)
		return r
	}
	if count == 0 {
		r.Reason = fmt.Sprintf("no NVIDIA GPU found (driver %s)", r.DriverVersion)
		return r
	}
	pid := os.Getpid()
	for i := range count {
		d, err := n.Device(i)
		d.Index = i
		if err != nil {
			d.Err = err.Error()
		} else if used, ok, err := n.ProcessMemory(i, pid); err == nil && ok {
			d.ProcessMemoryUsed = used
		}
		r.Devices = append(r.Devices, d)
	}
	r.Available = true
	if len(errs) > 0 {
		r.Reason = errors.Join(errs...).Error()
	}
	return r
}

// realNVML is NVML through github.com/NVIDIA/go-nvml, which dlopens
// libnvidia-ml.so.1 in Init: binaries have no link-time dependency on it.
type realNVML struct {
	lib nvml.Interface
}

var (
	realOnce sync.Once
	realLib  nvml.Interface
)

// RealNVML returns the system's NVML. The library is loaded on Init.
func RealNVML() NVML {
	realOnce.Do(func() { realLib = nvml.New() })
	return realNVML{lib: realLib}
}

func nvmlErr(what string, r nvml.Return) error {
	if r == nvml.SUCCESS {
		return nil
	}
	return fmt.Errorf("%s: %s", what, nvml.ErrorString(r))
}

func (n realNVML) Init() error {
	switch r := n.lib.Init(); r {
	case nvml.SUCCESS:
		return nil
	case nvml.ERROR_LIBRARY_NOT_FOUND:
		return ErrNoNVML
	case nvml.ERROR_DRIVER_NOT_LOADED:
		return errors.New("NVIDIA driver not loaded (NVML found, kernel module absent)")
	case nvml.ERROR_NO_PERMISSION:
		return errors.New("no permission to use the NVIDIA driver")
	default:
		return nvmlErr("initialising NVML", r)
	}
}

func (n realNVML) Shutdown() error { return nvmlErr("shutting NVML down", n.lib.Shutdown()) }

func (n realNVML) DriverVersion() (string, error) {
	v, r := n.lib.SystemGetDriverVersion()
	return v, nvmlErr("reading the driver version", r)
}

func (n realNVML) CUDADriverVersion() (int, error) {
	v, r := n.lib.SystemGetCudaDriverVersion()
	return v, nvmlErr("reading the CUDA driver version", r)
}

func (n realNVML) DeviceCount() (int, error) {
	c, r := n.lib.DeviceGetCount()
	return c, nvmlErr("counting devices", r)
}

func (n realNVML) Device(i int) (Device, error) {
	d := Device{Index: i}
	h, r := n.lib.DeviceGetHandleByIndex(i)
	if r != nvml.SUCCESS {
		return d, nvmlErr(fmt.Sprintf("device %d", i), r)
	}
	var errs []error
	if d.Name, r = h.GetName(); r != nvml.SUCCESS {
		errs = append(errs, nvmlErr("name", r))
	}
	if d.UUID, r = h.GetUUID(); r != nvml.SUCCESS {
		errs = append(errs, nvmlErr("uuid", r))
	}
	if pci, r := h.GetPciInfo(); r == nvml.SUCCESS {
		d.PCIBusID = cString(pci.BusId[:])
	}
	if m, r := h.GetMemoryInfo(); r == nvml.SUCCESS {
		d.MemoryTotal, d.MemoryUsed, d.MemoryFree = m.Total, m.Used, m.Free
	} else {
		errs = append(errs, nvmlErr("memory", r))
	}
	if u, r := h.GetUtilizationRates(); r == nvml.SUCCESS {
		d.GPUUtilization, d.MemoryUtilization = u.Gpu, u.Memory
	} else if r != nvml.ERROR_NOT_SUPPORTED {
		errs = append(errs, nvmlErr("utilisation", r))
	}
	return d, errors.Join(errs...)
}

func (n realNVML) ProcessMemory(i, pid int) (uint64, bool, error) {
	h, r := n.lib.DeviceGetHandleByIndex(i)
	if r != nvml.SUCCESS {
		return 0, false, nvmlErr(fmt.Sprintf("device %d", i), r)
	}
	procs, r := h.GetComputeRunningProcesses()
	if r == nvml.ERROR_NOT_SUPPORTED {
		return 0, false, nil
	}
	if r != nvml.SUCCESS {
		return 0, false, nvmlErr("listing processes", r)
	}
	for _, p := range procs {
		if int(p.Pid) == pid {
			return p.UsedGpuMemory, true, nil
		}
	}
	// Not listed: the process holds no context on this device yet.
	return 0, true, nil
}

func cString(b []int8) string {
	out := make([]byte, 0, len(b))
	for _, c := range b {
		if c == 0 {
			break
		}
		out = append(out, byte(c))
	}
	return string(out)
}
