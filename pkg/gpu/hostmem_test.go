package gpu

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// fakeCUDARuntime is a stand-in libcudart: host "pinned" memory is malloc'ed,
// allocations over 1 GiB fail as out of memory, and FAKE_CUDA_DEVICES sets
// the device count.
const fakeCUDARuntime = `
#include <stdlib.h>
int cudaGetDeviceCount(int *n) { const char *e = getenv("FAKE_CUDA_DEVICES"); *n = e ? atoi(e) : 1; return 0; }
int cudaHostAlloc(void **p, size_t bytes, unsigned int flags) {
	if (flags != 1) return 1;
	if (bytes > (1UL << 30)) return 2;
	*p = malloc(bytes);
	return *p ? 0 : 2;
}
int cudaFreeHost(void *p) { if (!p) return 1; free(p); return 0; }
const char *cudaGetErrorString(int e) { return e == 2 ? "out of memory" : e == 1 ? "invalid argument" : "no error"; }
`

// The child learns what to expect, and where the fake library is.
const (
	fakeChildEnv = "VISIONSERVE_GPU_TEST_FAKE_CUDART"
	fakeLibEnv   = "VISIONSERVE_GPU_TEST_FAKE_CUDART_LIB"
)

// TestPinnedAllocatorWithFakeCUDARuntime runs the pinned-memory path for
// real against a fake libcudart, in a child process because the runtime is
// loaded once per process.
func TestPinnedAllocatorWithFakeCUDARuntime(t *testing.T) {
	cc, err := exec.LookPath("cc")
	if err != nil {
		t.Skip("no C compiler (cc) to build a fake libcudart")
	}
	dir := t.TempDir()
	src := filepath.Join(dir, "fakecudart.c")
	lib := filepath.Join(dir, "libcudart-fake.so")
	if err := os.WriteFile(src, []byte(fakeCUDARuntime), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(cc, "-shared", "-fPIC", "-o", lib, src).CombinedOutput(); err != nil {
		t.Fatalf("building the fake libcudart: %v\n%s", err, out)
	}
	for _, tt := range []struct{ devices, want string }{{"1", "pinned"}, {"0", "pageable"}} {
		t.Run("devices="+tt.devices, func(t *testing.T) {
			cmd := exec.Command(os.Args[0], "-test.run=^TestFakeCUDARuntimeChild$", "-test.v", "-test.count=1")
			cmd.Env = append(os.Environ(), fakeLibEnv+"="+lib, "FAKE_CUDA_DEVICES="+tt.devices, fakeChildEnv+"="+tt.want)
			out, err := cmd.CombinedOutput()
			if err != nil || !strings.Contains(string(out), "--- PASS: TestFakeCUDARuntimeChild") {
				t.Fatalf("child: %v\n%s", err, out)
			}
		})
	}
}

// TestFakeCUDARuntimeChild is the child of the test above.
func TestFakeCUDARuntimeChild(t *testing.T) {
	want := os.Getenv(fakeChildEnv)
	if want == "" {
		t.Skip("helper process of TestPinnedAllocatorWithFakeCUDARuntime")
	}
	a := NewHostAllocator(MemoryPinned, os.Getenv(fakeLibEnv))
	if want == "pageable" {
		if a.Kind() != MemoryPageable || !strings.Contains(a.Reason(), "no usable device") {
			t.Fatalf("with no device: kind %s, reason %q", a.Kind(), a.Reason())
		}
		return
	}
	if a.Kind() != MemoryPinned || a.Reason() != "" {
		t.Fatalf("kind %s, reason %q, want pinned", a.Kind(), a.Reason())
	}
	b, err := a.Alloc(1000)
	if err != nil {
		t.Fatal(err)
	}
	if f := b.Floats(); len(f) != 1000 || f[0] != 0 || f[999] != 0 || b.Kind() != MemoryPinned {
		t.Fatalf("pinned buffer: %d floats, kind %s", len(f), b.Kind())
	}
	if err := b.Free(); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Alloc(1<<28 + 1); err == nil || !strings.Contains(err.Error(), "cudaHostAlloc") || !strings.Contains(err.Error(), "out of memory") {
		t.Errorf("over-large pinned allocation: %v", err)
	}

	// The engine hands out and binds pinned buffers; on the CPU provider
	// they are bound as CPU memory.
	initRuntime(t)
	_, e := newCPUEngine(t, convModel(t))
	data, free, err := e.AllocBatch(2, 3, 8, 8)
	if err != nil {
		t.Fatal(err)
	}
	defer free()
	copy(data, randomInput(5, len(data)))
	if _, err := e.RunData(context.Background(), data, 2, 3, 8, 8); err != nil {
		t.Fatal(err)
	}
	if st := e.Stats(); st.Memory != MemoryPinned || st.BindPinned || st.CopiedBatches != 0 {
		t.Errorf("stats %+v, want pinned memory bound as CPU memory, no copies", st)
	}

	// Bound with the CUDA-pinned memory info, as on a GPU: the CPU provider
	// either takes it or the engine falls back to CPU memory info; either
	// way the results must be the plain session's.
	s, err := OpenSession(convModel(t), SessionOptions{Provider: ProviderCPU, IntraOpThreads: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	pe, err := NewEngine(s, EngineOptions{pinnedInfoOnCPU: true})
	if err != nil {
		t.Fatal(err)
	}
	defer pe.Close()
	if !pe.Stats().BindPinned {
		t.Fatal("engine does not bind as pinned memory")
	}
	pdata, pfree, err := pe.AllocBatch(2, 3, 8, 8)
	if err != nil {
		t.Fatal(err)
	}
	defer pfree()
	copy(pdata, data)
	got, err := pe.RunData(context.Background(), pdata, 2, 3, 8, 8)
	if err != nil {
		t.Fatal(err)
	}
	ref, err := e.RunData(context.Background(), data, 2, 3, 8, 8)
	if err != nil {
		t.Fatal(err)
	}
	for i := range ref {
		sameBits(t, ref[i].Name, got[i].Data, ref[i].Data)
	}
	st := pe.Stats()
	t.Logf("pinned memory info on the CPU provider: bound pinned %v, fallback reason %q", st.BindPinned, st.PinnedBindError)
	if st.BindPinned == (st.PinnedBindError != "") {
		t.Errorf("stats %+v: BindPinned and PinnedBindError disagree", st)
	}
}
