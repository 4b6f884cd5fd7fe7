package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/visionserve/visionserve/pkg/model"
	"github.com/visionserve/visionserve/pkg/model/modeltest"
	"github.com/visionserve/visionserve/pkg/modelrepo"
	"github.com/visionserve/visionserve/proto/inference"
	visionv1 "github.com/visionserve/visionserve/proto/visionserve/v1"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"
)

func healthStatus(t *testing.T, e *env, service string) string {
	t.Helper()
	resp, err := healthpb.NewHealthClient(e.conn).Check(ctxT(t), &healthpb.HealthCheckRequest{Service: service})
	if err != nil {
		return "error: " + err.Error()
	}
	return resp.Status.String()
}

func TestHealthPerService(t *testing.T) {
	e := newEnv(t)
	for _, s := range []string{"", VisionServiceName, InferenceServiceName} {
		if got := healthStatus(t, e, s); got != "SERVING" {
			t.Errorf("health %q: %s", s, got)
		}
	}
	if got := healthStatus(t, e, "no.such.Service"); got == "SERVING" {
		t.Errorf("unknown service reported SERVING")
	}
}

func TestReflectionListsServices(t *testing.T) {
	e := newEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := reflectionpb.NewServerReflectionClient(e.conn).ServerReflectionInfo(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Send(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{}}); err != nil {
		t.Fatal(err)
	}
	resp, err := st.Recv()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, s := range resp.GetListServicesResponse().GetService() {
		names = append(names, s.Name)
	}
	for _, want := range []string{VisionServiceName, InferenceServiceName, "grpc.health.v1.Health"} {
		if !slices.Contains(names, want) {
			t.Errorf("reflection lists %v, missing %s", names, want)
		}
	}
	// A client with no proto files can resolve the request types.
	if err := st.Send(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_FileContainingSymbol{FileContainingSymbol: "inference.ModelInferRequest"}}); err != nil {
		t.Fatal(err)
	}
	resp, err = st.Recv()
	if err != nil || len(resp.GetFileDescriptorResponse().GetFileDescriptorProto()) == 0 {
		t.Errorf("file for inference.ModelInferRequest: %v %v", resp, err)
	}
	st.CloseSend()
}

// TestOneReadiness follows a model through its states and checks that
// /readyz, gRPC health checking, OIP ServerReady and ModelReady and the
// vision API's ModelInfo all say the same at every step: they read one
// source, the model registry.
func TestOneReadiness(t *testing.T) {
	for _, strict := range []bool{true, false} {
		t.Run(fmt.Sprintf("strict=%v", strict), func(t *testing.T) {
			reg := model.NewRegistry(model.RegistryOptions{StrictReadiness: strict})
			srv, err := New(Options{Registry: reg, Limits: Limits{MaxPixels: 1 << 20, MaxImagesPerRequest: 1, MaxStreams: 1}, MaxMessageBytes: 1 << 20,
				Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
			if err != nil {
				t.Fatal(err)
			}
			mux := httpMux(reg, nil)
			oip := &oipService{reg: reg}
			vision := &visionService{reg: reg}
			check := func(step string, wantServer bool, wantModels map[string]bool) {
				t.Helper()
				rec := httptest.NewRecorder()
				mux.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/readyz", nil))
				if (rec.Code == 200) != wantServer {
					t.Errorf("%s: /readyz %d %q, want ready %v", step, rec.Code, rec.Body, wantServer)
				}
				want := healthpb.HealthCheckResponse_NOT_SERVING
				if wantServer {
					want = healthpb.HealthCheckResponse_SERVING
				}
				for _, svc := range HealthServices {
					resp, err := srv.health.Check(context.Background(), &healthpb.HealthCheckRequest{Service: svc})
					if err != nil || resp.GetStatus() != want {
						t.Errorf("%s: health %q = %v %v, want %v", step, svc, resp.GetStatus(), err, want)
					}
				}
				if r, _ := oip.ServerReady(context.Background(), nil); r.GetReady() != wantServer {
					t.Errorf("%s: ServerReady %v", step, r.GetReady())
				}
				for name, ready := range wantModels {
					r, err := oip.ModelReady(context.Background(), &inference.ModelReadyRequest{Name: name})
					if err != nil || r.GetReady() != ready {
						t.Errorf("%s: ModelReady(%s) = %v %v, want %v", step, name, r.GetReady(), err, ready)
					}
					info, err := vision.ModelInfo(context.Background(), &visionv1.ModelInfoRequest{Model: name})
					if err != nil || info.GetReady() != ready {
						t.Errorf("%s: ModelInfo(%s).ready = %v %v, want %v", step, name, info.GetReady(), err, ready)
					}
				}
				if _, err := oip.ModelReady(context.Background(), &inference.ModelReadyRequest{Name: "nosuch"}); status.Code(err) != codes.NotFound {
					t.Errorf("%s: ModelReady of an unknown model: %v, want NotFound", step, err)
				}
			}
			check("empty", false, nil)
			good := model.New(modeltest.Model("good", modelrepo.TaskClassify, 10), nil)
			bad := model.New(modeltest.Model("bad", modelrepo.TaskClassify, 10), nil)
			for _, m := range []*model.Model{good, bad} {
				if err := reg.Add(m); err != nil {
					t.Fatal(err)
				}
			}
			check("loading", false, map[string]bool{"good": false, "bad": false})
			good.SetState(model.Ready, nil)
			check("one loading", false, map[string]bool{"good": true, "bad": false})
			bad.SetState(model.Unavailable, errors.New("graph cannot be imported"))
			check("one unavailable", !strict, map[string]bool{"good": true, "bad": false})
			info, err := vision.ModelInfo(context.Background(), &visionv1.ModelInfoRequest{Model: "bad"})
			if err != nil || info.GetState() != visionv1.ModelState_MODEL_STATE_UNAVAILABLE || !strings.Contains(info.GetStateReason(), "cannot be imported") {
				t.Errorf("ModelInfo(bad) = %v %v", info, err)
			}
			reg.Drain()
			check("draining", false, map[string]bool{"good": false, "bad": false})
			if err := srv.Shutdown(context.Background(), time.Second); err != nil {
				t.Fatal(err)
			}
		})
	}
}
