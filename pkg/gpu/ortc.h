// Thin C shim over the ONNX Runtime C API for package gpu. Every function
// that can fail returns NULL on success or a malloc'ed error message the Go
// side frees, so native failures become Go errors at this one boundary.
#ifndef VISIONSERVE_GPU_ORTC_H
#define VISIONSERVE_GPU_ORTC_H

#include <stddef.h>
#include <stdint.h>
#include "onnxruntime_c_api.h"

char *vs_ort_load(const char *lib_path);
const char *vs_ort_version(void);

char *vs_session_options_new(OrtSessionOptions **out, int intra, int inter, int opt_level);
char *vs_session_options_config(OrtSessionOptions *o, const char *key, const char *value);
void vs_session_options_release(OrtSessionOptions *o);
char *vs_append_cuda(OrtSessionOptions *o, const char **keys, const char **values, size_t n);
char *vs_append_tensorrt(OrtSessionOptions *o, const char **keys, const char **values, size_t n);

char *vs_session_new(const char *path, OrtSessionOptions *o, OrtSession **out);
char *vs_session_new_bytes(const void *data, size_t len, OrtSessionOptions *o, OrtSession **out);
void vs_session_release(OrtSession *s);
// vs_session_io describes input (is_input=1) or output i: its name
// (malloc'ed), element type and up to 8 dimensions (-1 when dynamic).
char *vs_session_io_count(OrtSession *s, int is_input, size_t *count);
char *vs_session_io(OrtSession *s, int is_input, size_t i, char **name, int *elem_type, int64_t *dims, size_t *ndim);

char *vs_memory_info_cpu(OrtMemoryInfo **out);
char *vs_memory_info_pinned(int device, OrtMemoryInfo **out);
void vs_memory_info_release(OrtMemoryInfo *m);

char *vs_tensor_f32(OrtMemoryInfo *m, float *data, size_t count, const int64_t *shape, size_t ndim, OrtValue **out);
void vs_value_release(OrtValue *v);

char *vs_binding_new(OrtSession *s, OrtIoBinding **out);
void vs_binding_release(OrtIoBinding *b);
char *vs_bind_input(OrtIoBinding *b, const char *name, OrtValue *v);
char *vs_bind_output(OrtIoBinding *b, const char *name, OrtValue *v);
char *vs_bound_output_data(OrtIoBinding *b, void **ptrs, size_t cap, size_t *count);
char *vs_run_binding(OrtSession *s, OrtRunOptions *ro, OrtIoBinding *b);

char *vs_run_options_new(OrtRunOptions **out);
char *vs_run_options_terminate(OrtRunOptions *ro, int terminate);
void vs_run_options_release(OrtRunOptions *ro);

// Pinned host memory through the CUDA runtime, looked up with dlopen so
// the binary has no link-time CUDA dependency.
char *vs_cuda_load(const char *path);
char *vs_cuda_host_alloc(size_t bytes, void **out);
char *vs_cuda_host_free(void *p);
char *vs_host_alloc(size_t bytes, void **out);
void vs_host_free(void *p);

#endif
