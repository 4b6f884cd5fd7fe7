// See ortc.h. The OrtApi table comes from the library onnxruntime_go has
// already loaded: dlopen of the same path returns the same handle, so both
// share one runtime and one environment.
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ortc.h"

static const OrtApi *api = NULL;
static const char *version = NULL;
static OrtEnv *env = NULL;

static char *dup_msg(const char *prefix, const char *msg) {
  size_t n = strlen(prefix) + strlen(msg) + 3;
  char *s = malloc(n);
  if (s) snprintf(s, n, "%s%s", prefix, msg);
  return s;
}

// status_err turns an OrtStatus into a malloc'ed message and releases it.
static char *status_err(OrtStatus *st) {
  if (!st) return NULL;
  const char *codes[] = {"OK", "FAIL", "INVALID_ARGUMENT", "NO_SUCHFILE", "NO_MODEL",
                         "ENGINE_ERROR", "RUNTIME_EXCEPTION", "INVALID_PROTOBUF",
                         "MODEL_LOADED", "NOT_IMPLEMENTED", "INVALID_GRAPH", "EP_FAIL",
                         "MODEL_LOAD_CANCELED", "MODEL_REQUIRES_COMPILATION", "NOT_FOUND"};
  OrtErrorCode code = api->GetErrorCode(st);
  const char *name = (code >= 0 && (size_t)code < sizeof(codes) / sizeof(codes[0])) ? codes[code] : "UNKNOWN";
  const char *msg = api->GetErrorMessage(st);
  size_t n = strlen(name) + strlen(msg ? msg : "") + 8;
  char *s = malloc(n);
  if (s) snprintf(s, n, "[%s] %s", name, msg ? msg : "");
  api->ReleaseStatus(st);
  return s;
}

#define CHECK_API() \
  if (!api) return dup_msg("", "ONNX Runtime C API not loaded")

char *vs_ort_load(const char *lib_path) {
  if (api) return NULL;
  void *h = dlopen(lib_path, RTLD_NOW | RTLD_LOCAL);
  if (!h) return dup_msg("dlopen: ", dlerror());
  typedef const OrtApiBase *(*get_base_fn)(void);
  get_base_fn get_base = (get_base_fn)dlsym(h, "OrtGetApiBase");
  if (!get_base) return dup_msg("dlsym OrtGetApiBase: ", dlerror());
  const OrtApiBase *base = get_base();
  const OrtApi *a = base ? base->GetApi(ORT_API_VERSION) : NULL;
  if (!a) return dup_msg("", "library does not provide ORT_API_VERSION " "29" " (too old?)");
  api = a;
  version = base->GetVersionString();
  // ONNX Runtime keeps one environment per process: CreateEnv returns the
  // one onnxruntime_go created, with a reference of our own we never drop.
  OrtStatus *st = api->CreateEnv(ORT_LOGGING_LEVEL_ERROR, "visionserve-gpu", &env);
  if (st) {
    char *e = status_err(st);
    api = NULL;
    return e;
  }
  return NULL;
}

const char *vs_ort_version(void) { return version ? version : ""; }

char *vs_session_options_new(OrtSessionOptions **out, int intra, int inter, int opt_level) {
  CHECK_API();
  OrtSessionOptions *o = NULL;
  OrtStatus *st = api->CreateSessionOptions(&o);
  if (st) return status_err(st);
  if (intra > 0 && (st = api->SetIntraOpNumThreads(o, intra))) goto fail;
  if (inter > 0 && (st = api->SetInterOpNumThreads(o, inter))) goto fail;
  if ((st = api->SetSessionGraphOptimizationLevel(o, (GraphOptimizationLevel)opt_level))) goto fail;
  *out = o;
  return NULL;
fail:
  api->ReleaseSessionOptions(o);
  return status_err(st);
}

char *vs_session_options_config(OrtSessionOptions *o, const char *key, const char *value) {
  CHECK_API();
  return status_err(api->AddSessionConfigEntry(o, key, value));
}

void vs_session_options_release(OrtSessionOptions *o) {
  if (api && o) api->ReleaseSessionOptions(o);
}

char *vs_append_cuda(OrtSessionOptions *o, const char **keys, const char **values, size_t n) {
  CHECK_API();
  OrtCUDAProviderOptionsV2 *p = NULL;
  OrtStatus *st = api->CreateCUDAProviderOptions(&p);
  if (st) return status_err(st);
  if (n > 0 && (st = api->UpdateCUDAProviderOptions(p, keys, values, n))) goto done;
  st = api->SessionOptionsAppendExecutionProvider_CUDA_V2(o, p);
done:
  api->ReleaseCUDAProviderOptions(p);
  return status_err(st);
}

char *vs_append_tensorrt(OrtSessionOptions *o, const char **keys, const char **values, size_t n) {
  CHECK_API();
  OrtTensorRTProviderOptionsV2 *p = NULL;
  OrtStatus *st = api->CreateTensorRTProviderOptions(&p);
  if (st) return status_err(st);
  if (n > 0 && (st = api->UpdateTensorRTProviderOptions(p, keys, values, n))) goto done;
  st = api->SessionOptionsAppendExecutionProvider_TensorRT_V2(o, p);
done:
  api->ReleaseTensorRTProviderOptions(p);
  return status_err(st);
}

char *vs_session_new(const char *path, OrtSessionOptions *o, OrtSession **out) {
  CHECK_API();
  return status_err(api->CreateSession(env, path, o, out));
}

char *vs_session_new_bytes(const void *data, size_t len, OrtSessionOptions *o, OrtSession **out) {
  CHECK_API();
  return status_err(api->CreateSessionFromArray(env, data, len, o, out));
}

void vs_session_release(OrtSession *s) {
  if (api && s) api->ReleaseSession(s);
}

char *vs_session_io_count(OrtSession *s, int is_input, size_t *count) {
  CHECK_API();
  return status_err(is_input ? api->SessionGetInputCount(s, count) : api->SessionGetOutputCount(s, count));
}

char *vs_session_io(OrtSession *s, int is_input, size_t i, char **name, int *elem_type, int64_t *dims, size_t *ndim) {
  CHECK_API();
  OrtAllocator *alloc = NULL;
  OrtStatus *st = api->GetAllocatorWithDefaultOptions(&alloc);
  if (st) return status_err(st);
  char *n = NULL;
  st = is_input ? api->SessionGetInputName(s, i, alloc, &n) : api->SessionGetOutputName(s, i, alloc, &n);
  if (st) return status_err(st);
  *name = strdup(n);
  alloc->Free(alloc, n);
  OrtTypeInfo *ti = NULL;
  st = is_input ? api->SessionGetInputTypeInfo(s, i, &ti) : api->SessionGetOutputTypeInfo(s, i, &ti);
  if (st) return status_err(st);
  const OrtTensorTypeAndShapeInfo *tsi = NULL;
  char *err = NULL;
  *elem_type = 0;
  *ndim = 0;
  if ((err = status_err(api->CastTypeInfoToTensorInfo(ti, &tsi)))) goto done;
  if (!tsi) goto done;  // not a tensor: elem_type 0 tells the caller
  ONNXTensorElementDataType et;
  if ((err = status_err(api->GetTensorElementType(tsi, &et)))) goto done;
  *elem_type = (int)et;
  size_t nd = 0;
  if ((err = status_err(api->GetDimensionsCount(tsi, &nd)))) goto done;
  if (nd > 8) {
    err = dup_msg("", "tensor has more than 8 dimensions");
    goto done;
  }
  if ((err = status_err(api->GetDimensions(tsi, dims, nd)))) goto done;
  *ndim = nd;
done:
  api->ReleaseTypeInfo(ti);
  return err;
}

char *vs_memory_info_cpu(OrtMemoryInfo **out) {
  CHECK_API();
  return status_err(api->CreateCpuMemoryInfo(OrtDeviceAllocator, OrtMemTypeDefault, out));
}

// Page-locked host memory the GPU can reach by DMA: ONNX Runtime then
// copies it to the device asynchronously on the session's stream instead
// of staging it through a pageable bounce buffer.
char *vs_memory_info_pinned(int device, OrtMemoryInfo **out) {
  CHECK_API();
  return status_err(api->CreateMemoryInfo_V2("CudaPinned", OrtMemoryInfoDeviceType_GPU, 0x10DE, device,
                                             OrtDeviceMemoryType_HOST_ACCESSIBLE, 0, OrtDeviceAllocator, out));
}

void vs_memory_info_release(OrtMemoryInfo *m) {
  if (api && m) api->ReleaseMemoryInfo(m);
}

char *vs_tensor_f32(OrtMemoryInfo *m, float *data, size_t count, const int64_t *shape, size_t ndim, OrtValue **out) {
  CHECK_API();
  return status_err(api->CreateTensorWithDataAsOrtValue(m, data, count * sizeof(float), shape, ndim,
                                                        ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, out));
}

void vs_value_release(OrtValue *v) {
  if (api && v) api->ReleaseValue(v);
}

char *vs_binding_new(OrtSession *s, OrtIoBinding **out) {
  CHECK_API();
  return status_err(api->CreateIoBinding(s, out));
}

void vs_binding_release(OrtIoBinding *b) {
  if (api && b) api->ReleaseIoBinding(b);
}

char *vs_bind_input(OrtIoBinding *b, const char *name, OrtValue *v) {
  CHECK_API();
  return status_err(api->BindInput(b, name, v));
}

char *vs_bind_output(OrtIoBinding *b, const char *name, OrtValue *v) {
  CHECK_API();
  return status_err(api->BindOutput(b, name, v));
}

// vs_bound_output_data reports where the bound outputs' data lives, through
// GetBoundOutputValues: warm-up uses it to check that ONNX Runtime wrote
// into the buffers we bound rather than into memory of its own.
char *vs_bound_output_data(OrtIoBinding *b, void **ptrs, size_t cap, size_t *count) {
  CHECK_API();
  OrtAllocator *alloc = NULL;
  OrtStatus *st = api->GetAllocatorWithDefaultOptions(&alloc);
  if (st) return status_err(st);
  OrtValue **vals = NULL;
  size_t n = 0;
  if ((st = api->GetBoundOutputValues(b, alloc, &vals, &n))) return status_err(st);
  char *err = NULL;
  for (size_t i = 0; i < n; i++) {
    void *p = NULL;
    if (!err && i < cap) {
      err = status_err(api->GetTensorMutableData(vals[i], &p));
      ptrs[i] = p;
    }
    api->ReleaseValue(vals[i]);
  }
  if (vals) alloc->Free(alloc, vals);
  *count = n;
  return err;
}

char *vs_run_binding(OrtSession *s, OrtRunOptions *ro, OrtIoBinding *b) {
  CHECK_API();
  OrtStatus *st = api->RunWithBinding(s, ro, b);
  if (st) return status_err(st);
  // A no-op on the CPU provider; on CUDA it waits for the device-to-host
  // copies of the outputs, so Go never reads a half-written buffer.
  return status_err(api->SynchronizeBoundOutputs(b));
}

char *vs_run_options_new(OrtRunOptions **out) {
  CHECK_API();
  return status_err(api->CreateRunOptions(out));
}

char *vs_run_options_terminate(OrtRunOptions *ro, int terminate) {
  CHECK_API();
  return status_err(terminate ? api->RunOptionsSetTerminate(ro) : api->RunOptionsUnsetTerminate(ro));
}

void vs_run_options_release(OrtRunOptions *ro) {
  if (api && ro) api->ReleaseRunOptions(ro);
}

// ---- CUDA runtime, found at run time ----

typedef int (*cuda_host_alloc_fn)(void **, size_t, unsigned int);
typedef int (*cuda_free_host_fn)(void *);
typedef const char *(*cuda_error_string_fn)(int);
typedef int (*cuda_get_device_count_fn)(int *);

static cuda_host_alloc_fn cuda_host_alloc = NULL;
static cuda_free_host_fn cuda_free_host = NULL;
static cuda_error_string_fn cuda_error_string = NULL;

char *vs_cuda_load(const char *path) {
  if (cuda_host_alloc) return NULL;
  const char *names[] = {"libcudart.so.13", "libcudart.so.12", "libcudart.so"};
  size_t nnames = sizeof(names) / sizeof(names[0]);
  if (path && path[0]) {
    names[0] = path;
    nnames = 1;
  }
  void *h = NULL;
  char tried[1024] = "";
  for (size_t i = 0; i < nnames && !h; i++) {
    h = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
    if (!h) {
      const char *e = dlerror();
      size_t used = strlen(tried);
      snprintf(tried + used, sizeof(tried) - used, "%s%s", used ? "; " : "", e ? e : names[i]);
    }
  }
  if (!h) return dup_msg("CUDA runtime not found: ", tried);
  cuda_host_alloc_fn a = (cuda_host_alloc_fn)dlsym(h, "cudaHostAlloc");
  cuda_free_host_fn f = (cuda_free_host_fn)dlsym(h, "cudaFreeHost");
  cuda_error_string = (cuda_error_string_fn)dlsym(h, "cudaGetErrorString");
  cuda_get_device_count_fn count = (cuda_get_device_count_fn)dlsym(h, "cudaGetDeviceCount");
  if (!a || !f || !count) return dup_msg("CUDA runtime lacks cudaHostAlloc/cudaFreeHost/cudaGetDeviceCount", "");
  int n = 0;
  int rc = count(&n);
  if (rc != 0 || n == 0) {
    char buf[256];
    snprintf(buf, sizeof buf, "CUDA runtime found but no usable device (cudaGetDeviceCount: %s, %d devices)",
             cuda_error_string ? cuda_error_string(rc) : "error", n);
    return dup_msg("", buf);
  }
  cuda_free_host = f;
  cuda_host_alloc = a;
  return NULL;
}

char *vs_cuda_host_alloc(size_t bytes, void **out) {
  if (!cuda_host_alloc) return dup_msg("", "CUDA runtime not loaded");
  // cudaHostAllocPortable: pinned for every CUDA context, so one buffer
  // serves sessions on any GPU.
  int rc = cuda_host_alloc(out, bytes, 1);
  if (rc != 0) {
    char buf[256];
    snprintf(buf, sizeof buf, "cudaHostAlloc(%zu bytes): %s", bytes, cuda_error_string ? cuda_error_string(rc) : "error");
    return dup_msg("", buf);
  }
  return NULL;
}

char *vs_cuda_host_free(void *p) {
  if (!cuda_free_host) return dup_msg("", "CUDA runtime not loaded");
  int rc = cuda_free_host(p);
  if (rc != 0) return dup_msg("cudaFreeHost: ", cuda_error_string ? cuda_error_string(rc) : "error");
  return NULL;
}

char *vs_host_alloc(size_t bytes, void **out) {
  // 64-byte alignment suits vector loads and the runtime's own buffers.
  if (posix_memalign(out, 64, bytes ? bytes : 64) != 0) return dup_msg("", "posix_memalign: out of memory");
  return NULL;
}

void vs_host_free(void *p) { free(p); }
