package server

import (
	"context"
	"slices"
	"testing"
	"time"

	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
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
