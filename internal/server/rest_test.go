package server

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"mime/multipart"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"testing"
)

func restEnv(t *testing.T, options ...envOption) (*env, *httptest.Server) {
	t.Helper()
	e := newEnv(t, options...)
	ts := httptest.NewServer(e.srv.RESTHandler())
	t.Cleanup(ts.Close)
	return e, ts
}

func do(t *testing.T, method, url, ctype string, body []byte, header ...string) (int, http.Header, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, url, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if ctype != "" {
		req.Header.Set("Content-Type", ctype)
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header, b
}

// TestRESTErrors: every refusal is {"error": "..."} with the status
// Triton would give.
func TestRESTErrors(t *testing.T) {
	_, ts := restEnv(t, func(c *envConfig) { c.opts.MaxMessageBytes = 64 << 10 })
	fp32 := `{"inputs":[{"name":"images","shape":[1,3,2,2],"datatype":"FP32","data":[1,2,3,4,5,6,7,8,9,10,11,12]}]}`
	for _, tt := range []struct {
		name, method, path, body string
		header                   []string
		want                     int
		msg                      string
	}{
		{"unknown model", "GET", "/v2/models/nope", "", nil, 404, "not found"},
		{"unknown endpoint", "GET", "/v3/anything", "", nil, 404, "no such endpoint"},
		{"wrong method", "DELETE", "/v2/models/cls", "", nil, 404, "no such endpoint"},
		{"bad JSON", "POST", "/v2/models/cls/infer", "{", nil, 400, "JSON"},
		{"wrong shape", "POST", "/v2/models/cls/infer", fp32, nil, 400, "FP32 input shape"},
		{"not a number", "POST", "/v2/models/cls/infer", `{"inputs":[{"name":"images","shape":[3,64,64],"datatype":"FP32","data":["x"]}]}`, nil, 400, "not a number"},
		{"no data", "POST", "/v2/models/cls/infer", `{"inputs":[{"name":"images","shape":[3,64,64],"datatype":"FP32"}]}`, nil, 400, "no data"},
		{"header length past the body", "POST", "/v2/models/cls/infer", "{}", []string{InferHeaderContentLength, "99"}, 400, "does not fit"},
		{"binary size past the data", "POST", "/v2/models/cls/infer", `{"inputs":[{"name":"images","shape":[1],"datatype":"BYTES","parameters":{"binary_data_size":100}}]}`, []string{InferHeaderContentLength, "LEN"}, 400, "binary bytes are left"},
		{"body over the limit", "POST", "/v2/models/cls/infer", strings.Repeat(" ", 70<<10), nil, 413, "--max-message-bytes"},
		{"classification of a detector", "POST", "/v2/models/det/infer", `{"inputs":[{"name":"images","shape":[1],"datatype":"BYTES","data":["x"]}],"outputs":[{"name":"output0","parameters":{"classification":2}}]}`, nil, 400, ""},
		{"load outside explicit mode", "POST", "/v2/repository/models/cls/load", "", nil, 400, "explicit"},
		{"CUDA shared memory", "POST", "/v2/cudasharedmemory/region/r/register", "{}", nil, 501, "not supported"},
		{"unknown shm key", "POST", "/v2/systemsharedmemory/region/r/register", `{"key":"/no_such_key_here","byte_size":4}`, nil, 400, "no_such_key_here"},
		{"vision: empty body", "POST", "/v1/models/cls/classify", "", nil, 400, "empty body"},
		{"vision: corrupt image", "POST", "/v1/models/cls/classify", "\xff\xd8\xffjunk", nil, 400, ""},
		{"vision: wrong task", "POST", "/v1/models/cls/detect", "x", nil, 400, "not detect"},
		{"vision: bad option", "POST", "/v1/models/cls/classify?top_k=lots", "x", nil, 400, "top_k"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			header := slices.Clone(tt.header)
			if len(header) == 2 && header[1] == "LEN" {
				header[1] = strconv.Itoa(len(tt.body))
			}
			code, _, body := do(t, tt.method, ts.URL+tt.path, "", []byte(tt.body), header...)
			var e struct{ Error string }
			if err := json.Unmarshal(body, &e); err != nil || e.Error == "" {
				t.Fatalf("body %q is not {\"error\": ...}", body)
			}
			if code != tt.want || !strings.Contains(e.Error, tt.msg) {
				t.Errorf("%d %q, want %d with %q", code, e.Error, tt.want, tt.msg)
			}
		})
	}
}

func TestRESTAuthAndAdmission(t *testing.T) {
	_, ts := restEnv(t, func(c *envConfig) { c.opts.AuthToken = "s3cret" })
	if code, _, _ := do(t, "GET", ts.URL+"/v2/health/ready", "", nil); code != 200 {
		t.Errorf("health without a token: %d, want 200 (open)", code)
	}
	if code, _, body := do(t, "GET", ts.URL+"/v2/models/cls", "", nil); code != 401 || !strings.Contains(string(body), "bearer token") {
		t.Errorf("metadata without a token: %d %s", code, body)
	}
	if code, _, _ := do(t, "GET", ts.URL+"/v2/models/cls", "", nil, "Authorization", "bearer s3cret"); code != 200 {
		t.Errorf("with the token: %d", code)
	}
	a := &admission{limit: 1}
	release, err := a.http(httptest.NewRequest("GET", "/v2", nil), false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.http(httptest.NewRequest("GET", "/v2", nil), false); err == nil || !strings.Contains(err.Error(), "--max-concurrent-calls") {
		t.Errorf("second call over a limit of 1: %v", err)
	}
	release()
	if a.inProgress() != 0 {
		t.Errorf("%d calls in progress after release", a.inProgress())
	}
}

// TestRESTInferJSONAndBinary: the same FP32 input as JSON and as binary
// tensor data gives the same output, JSON or binary, equal to gRPC's.
func TestRESTInferJSONAndBinary(t *testing.T) {
	e, ts := restEnv(t)
	per := 3 * 64 * 64
	in := make([]float32, per)
	for i := range in {
		in[i] = float32(i%97) / 97
	}
	data, _ := json.Marshal(in)
	jsonBody := fmt.Sprintf(`{"id":"q1","inputs":[{"name":"images","shape":[1,3,64,64],"datatype":"FP32","data":%s}]}`, data)
	code, hdr, body := do(t, "POST", ts.URL+"/v2/models/cls/infer", "application/json", []byte(jsonBody))
	if code != 200 || hdr.Get(InferHeaderContentLength) != "" {
		t.Fatalf("%d %s", code, body)
	}
	var resp struct {
		ID      string `json:"id"`
		Outputs []struct {
			Name     string
			Datatype string
			Shape    []int64
			Data     []float32
		}
	}
	if err := json.Unmarshal(body, &resp); err != nil || resp.ID != "q1" || len(resp.Outputs) != 1 || !slices.Equal(resp.Outputs[0].Shape, []int64{1, 10}) {
		t.Fatalf("response %s (%v)", body, err)
	}
	want := resp.Outputs[0].Data

	// Binary in, binary out.
	head := []byte(`{"inputs":[{"name":"images","shape":[1,3,64,64],"datatype":"FP32","parameters":{"binary_data_size":` + strconv.Itoa(4*per) + `}}],"outputs":[{"name":"logits","parameters":{"binary_data":true}}]}`)
	bin := make([]byte, 4*per)
	for i, v := range in {
		binary.LittleEndian.PutUint32(bin[4*i:], math.Float32bits(v))
	}
	code, hdr, body = do(t, "POST", ts.URL+"/v2/models/cls/infer", "application/octet-stream", append(head, bin...), InferHeaderContentLength, strconv.Itoa(len(head)))
	n, err := strconv.Atoi(hdr.Get(InferHeaderContentLength))
	if code != 200 || err != nil {
		t.Fatalf("%d %s", code, body)
	}
	raw := body[n:]
	if len(raw) != 40 {
		t.Fatalf("%d binary output bytes, want 40", len(raw))
	}
	for i := range 10 {
		if got := math.Float32frombits(binary.LittleEndian.Uint32(raw[4*i:])); got != want[i] {
			t.Fatalf("binary output %d = %v, JSON gave %v", i, got, want[i])
		}
	}
	_ = e
}

func TestRESTVision(t *testing.T) {
	_, ts := restEnv(t)
	img := jpegBytes(t, 64, 48, 90)
	code, _, body := do(t, "POST", ts.URL+"/v1/models/cls/classify?top_k=2", "image/jpeg", img)
	var one struct {
		Image   string
		Model   string
		Classes []struct{ Label string }
	}
	if err := json.Unmarshal(body, &one); code != 200 || err != nil || one.Model != "cls" || len(one.Classes) != 2 {
		t.Fatalf("%d %s", code, body)
	}
	var mp bytes.Buffer
	w := multipart.NewWriter(&mp)
	for _, name := range []string{"a.jpg", "b.jpg"} {
		fw, _ := w.CreateFormFile("image", name)
		fw.Write(img)
	}
	w.Close()
	code, _, body = do(t, "POST", ts.URL+"/v1/models/det/detect", w.FormDataContentType(), mp.Bytes())
	var many []struct {
		Image      string
		Detections []struct {
			Box struct{ X1, Y1, X2, Y2 float32 }
		}
	}
	if err := json.Unmarshal(body, &many); code != 200 || err != nil || len(many) != 2 || many[1].Image != "b.jpg" {
		t.Fatalf("%d %s", code, body)
	}
}

// FuzzRESTInfer: no body makes the infer endpoint panic or answer 5xx.
func FuzzRESTInfer(f *testing.F) {
	f.Add([]byte(`{"inputs":[{"name":"images","shape":[1,3,64,64],"datatype":"FP32","data":[1]}]}`), 0)
	f.Add([]byte(`{"inputs":[{"name":"images","shape":[1],"datatype":"BYTES","parameters":{"binary_data_size":4}}]}abcd`), 97)
	f.Add([]byte(`{"outputs":[{"name":"logits","parameters":{"classification":3}}]}`), -1)
	e := newEnv(f)
	h := e.srv.RESTHandler()
	f.Fuzz(func(t *testing.T, body []byte, headerLen int) {
		req := httptest.NewRequest("POST", "/v2/models/cls/infer", bytes.NewReader(body))
		if headerLen >= 0 {
			req.Header.Set(InferHeaderContentLength, strconv.Itoa(headerLen))
		}
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		if rec.Code >= 500 {
			t.Fatalf("%d for %q: %s", rec.Code, body, rec.Body.String())
		}
	})
}
