package gpu

/*
#cgo CFLAGS: -I${SRCDIR}/../../third_party/onnxruntime/include -O2
#cgo LDFLAGS: -ldl
#include <stdlib.h>
#include "ortc.h"
*/
import "C"

import (
	"errors"
	"fmt"
	"unsafe"

	"github.com/visionserve/visionserve/pkg/ortlib"
)

// runtime loads the ONNX Runtime C API from the process's one library
// (see package ortlib).
var ortRuntime = ortlib.NewLoader(func(path string) error {
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	if err := cerr(C.vs_ort_load(cpath)); err != nil {
		return fmt.Errorf("loading ONNX Runtime C API from %s: %w", path, err)
	}
	return nil
})

// Init loads the ONNX Runtime C API from the shared library at libPath and
// joins the process-wide environment. It is idempotent: after a success
// later calls return nil and ignore libPath.
//
// Package gpu talks to the C API directly rather than through
// onnxruntime_go because it needs what that package keeps unexported: the
// session handle for IoBinding with pinned-memory OrtMemoryInfo. When the
// CPU engine (onnxruntime_go) loads the same path, dlopen returns the same
// library and ONNX Runtime hands both the same environment.
func Init(libPath string) error { return ortRuntime.Init(libPath) }

// RuntimeVersion returns the loaded ONNX Runtime version, "" before Init.
func RuntimeVersion() string { return C.GoString(C.vs_ort_version()) }

// cerr converts a message from the C shim into an error and frees it.
func cerr(msg *C.char) error {
	if msg == nil {
		return nil
	}
	defer C.free(unsafe.Pointer(msg))
	return errors.New(C.GoString(msg))
}

// cstrings converts key/value pairs into C arrays; free releases them.
func cstrings(keys, values []string) (ck, cv **C.char, free func()) {
	if len(keys) == 0 {
		return nil, nil, func() {}
	}
	size := C.size_t(len(keys)) * C.size_t(unsafe.Sizeof((*C.char)(nil)))
	k := (**C.char)(C.malloc(size))
	v := (**C.char)(C.malloc(size))
	ks := unsafe.Slice(k, len(keys))
	vs := unsafe.Slice(v, len(keys))
	for i := range keys {
		ks[i] = C.CString(keys[i])
		vs[i] = C.CString(values[i])
	}
	return k, v, func() {
		for i := range keys {
			C.free(unsafe.Pointer(ks[i]))
			C.free(unsafe.Pointer(vs[i]))
		}
		C.free(unsafe.Pointer(k))
		C.free(unsafe.Pointer(v))
	}
}
