package server

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"

	"google.golang.org/grpc/codes"

	"github.com/visionserve/visionserve/proto/inference"
)

// Limits of Triton's system shared memory extension.
const (
	// MaxSharedMemoryRegions bounds the registered regions.
	MaxSharedMemoryRegions = 64
	// shmDir is where POSIX shared memory objects live (shm_open).
	shmDir = "/dev/shm"
)

// shmRegion is one registered region: a mapping of byte_size bytes at
// offset of the shared memory object key.
type shmRegion struct {
	name, key    string
	offset, size uint64
	// mu is held for reading while a request reads or writes data, and
	// for writing by unregister, which unmaps it.
	mu   sync.RWMutex
	mem  []byte // the whole mapping, from offset 0 of the object
	data []byte // mem[offset : offset+size]; nil once unmapped
}

// shmRegistry holds the system shared memory regions clients registered.
type shmRegistry struct {
	mu      sync.Mutex
	regions map[string]*shmRegion
}

func newSHMRegistry() *shmRegistry { return &shmRegistry{regions: map[string]*shmRegion{}} }

// register maps the region; the object must exist and be large enough.
func (r *shmRegistry) register(name, key string, offset, size uint64) error {
	if name == "" || len(name) > 128 {
		return invalid("shared memory region name must be 1 to 128 characters")
	}
	obj := strings.TrimPrefix(key, "/")
	if obj == "" || strings.ContainsAny(obj, "/\x00") || obj == "." || obj == ".." {
		return invalid("shared memory key %q is not a POSIX shared memory name (\"/name\")", clip(key))
	}
	if size == 0 || size > 1<<40 || offset > 1<<40 {
		return invalid("shared memory region %q: byte_size %d at offset %d out of range", clip(name), size, offset)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, dup := r.regions[name]; dup {
		return &statusError{codes.AlreadyExists, fmt.Sprintf("shared memory region %q is already registered", clip(name))}
	}
	if len(r.regions) >= MaxSharedMemoryRegions {
		return &statusError{codes.ResourceExhausted, fmt.Sprintf("%d shared memory regions registered, the most this server keeps; unregister some", len(r.regions))}
	}
	f, err := os.OpenFile(filepath.Join(shmDir, obj), os.O_RDWR, 0)
	if err != nil {
		return invalid("shared memory key %q: %v", clip(key), err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return invalid("shared memory key %q: %v", clip(key), err)
	}
	if uint64(st.Size()) < offset+size {
		return invalid("shared memory key %q holds %d bytes; the region needs %d at offset %d", clip(key), st.Size(), size, offset)
	}
	mem, err := syscall.Mmap(int(f.Fd()), 0, int(offset+size), syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_SHARED)
	if err != nil {
		return invalid("mapping shared memory key %q: %v", clip(key), err)
	}
	r.regions[name] = &shmRegion{name: name, key: key, offset: offset, size: size, mem: mem, data: mem[offset : offset+size]}
	return nil
}

// unregister unmaps the named region, or every region for "", once the
// requests using it are done.
func (r *shmRegistry) unregister(name string) error {
	r.mu.Lock()
	var gone []*shmRegion
	if name == "" {
		for n, reg := range r.regions {
			gone = append(gone, reg)
			delete(r.regions, n)
		}
	} else if reg, ok := r.regions[name]; ok {
		gone = append(gone, reg)
		delete(r.regions, name)
	}
	r.mu.Unlock()
	for _, reg := range gone {
		reg.mu.Lock()
		_ = syscall.Munmap(reg.mem)
		reg.mem, reg.data = nil, nil
		reg.mu.Unlock()
	}
	return nil
}

// use calls fn with bytes [offset, offset+size) of the named region,
// holding the region mapped meanwhile.
func (r *shmRegistry) use(name string, offset, size uint64, fn func([]byte) error) error {
	r.mu.Lock()
	reg, ok := r.regions[name]
	r.mu.Unlock()
	if !ok {
		return invalid("shared memory region %q is not registered", clip(name))
	}
	reg.mu.RLock()
	defer reg.mu.RUnlock()
	if reg.data == nil {
		return invalid("shared memory region %q was unregistered", clip(name))
	}
	if offset > reg.size || size > reg.size-offset {
		return invalid("shared memory region %q holds %d bytes; %d at offset %d do not fit", clip(name), reg.size, size, offset)
	}
	return fn(reg.data[offset : offset+size])
}

func (r *shmRegistry) status(name string) (*inference.SystemSharedMemoryStatusResponse, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	resp := &inference.SystemSharedMemoryStatusResponse{Regions: map[string]*inference.SystemSharedMemoryStatusResponse_RegionStatus{}}
	names := make([]string, 0, len(r.regions))
	for n := range r.regions {
		if name == "" || n == name {
			names = append(names, n)
		}
	}
	if name != "" && len(names) == 0 {
		return nil, notFound("shared memory region %q is not registered", clip(name))
	}
	sort.Strings(names)
	for _, n := range names {
		reg := r.regions[n]
		resp.Regions[n] = &inference.SystemSharedMemoryStatusResponse_RegionStatus{Name: n, Key: reg.key, Offset: reg.offset, ByteSize: reg.size}
	}
	return resp, nil
}

func (r *shmRegistry) close() { _ = r.unregister("") }

// shmRef is a tensor's shared memory reference from its parameters
// (shared_memory_region, shared_memory_byte_size, shared_memory_offset);
// ok is false when the tensor has none.
func shmRef(params map[string]*inference.InferParameter) (region string, offset, size uint64, ok bool, err error) {
	p, ok := params["shared_memory_region"]
	if !ok {
		return "", 0, 0, false, nil
	}
	region = p.GetStringParam()
	if region == "" {
		return "", 0, 0, true, invalid("shared_memory_region must name a region")
	}
	bs := params["shared_memory_byte_size"].GetInt64Param()
	if bs <= 0 {
		return "", 0, 0, true, invalid("shared_memory_byte_size must be positive with shared_memory_region")
	}
	off := params["shared_memory_offset"].GetInt64Param()
	if off < 0 {
		return "", 0, 0, true, invalid("shared_memory_offset must not be negative")
	}
	return region, uint64(off), uint64(bs), true, nil
}

// SystemSharedMemoryStatus implements the system shared memory extension.
func (s *oipService) SystemSharedMemoryStatus(_ context.Context, req *inference.SystemSharedMemoryStatusRequest) (*inference.SystemSharedMemoryStatusResponse, error) {
	resp, err := s.shm.status(req.GetName())
	return resp, toStatus(err)
}

// SystemSharedMemoryRegister implements the system shared memory extension.
func (s *oipService) SystemSharedMemoryRegister(_ context.Context, req *inference.SystemSharedMemoryRegisterRequest) (*inference.SystemSharedMemoryRegisterResponse, error) {
	if err := s.shm.register(req.GetName(), req.GetKey(), req.GetOffset(), req.GetByteSize()); err != nil {
		return nil, toStatus(err)
	}
	return &inference.SystemSharedMemoryRegisterResponse{}, nil
}

// SystemSharedMemoryUnregister implements the system shared memory
// extension; an empty name unregisters every region.
func (s *oipService) SystemSharedMemoryUnregister(_ context.Context, req *inference.SystemSharedMemoryUnregisterRequest) (*inference.SystemSharedMemoryUnregisterResponse, error) {
	return &inference.SystemSharedMemoryUnregisterResponse{}, toStatus(s.shm.unregister(req.GetName()))
}
