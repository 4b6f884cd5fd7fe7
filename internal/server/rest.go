package server

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"mime"
	"mime/multipart"
	"net/http"
	"strconv"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/visionserve/visionserve/internal/visionjson"
	"github.com/visionserve/visionserve/pkg/model"
	"github.com/visionserve/visionserve/proto/inference"
	visionv1 "github.com/visionserve/visionserve/proto/visionserve/v1"
)

// The REST API: KServe v2 / the Open Inference Protocol over HTTP with
// Triton's extensions (binary tensor data, classification, model
// repository, configuration, statistics, system shared memory), and the
// vision API for curl and web apps. Every handler translates to the same
// gRPC service methods, so both protocols answer alike; the same bearer
// token, bound on calls in progress and message size apply.

// InferHeaderContentLength is the header of Triton's binary tensor data
// extension: the length of the JSON part of the body.
const InferHeaderContentLength = "Inference-Header-Content-Length"

// RESTHandler serves the REST API.
func (s *Server) RESTHandler() http.Handler {
	mux := http.NewServeMux()
	r := &rest{oip: s.oip, vision: s.vision, admit: s.admit, maxBytes: int64(s.maxMessageBytes)}
	h := func(pattern string, fn func(w http.ResponseWriter, req *http.Request) error) {
		mux.HandleFunc(pattern, func(w http.ResponseWriter, req *http.Request) {
			open := strings.HasPrefix(req.URL.Path, "/v2/health/")
			release, err := r.admit.http(req, open)
			if err != nil {
				writeError(w, err)
				return
			}
			defer release()
			req.Body = http.MaxBytesReader(w, req.Body, r.maxBytes)
			// The connection is the client the batchers share their
			// queues fairly between, as for a gRPC call.
			req = req.WithContext(model.WithClient(req.Context(), req.RemoteAddr))
			if err := fn(w, req); err != nil {
				writeError(w, err)
			}
		})
	}
	h("GET /v2/health/live", r.live)
	h("GET /v2/health/ready", r.ready)
	h("GET /v2", r.serverMetadata)
	h("GET /v2/{$}", r.serverMetadata)
	for _, v := range []string{"", "/versions/{version}"} {
		h("GET /v2/models/{name}"+v, r.modelMetadata)
		h("GET /v2/models/{name}"+v+"/ready", r.modelReady)
		h("GET /v2/models/{name}"+v+"/config", r.modelConfig)
		h("GET /v2/models/{name}"+v+"/stats", r.modelStats)
		h("POST /v2/models/{name}"+v+"/infer", r.infer)
	}
	h("GET /v2/models/stats", r.modelStats)
	h("POST /v2/repository/index", r.repositoryIndex)
	h("POST /v2/repository/models/{name}/load", r.load)
	h("POST /v2/repository/models/{name}/unload", r.unload)
	h("GET /v2/systemsharedmemory/status", r.shmStatus)
	h("GET /v2/systemsharedmemory/region/{region}/status", r.shmStatus)
	h("POST /v2/systemsharedmemory/region/{region}/register", r.shmRegister)
	h("POST /v2/systemsharedmemory/unregister", r.shmUnregister)
	h("POST /v2/systemsharedmemory/region/{region}/unregister", r.shmUnregister)
	h("/v2/cudasharedmemory/", func(http.ResponseWriter, *http.Request) error { return errNoCUDASharedMemory })
	h("POST /v1/models/{name}/classify", r.classify)
	h("POST /v1/models/{name}/detect", r.detect)
	mux.HandleFunc("/", func(w http.ResponseWriter, req *http.Request) {
		writeError(w, status.Errorf(codes.NotFound, "no such endpoint: %s %s", req.Method, clip(req.URL.Path)))
	})
	return mux
}

type rest struct {
	oip      *oipService
	vision   *visionService
	admit    *admission
	maxBytes int64
}

// http admits a REST call as tap admits a gRPC one: the bearer token
// (but for the health endpoints), then the bound on calls in progress.
func (a *admission) http(req *http.Request, open bool) (release func(), err error) {
	if a.token != "" && !open {
		if err := checkToken(metadata.MD{"authorization": req.Header.Values("Authorization")}, a.token); err != nil {
			return nil, err
		}
	}
	if a.limit <= 0 {
		return func() {}, nil
	}
	if n := a.calls.Add(1); n > a.limit {
		a.calls.Add(-1)
		return nil, status.Errorf(codes.ResourceExhausted, "server busy: %d calls in progress, the limit is %d (--max-concurrent-calls); retry with backoff", n-1, a.limit)
	}
	return func() { a.calls.Add(-1) }, nil
}

// httpStatus maps a gRPC code to the HTTP status Triton answers with.
func httpStatus(c codes.Code) int {
	switch c {
	case codes.OK:
		return http.StatusOK
	case codes.InvalidArgument, codes.FailedPrecondition, codes.OutOfRange:
		return http.StatusBadRequest
	case codes.NotFound:
		return http.StatusNotFound
	case codes.AlreadyExists:
		return http.StatusConflict
	case codes.Unauthenticated:
		return http.StatusUnauthorized
	case codes.PermissionDenied:
		return http.StatusForbidden
	case codes.ResourceExhausted:
		return http.StatusTooManyRequests
	case codes.Unimplemented:
		return http.StatusNotImplemented
	case codes.Unavailable:
		return http.StatusServiceUnavailable
	case codes.DeadlineExceeded:
		return http.StatusGatewayTimeout
	case codes.Canceled:
		return 499
	}
	return http.StatusInternalServerError
}

// writeError answers {"error": "..."} with the matching HTTP status.
func writeError(w http.ResponseWriter, err error) {
	code := http.StatusInternalServerError
	msg := err.Error()
	var mbe *http.MaxBytesError
	switch {
	case errors.As(err, &mbe):
		code, msg = http.StatusRequestEntityTooLarge, fmt.Sprintf("request body over %d bytes (--max-message-bytes)", mbe.Limit)
	default:
		st, ok := status.FromError(err)
		if !ok {
			st = status.Convert(toStatus(err))
		}
		code, msg = httpStatus(st.Code()), st.Message()
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(map[string]string{"error": msg})
}

func writeJSON(w http.ResponseWriter, v any) error {
	w.Header().Set("Content-Type", "application/json")
	return json.NewEncoder(w).Encode(v)
}

// writeProto answers a proto message as JSON with proto field names and
// 64-bit integers as numbers, as Triton's REST API writes them (protojson
// would quote them).
func writeProto(w http.ResponseWriter, m proto.Message) error {
	return writeJSON(w, protoValue(m.ProtoReflect()))
}

// protoValue is m as plain JSON values: every field, set or not.
func protoValue(m protoreflect.Message) map[string]any {
	out := map[string]any{}
	fields := m.Descriptor().Fields()
	for i := range fields.Len() {
		fd := fields.Get(i)
		if fd.ContainingOneof() != nil && !m.Has(fd) {
			continue
		}
		v := m.Get(fd)
		switch {
		case fd.IsList():
			l := v.List()
			a := make([]any, l.Len())
			for j := range a {
				a[j] = scalarValue(fd, l.Get(j))
			}
			out[string(fd.Name())] = a
		case fd.IsMap():
			mm := map[string]any{}
			v.Map().Range(func(k protoreflect.MapKey, mv protoreflect.Value) bool {
				mm[k.String()] = scalarValue(fd.MapValue(), mv)
				return true
			})
			out[string(fd.Name())] = mm
		default:
			if fd.Kind() == protoreflect.MessageKind && !m.Has(fd) {
				continue
			}
			out[string(fd.Name())] = scalarValue(fd, v)
		}
	}
	return out
}

func scalarValue(fd protoreflect.FieldDescriptor, v protoreflect.Value) any {
	switch fd.Kind() {
	case protoreflect.MessageKind, protoreflect.GroupKind:
		return protoValue(v.Message())
	case protoreflect.EnumKind:
		if ev := fd.Enum().Values().ByNumber(v.Enum()); ev != nil {
			return string(ev.Name())
		}
		return int32(v.Enum())
	case protoreflect.BytesKind:
		return v.Bytes()
	}
	return v.Interface()
}

func (r *rest) live(w http.ResponseWriter, req *http.Request) error {
	resp, err := r.oip.ServerLive(req.Context(), &inference.ServerLiveRequest{})
	if err != nil {
		return err
	}
	return writeHealth(w, resp.GetLive(), "live")
}

func (r *rest) ready(w http.ResponseWriter, req *http.Request) error {
	resp, err := r.oip.ServerReady(req.Context(), &inference.ServerReadyRequest{})
	if err != nil {
		return err
	}
	return writeHealth(w, resp.GetReady(), "ready")
}

// writeHealth answers 200 or 400 with no body, as KServe's REST health
// endpoints do... with a small JSON body for people reading it.
func writeHealth(w http.ResponseWriter, ok bool, what string) error {
	if !ok {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusBadRequest)
		return json.NewEncoder(w).Encode(map[string]any{what: false})
	}
	return writeJSON(w, map[string]any{what: true})
}

func (r *rest) serverMetadata(w http.ResponseWriter, req *http.Request) error {
	resp, err := r.oip.ServerMetadata(req.Context(), &inference.ServerMetadataRequest{})
	if err != nil {
		return err
	}
	return writeJSON(w, map[string]any{"name": resp.GetName(), "version": resp.GetVersion(), "extensions": resp.GetExtensions()})
}

func (r *rest) modelMetadata(w http.ResponseWriter, req *http.Request) error {
	resp, err := r.oip.ModelMetadata(req.Context(), &inference.ModelMetadataRequest{Name: req.PathValue("name"), Version: req.PathValue("version")})
	if err != nil {
		return err
	}
	return writeProto(w, resp)
}

func (r *rest) modelReady(w http.ResponseWriter, req *http.Request) error {
	resp, err := r.oip.ModelReady(req.Context(), &inference.ModelReadyRequest{Name: req.PathValue("name"), Version: req.PathValue("version")})
	if err != nil {
		return err
	}
	return writeHealth(w, resp.GetReady(), "ready")
}

func (r *rest) modelConfig(w http.ResponseWriter, req *http.Request) error {
	resp, err := r.oip.ModelConfig(req.Context(), &inference.ModelConfigRequest{Name: req.PathValue("name"), Version: req.PathValue("version")})
	if err != nil {
		return err
	}
	// Triton's REST answers the config itself, not wrapped.
	return writeProto(w, resp.GetConfig())
}

func (r *rest) modelStats(w http.ResponseWriter, req *http.Request) error {
	resp, err := r.oip.ModelStatistics(req.Context(), &inference.ModelStatisticsRequest{Name: req.PathValue("name"), Version: req.PathValue("version")})
	if err != nil {
		return err
	}
	return writeProto(w, resp)
}

func (r *rest) repositoryIndex(w http.ResponseWriter, req *http.Request) error {
	var body struct {
		Ready bool `json:"ready"`
	}
	if err := decodeOptionalJSON(req, &body); err != nil {
		return err
	}
	resp, err := r.oip.RepositoryIndex(req.Context(), &inference.RepositoryIndexRequest{Ready: body.Ready})
	if err != nil {
		return err
	}
	out := []map[string]string{}
	for _, m := range resp.GetModels() {
		e := map[string]string{"name": m.GetName(), "version": m.GetVersion(), "state": m.GetState()}
		if m.GetReason() != "" {
			e["reason"] = m.GetReason()
		}
		out = append(out, e)
	}
	return writeJSON(w, out)
}

// load and unload serve the repository extension's POST
// /v2/repository/models/NAME/load and /unload; the body's parameters,
// when any, are passed on by name (load refuses them all, unload takes
// unload_dependents).
func (r *rest) load(w http.ResponseWriter, req *http.Request) error {
	params, err := repositoryParams(req)
	if err != nil {
		return err
	}
	if _, err := r.oip.RepositoryModelLoad(req.Context(), &inference.RepositoryModelLoadRequest{ModelName: req.PathValue("name"), Parameters: params}); err != nil {
		return err
	}
	return writeJSON(w, map[string]any{})
}

func (r *rest) unload(w http.ResponseWriter, req *http.Request) error {
	params, err := repositoryParams(req)
	if err != nil {
		return err
	}
	if _, err := r.oip.RepositoryModelUnload(req.Context(), &inference.RepositoryModelUnloadRequest{ModelName: req.PathValue("name"), Parameters: params}); err != nil {
		return err
	}
	return writeJSON(w, map[string]any{})
}

func repositoryParams(req *http.Request) (map[string]*inference.ModelRepositoryParameter, error) {
	var body struct {
		Parameters map[string]any `json:"parameters"`
	}
	if err := decodeOptionalJSON(req, &body); err != nil {
		return nil, err
	}
	params := map[string]*inference.ModelRepositoryParameter{}
	for k := range body.Parameters {
		params[k] = &inference.ModelRepositoryParameter{}
	}
	return params, nil
}

func (r *rest) shmStatus(w http.ResponseWriter, req *http.Request) error {
	resp, err := r.oip.SystemSharedMemoryStatus(req.Context(), &inference.SystemSharedMemoryStatusRequest{Name: req.PathValue("region")})
	if err != nil {
		return err
	}
	out := []map[string]any{}
	for _, reg := range resp.GetRegions() {
		out = append(out, map[string]any{"name": reg.GetName(), "key": reg.GetKey(), "offset": reg.GetOffset(), "byte_size": reg.GetByteSize()})
	}
	return writeJSON(w, out)
}

func (r *rest) shmRegister(w http.ResponseWriter, req *http.Request) error {
	var body struct {
		Key      string `json:"key"`
		Offset   uint64 `json:"offset"`
		ByteSize uint64 `json:"byte_size"`
	}
	if err := decodeJSON(req.Body, &body); err != nil {
		return err
	}
	if _, err := r.oip.SystemSharedMemoryRegister(req.Context(), &inference.SystemSharedMemoryRegisterRequest{
		Name: req.PathValue("region"), Key: body.Key, Offset: body.Offset, ByteSize: body.ByteSize,
	}); err != nil {
		return err
	}
	return writeJSON(w, map[string]any{})
}

func (r *rest) shmUnregister(w http.ResponseWriter, req *http.Request) error {
	if _, err := r.oip.SystemSharedMemoryUnregister(req.Context(), &inference.SystemSharedMemoryUnregisterRequest{Name: req.PathValue("region")}); err != nil {
		return err
	}
	return writeJSON(w, map[string]any{})
}

func decodeJSON(body io.Reader, v any) error {
	dec := json.NewDecoder(body)
	if err := dec.Decode(v); err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return err
		}
		return invalid("request body is not the JSON expected: %v", err)
	}
	return nil
}

// decodeOptionalJSON decodes a body that may be empty.
func decodeOptionalJSON(req *http.Request, v any) error {
	b, err := io.ReadAll(req.Body)
	if err != nil {
		return err
	}
	if len(bytes.TrimSpace(b)) == 0 {
		return nil
	}
	return decodeJSON(bytes.NewReader(b), v)
}

// inferJSON is a KServe v2 REST infer request or response.
type inferJSON struct {
	ID           string         `json:"id,omitempty"`
	ModelName    string         `json:"model_name,omitempty"`
	ModelVersion string         `json:"model_version,omitempty"`
	Parameters   map[string]any `json:"parameters,omitempty"`
	Inputs       []tensorJSON   `json:"inputs,omitempty"`
	Outputs      []tensorJSON   `json:"outputs,omitempty"`
}

type tensorJSON struct {
	Name       string          `json:"name"`
	Shape      []int64         `json:"shape,omitempty"`
	Datatype   string          `json:"datatype,omitempty"`
	Parameters map[string]any  `json:"parameters,omitempty"`
	Data       json.RawMessage `json:"data,omitempty"`
}

// infer serves POST /v2/models/{name}/infer: JSON tensors, or Triton's
// binary tensor data extension (Inference-Header-Content-Length: the
// JSON header's length; the inputs' bytes follow it, in order).
func (r *rest) infer(w http.ResponseWriter, req *http.Request) error {
	body, err := io.ReadAll(req.Body)
	if err != nil {
		return err
	}
	header, binaryPart := body, []byte(nil)
	if v := req.Header.Get(InferHeaderContentLength); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 || n > len(body) {
			return invalid("%s %q does not fit a body of %d bytes", InferHeaderContentLength, clip(v), len(body))
		}
		header, binaryPart = body[:n], body[n:]
	}
	var in inferJSON
	if err := decodeJSON(bytes.NewReader(header), &in); err != nil {
		return err
	}
	pb := &inference.ModelInferRequest{ModelName: req.PathValue("name"), ModelVersion: req.PathValue("version"), Id: in.ID}
	raw := false
	for _, t := range in.Inputs {
		it := &inference.ModelInferRequest_InferInputTensor{Name: t.Name, Datatype: t.Datatype, Shape: t.Shape, Parameters: inferParams(t.Parameters)}
		if n, ok := intParam(t.Parameters, "binary_data_size"); ok {
			if n < 0 || n > int64(len(binaryPart)) {
				return invalid("input %q: binary_data_size %d, but %d binary bytes are left", clip(t.Name), n, len(binaryPart))
			}
			pb.RawInputContents = append(pb.RawInputContents, binaryPart[:n:n])
			binaryPart = binaryPart[n:]
			delete(it.Parameters, "binary_data_size")
			raw = true
		} else if _, shm := t.Parameters["shared_memory_region"]; !shm {
			if it.Contents, err = jsonContents(t); err != nil {
				return err
			}
		}
		pb.Inputs = append(pb.Inputs, it)
	}
	if raw && len(pb.RawInputContents) != len(pb.Inputs) {
		return invalid("every input must be binary (binary_data_size) when one is")
	}
	if len(binaryPart) > 0 {
		return invalid("%d binary bytes after the last input", len(binaryPart))
	}
	binaryOut, _ := in.Parameters["binary_data_output"].(bool)
	binaryByOutput := map[string]bool{}
	for _, o := range in.Outputs {
		ot := &inference.ModelInferRequest_InferRequestedOutputTensor{Name: o.Name, Parameters: inferParams(o.Parameters)}
		if b, ok := o.Parameters["binary_data"].(bool); ok {
			binaryByOutput[o.Name] = b
			delete(ot.Parameters, "binary_data")
		}
		if k, ok := intParam(o.Parameters, "classification"); ok {
			ot.Parameters["classification"] = &inference.InferParameter{ParameterChoice: &inference.InferParameter_Int64Param{Int64Param: k}}
		}
		pb.Outputs = append(pb.Outputs, ot)
	}
	resp, err := r.oip.ModelInfer(req.Context(), pb)
	if err != nil {
		return err
	}
	out := inferJSON{ID: resp.GetId(), ModelName: resp.GetModelName(), ModelVersion: resp.GetModelVersion()}
	var tail []byte
	for i, o := range resp.GetOutputs() {
		t := tensorJSON{Name: o.GetName(), Datatype: o.GetDatatype(), Shape: o.GetShape()}
		if len(o.GetParameters()) > 0 {
			t.Parameters = map[string]any{}
			for k, p := range o.GetParameters() {
				t.Parameters[k] = paramValue(p)
			}
		}
		var data []byte
		if i < len(resp.GetRawOutputContents()) {
			data = resp.GetRawOutputContents()[i]
		}
		binary, set := binaryByOutput[o.GetName()]
		if !set {
			binary = binaryOut
		}
		switch {
		case t.Parameters["shared_memory_region"] != nil:
		case binary:
			if t.Parameters == nil {
				t.Parameters = map[string]any{}
			}
			t.Parameters["binary_data_size"] = len(data)
			tail = append(tail, data...)
		default:
			if t.Data, err = rawToJSON(o.GetDatatype(), data); err != nil {
				return err
			}
		}
		out.Outputs = append(out.Outputs, t)
	}
	head, err := json.Marshal(out)
	if err != nil {
		return err
	}
	if tail != nil {
		w.Header().Set(InferHeaderContentLength, strconv.Itoa(len(head)))
		w.Header().Set("Content-Type", "application/octet-stream")
	} else {
		w.Header().Set("Content-Type", "application/json")
	}
	w.Header().Set("Content-Length", strconv.Itoa(len(head)+len(tail)))
	if _, err := w.Write(head); err != nil {
		return nil
	}
	_, _ = w.Write(tail)
	return nil
}

func intParam(params map[string]any, key string) (int64, bool) {
	v, ok := params[key].(float64)
	if !ok || v != math.Trunc(v) || math.Abs(v) > 1<<53 {
		return 0, false
	}
	return int64(v), true
}

// inferParams converts JSON parameters to the proto's.
func inferParams(params map[string]any) map[string]*inference.InferParameter {
	out := map[string]*inference.InferParameter{}
	for k, v := range params {
		switch x := v.(type) {
		case bool:
			out[k] = &inference.InferParameter{ParameterChoice: &inference.InferParameter_BoolParam{BoolParam: x}}
		case string:
			out[k] = &inference.InferParameter{ParameterChoice: &inference.InferParameter_StringParam{StringParam: x}}
		case float64:
			if x == math.Trunc(x) && math.Abs(x) <= 1<<53 {
				out[k] = &inference.InferParameter{ParameterChoice: &inference.InferParameter_Int64Param{Int64Param: int64(x)}}
			} else {
				out[k] = &inference.InferParameter{ParameterChoice: &inference.InferParameter_DoubleParam{DoubleParam: x}}
			}
		}
	}
	return out
}

func paramValue(p *inference.InferParameter) any {
	switch x := p.GetParameterChoice().(type) {
	case *inference.InferParameter_BoolParam:
		return x.BoolParam
	case *inference.InferParameter_Int64Param:
		return x.Int64Param
	case *inference.InferParameter_StringParam:
		return x.StringParam
	case *inference.InferParameter_DoubleParam:
		return x.DoubleParam
	case *inference.InferParameter_Uint64Param:
		return x.Uint64Param
	}
	return nil
}

// jsonContents reads a JSON tensor's data, flat or nested, into typed
// contents.
func jsonContents(t tensorJSON) (*inference.InferTensorContents, error) {
	if len(t.Data) == 0 {
		return nil, invalid("input %q has no data (and no binary_data_size or shared memory)", clip(t.Name))
	}
	var v any
	dec := json.NewDecoder(bytes.NewReader(t.Data))
	dec.UseNumber()
	if err := dec.Decode(&v); err != nil {
		return nil, invalid("input %q: data is not JSON: %v", clip(t.Name), err)
	}
	var flat []any
	var walk func(any)
	walk = func(x any) {
		if a, ok := x.([]any); ok {
			for _, e := range a {
				walk(e)
			}
			return
		}
		flat = append(flat, x)
	}
	walk(v)
	c := &inference.InferTensorContents{}
	switch t.Datatype {
	case "FP32":
		c.Fp32Contents = make([]float32, len(flat))
		for i, x := range flat {
			n, ok := x.(json.Number)
			f, err := n.Float64()
			if !ok || err != nil {
				return nil, invalid("input %q: FP32 element %d is not a number", clip(t.Name), i)
			}
			c.Fp32Contents[i] = float32(f)
		}
	case "UINT8":
		c.UintContents = make([]uint32, len(flat))
		for i, x := range flat {
			n, ok := x.(json.Number)
			u, err := strconv.ParseUint(string(n), 10, 32)
			if !ok || err != nil {
				return nil, invalid("input %q: UINT8 element %d is not an unsigned integer", clip(t.Name), i)
			}
			c.UintContents[i] = uint32(u)
		}
	case "BYTES":
		for i, x := range flat {
			s, ok := x.(string)
			if !ok {
				return nil, invalid("input %q: BYTES element %d is not a string", clip(t.Name), i)
			}
			c.BytesContents = append(c.BytesContents, []byte(s))
		}
	default:
		return nil, invalid("input %q: datatype %q not supported (FP32, UINT8 or BYTES)", clip(t.Name), clip(t.Datatype))
	}
	return c, nil
}

// rawToJSON renders raw output bytes as a JSON array.
func rawToJSON(datatype string, raw []byte) (json.RawMessage, error) {
	switch datatype {
	case "FP32":
		f := floatsFromLE(raw)
		var b bytes.Buffer
		b.WriteByte('[')
		for i, v := range f {
			if i > 0 {
				b.WriteByte(',')
			}
			b.WriteString(strconv.FormatFloat(float64(v), 'g', -1, 32))
		}
		b.WriteByte(']')
		return b.Bytes(), nil
	case "BYTES":
		var out []string
		for len(raw) >= 4 {
			n := binary.LittleEndian.Uint32(raw)
			raw = raw[4:]
			if uint64(n) > uint64(len(raw)) {
				return nil, errors.New("malformed BYTES output")
			}
			out = append(out, string(raw[:n]))
			raw = raw[n:]
		}
		return json.Marshal(out)
	}
	return nil, fmt.Errorf("output datatype %q", datatype)
}

// classify and detect serve the vision API over REST: the body is one
// image (raw bytes) or several (multipart/form-data, one image a part);
// the answer is what `infer-client --json` prints for each image: an
// object for one image, an array for several.
func (r *rest) classify(w http.ResponseWriter, req *http.Request) error {
	return r.visionCall(w, req, "classify")
}

func (r *rest) detect(w http.ResponseWriter, req *http.Request) error {
	return r.visionCall(w, req, "detect")
}

func (r *rest) visionCall(w http.ResponseWriter, req *http.Request, task string) error {
	name := req.PathValue("name")
	images, names, multi, err := readImages(req)
	if err != nil {
		return err
	}
	opts, err := visionOptions(req)
	if err != nil {
		return err
	}
	var results []*visionv1.ImageResult
	if task == "classify" {
		resp, err := r.vision.Classify(req.Context(), &visionv1.ClassifyRequest{Model: name, Images: images, Options: opts})
		if err != nil {
			return err
		}
		results = resp.GetResults()
	} else {
		resp, err := r.vision.Detect(req.Context(), &visionv1.DetectRequest{Model: name, Images: images, Options: opts})
		if err != nil {
			return err
		}
		results = resp.GetResults()
	}
	out := make([]visionjson.Result, len(results))
	for i, res := range results {
		out[i] = visionjson.FromResult(names[i], name, task, res)
	}
	if !multi {
		return writeJSON(w, out[0])
	}
	return writeJSON(w, out)
}

// visionOptions reads top_k, confidence, iou and max_detections from the
// query string.
func visionOptions(req *http.Request) (*visionv1.Options, error) {
	q := req.URL.Query()
	o := &visionv1.Options{}
	for key, set := range map[string]func(string) error{
		"top_k":          func(v string) error { n, err := strconv.ParseInt(v, 10, 32); o.TopK = int32(n); return err },
		"max_detections": func(v string) error { n, err := strconv.ParseInt(v, 10, 32); o.MaxDetections = int32(n); return err },
		"confidence":     func(v string) error { f, err := strconv.ParseFloat(v, 32); o.Confidence = float32(f); return err },
		"iou":            func(v string) error { f, err := strconv.ParseFloat(v, 32); o.Iou = float32(f); return err },
	} {
		if v := q.Get(key); v != "" {
			if err := set(v); err != nil {
				return nil, invalid("query %s=%q is not a number", key, clip(v))
			}
		}
	}
	return o, nil
}

// readImages reads the request's images: the raw body, or the file parts
// of a multipart/form-data body.
func readImages(req *http.Request) (images []*visionv1.Image, names []string, multi bool, err error) {
	mt, params, _ := mime.ParseMediaType(req.Header.Get("Content-Type"))
	if mt != "multipart/form-data" {
		b, err := io.ReadAll(req.Body)
		if err != nil {
			return nil, nil, false, err
		}
		if len(b) == 0 {
			return nil, nil, false, invalid("empty body: send the image bytes, or multipart/form-data with one image a part")
		}
		return []*visionv1.Image{encodedImage(b)}, []string{"body"}, false, nil
	}
	if params["boundary"] == "" {
		return nil, nil, false, invalid("multipart/form-data without a boundary")
	}
	mr := multipart.NewReader(req.Body, params["boundary"])
	for {
		p, err := mr.NextPart()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			var mbe *http.MaxBytesError
			if errors.As(err, &mbe) {
				return nil, nil, false, err
			}
			return nil, nil, false, invalid("multipart body: %v", err)
		}
		b, err := io.ReadAll(p)
		if err != nil {
			return nil, nil, false, err
		}
		name := p.FileName()
		if name == "" {
			name = p.FormName()
		}
		images = append(images, encodedImage(b))
		names = append(names, name)
	}
	if len(images) == 0 {
		return nil, nil, false, invalid("multipart body holds no image part")
	}
	return images, names, true, nil
}
