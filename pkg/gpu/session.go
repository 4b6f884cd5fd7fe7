package gpu

/*
#include <stdlib.h>
#include "ortc.h"
*/
import "C"

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"sync"
	"syscall"
	"unsafe"

	"github.com/visionserve/visionserve/pkg/engine"
	"github.com/visionserve/visionserve/pkg/gpu/internal/sigstate"
)

// Provider is the ONNX Runtime execution provider a session runs on.
type Provider string

// Execution providers.
const (
	// ProviderCPU is ONNX Runtime's CPU provider: the no-GPU twin of the
	// GPU sessions, running the same IoBinding code path.
	ProviderCPU Provider = "cpu"
	// ProviderCUDA runs every node the CUDA provider supports on the GPU.
	ProviderCUDA Provider = "cuda"
	// ProviderTensorRT compiles what TensorRT takes into engines and runs
	// the rest on the CUDA provider appended behind it.
	ProviderTensorRT Provider = "tensorrt"
)

// Backend names the backend a provider gives, as Engine.Backend reports it.
func (p Provider) Backend() string {
	switch p {
	case ProviderCUDA:
		return engine.ORTCUDA
	case ProviderTensorRT:
		return engine.ORTTensorRT
	}
	return "ort-cpu-binding"
}

// CUDAOptions tune the CUDA execution provider. Zero values take ONNX
// Runtime's defaults.
type CUDAOptions struct {
	// ConvAlgoSearch is cuDNN's convolution algorithm search: EXHAUSTIVE
	// (ONNX Runtime's default, best kernels, slow first run), HEURISTIC or
	// DEFAULT.
	ConvAlgoSearch string
	// ArenaExtendStrategy is kNextPowerOfTwo (default) or kSameAsRequested,
	// which wastes less memory when batch sizes vary.
	ArenaExtendStrategy string
	// MemLimitBytes caps the provider's memory arena; 0 means no cap.
	MemLimitBytes uint64
}

// TensorRTOptions tune the TensorRT execution provider.
type TensorRTOptions struct {
	// FP16 lets TensorRT use half precision kernels.
	FP16 bool
	// CacheDir holds the engine and timing caches so a restart skips the
	// minutes-long engine build; "" disables both caches.
	CacheDir string
	// WorkspaceBytes bounds TensorRT's scratch memory; 0 keeps its default.
	WorkspaceBytes uint64
}

// SessionOptions configure one ONNX Runtime session on one device.
type SessionOptions struct {
	Provider Provider
	// Device is the CUDA device id (CUDA order, which can differ from NVML
	// order unless CUDA_DEVICE_ORDER=PCI_BUS_ID).
	Device   int
	CUDA     CUDAOptions
	TensorRT TensorRTOptions
	// IntraOpThreads and InterOpThreads size the CPU thread pools (CPU
	// provider and nodes a GPU provider leaves to the CPU); 0 means
	// runtime.NumCPU() and 1.
	IntraOpThreads, InterOpThreads int
	// DisableCPUFallback makes session creation fail when a node would
	// fall back to the CPU, so a probe proves the GPU ran it.
	DisableCPUFallback bool
}

func (o SessionOptions) cudaKeyValues() (keys, values []string, err error) {
	keys = append(keys, "device_id")
	values = append(values, strconv.Itoa(o.Device))
	switch o.CUDA.ConvAlgoSearch {
	case "":
	case "EXHAUSTIVE", "HEURISTIC", "DEFAULT":
		keys, values = append(keys, "cudnn_conv_algo_search"), append(values, o.CUDA.ConvAlgoSearch)
	default:
		return nil, nil, fmt.Errorf("cuda conv algorithm search %q unknown (want EXHAUSTIVE, HEURISTIC or DEFAULT)", o.CUDA.ConvAlgoSearch)
	}
	switch o.CUDA.ArenaExtendStrategy {
	case "":
	case "kNextPowerOfTwo", "kSameAsRequested":
		keys, values = append(keys, "arena_extend_strategy"), append(values, o.CUDA.ArenaExtendStrategy)
	default:
		return nil, nil, fmt.Errorf("cuda arena extend strategy %q unknown (want kNextPowerOfTwo or kSameAsRequested)", o.CUDA.ArenaExtendStrategy)
	}
	if o.CUDA.MemLimitBytes > 0 {
		keys, values = append(keys, "gpu_mem_limit"), append(values, strconv.FormatUint(o.CUDA.MemLimitBytes, 10))
	}
	return keys, values, nil
}

func (o SessionOptions) tensorRTKeyValues() (keys, values []string) {
	add := func(k, v string) { keys, values = append(keys, k), append(values, v) }
	add("device_id", strconv.Itoa(o.Device))
	if o.TensorRT.FP16 {
		add("trt_fp16_enable", "1")
	}
	if o.TensorRT.CacheDir != "" {
		add("trt_engine_cache_enable", "1")
		add("trt_engine_cache_path", o.TensorRT.CacheDir)
		add("trt_timing_cache_enable", "1")
		add("trt_timing_cache_path", o.TensorRT.CacheDir)
	}
	if o.TensorRT.WorkspaceBytes > 0 {
		add("trt_max_workspace_size", strconv.FormatUint(o.TensorRT.WorkspaceBytes, 10))
	}
	return keys, values
}

// IOInfo describes one model input or output; -1 marks a dynamic dimension.
type IOInfo struct {
	Name  string
	Shape []int64
	// Float says whether the element type is float32, the only type the
	// engine binds.
	Float bool
}

// Session is one loaded model on one device. Engines created from it share
// its weights; it is freed when it and every engine on it are closed.
type Session struct {
	path    string
	opts    SessionOptions
	inputs  []IOInfo
	outputs []IOInfo
	// restored lists the signals whose Go handlers session creation had
	// replaced and that were put back.
	restored []syscall.Signal

	mu     sync.Mutex // guards the fields below
	s      *C.OrtSession
	refs   int
	closed bool // Close was called
}

// OpenSession loads the ONNX model at path on the provider and device of
// opts. Init must have succeeded.
func OpenSession(path string, opts SessionOptions) (*Session, error) {
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	s, err := newSession(opts, func(so *C.OrtSessionOptions, out **C.OrtSession) error {
		return cerr(C.vs_session_new(cpath, so, out))
	})
	if err != nil {
		return nil, fmt.Errorf("opening %s on %s device %d: %w", path, opts.Provider, opts.Device, err)
	}
	s.path = path
	return s, nil
}

// openSessionBytes loads a serialized model (probes build one in memory).
func openSessionBytes(model []byte, opts SessionOptions) (*Session, error) {
	if len(model) == 0 {
		return nil, errors.New("empty model")
	}
	data := C.CBytes(model)
	defer C.free(data)
	s, err := newSession(opts, func(so *C.OrtSessionOptions, out **C.OrtSession) error {
		return cerr(C.vs_session_new_bytes(data, C.size_t(len(model)), so, out))
	})
	if err != nil {
		return nil, err
	}
	s.path = "(in-memory model)"
	return s, nil
}

func newSession(opts SessionOptions, create func(*C.OrtSessionOptions, **C.OrtSession) error) (*Session, error) {
	if _, ok := ortRuntime.Initialized(); !ok {
		return nil, errNoRuntime
	}
	intra := opts.IntraOpThreads
	if intra <= 0 {
		intra = runtime.NumCPU()
	}
	inter := max(opts.InterOpThreads, 1)
	var so *C.OrtSessionOptions
	// 99 is ORT_ENABLE_ALL.
	if err := cerr(C.vs_session_options_new(&so, C.int(intra), C.int(inter), 99)); err != nil {
		return nil, fmt.Errorf("creating session options: %w", err)
	}
	defer C.vs_session_options_release(so)
	if opts.DisableCPUFallback {
		if err := setConfig(so, "session.disable_cpu_ep_fallback", "1"); err != nil {
			return nil, err
		}
	}

	// The CUDA and TensorRT providers install signal handlers of their own
	// when they load; put Go's back once the session exists (or failed).
	saved := sigstate.Save()
	err := appendProviders(so, opts)
	var cs *C.OrtSession
	if err == nil {
		err = create(so, &cs)
	}
	restored, rerr := saved.Restore()
	if err != nil {
		return nil, err
	}
	s := &Session{opts: opts, s: cs, refs: 1, restored: restored}
	if rerr != nil {
		s.release()
		return nil, fmt.Errorf("restoring Go's signal handlers after creating the session: %w", rerr)
	}
	if s.inputs, err = sessionIO(cs, true); err == nil {
		s.outputs, err = sessionIO(cs, false)
	}
	if err != nil {
		s.release()
		return nil, fmt.Errorf("reading the model's inputs and outputs: %w", err)
	}
	return s, nil
}

func setConfig(so *C.OrtSessionOptions, key, value string) error {
	ck, cv := C.CString(key), C.CString(value)
	defer C.free(unsafe.Pointer(ck))
	defer C.free(unsafe.Pointer(cv))
	if err := cerr(C.vs_session_options_config(so, ck, cv)); err != nil {
		return fmt.Errorf("setting session option %s=%s: %w", key, value, err)
	}
	return nil
}

func appendProviders(so *C.OrtSessionOptions, opts SessionOptions) error {
	appendCUDA := func() error {
		keys, values, err := opts.cudaKeyValues()
		if err != nil {
			return err
		}
		ck, cv, free := cstrings(keys, values)
		defer free()
		if err := cerr(C.vs_append_cuda(so, ck, cv, C.size_t(len(keys)))); err != nil {
			return fmt.Errorf("adding the CUDA execution provider: %w", err)
		}
		return nil
	}
	switch opts.Provider {
	case ProviderCPU:
		return nil
	case ProviderCUDA:
		return appendCUDA()
	case ProviderTensorRT:
		if dir := opts.TensorRT.CacheDir; dir != "" {
			if err := os.MkdirAll(dir, 0o755); err != nil {
				return fmt.Errorf("creating TensorRT cache folder: %w", err)
			}
		}
		keys, values := opts.tensorRTKeyValues()
		ck, cv, free := cstrings(keys, values)
		defer free()
		if err := cerr(C.vs_append_tensorrt(so, ck, cv, C.size_t(len(keys)))); err != nil {
			return fmt.Errorf("adding the TensorRT execution provider: %w", err)
		}
		// Nodes TensorRT does not take run on CUDA rather than the CPU.
		return appendCUDA()
	}
	return fmt.Errorf("unknown execution provider %q (want cpu, cuda or tensorrt)", opts.Provider)
}

func sessionIO(s *C.OrtSession, input bool) ([]IOInfo, error) {
	in := C.int(0)
	if input {
		in = 1
	}
	var n C.size_t
	if err := cerr(C.vs_session_io_count(s, in, &n)); err != nil {
		return nil, err
	}
	infos := make([]IOInfo, int(n))
	for i := range infos {
		var name *C.char
		var et C.int
		var dims [8]C.int64_t
		var nd C.size_t
		if err := cerr(C.vs_session_io(s, in, C.size_t(i), &name, &et, &dims[0], &nd)); err != nil {
			return nil, err
		}
		infos[i].Name = C.GoString(name)
		C.free(unsafe.Pointer(name))
		infos[i].Float = et == 1 // ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT
		for d := range int(nd) {
			infos[i].Shape = append(infos[i].Shape, int64(dims[d]))
		}
	}
	return infos, nil
}

// Inputs describes the model's inputs.
func (s *Session) Inputs() []IOInfo { return s.inputs }

// Outputs describes the model's outputs.
func (s *Session) Outputs() []IOInfo { return s.outputs }

// Options returns the options the session was opened with.
func (s *Session) Options() SessionOptions { return s.opts }

// RestoredSignals lists the signals whose Go handlers opening the session
// had replaced and that were put back (empty on the CPU provider).
func (s *Session) RestoredSignals() []syscall.Signal { return s.restored }

// acquire takes a reference for an engine.
func (s *Session) acquire() (*C.OrtSession, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.s == nil {
		return nil, fmt.Errorf("session %s is closed", s.path)
	}
	s.refs++
	return s.s, nil
}

// release drops a reference and frees the session with the last one.
func (s *Session) release() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.refs--
	if s.refs == 0 && s.s != nil {
		C.vs_session_release(s.s)
		s.s = nil
	}
}

// Close drops the caller's reference; the session is freed once every
// engine on it is closed too. A second Close does nothing.
func (s *Session) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.mu.Unlock()
	s.release()
	return nil
}
