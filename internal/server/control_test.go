package server

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/visionserve/visionserve/internal/config"
	"github.com/visionserve/visionserve/pkg/model/modeltest"
	"github.com/visionserve/visionserve/pkg/modelrepo"
	"github.com/visionserve/visionserve/proto/inference"
	visionv1 "github.com/visionserve/visionserve/proto/visionserve/v1"
)

// startControlRun runs the server of cfg over startFakeRun's backend until
// the test ends, waits until it is ready and dials it.
func startControlRun(t *testing.T, cfg config.Config) (visionv1.VisionServiceClient, inference.GRPCInferenceServiceClient) {
	t.Helper()
	r, err := startFakeRun(t, cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := r.stop(); err != nil {
			t.Error(err)
		}
	})
	if code, body := waitReady(t, r.http); code != 200 {
		t.Fatalf("readyz %d %s", code, body)
	}
	return dialRun(t, r)
}

func dialRun(t *testing.T, r *fakeRun) (visionv1.VisionServiceClient, inference.GRPCInferenceServiceClient) {
	t.Helper()
	conn, err := grpc.NewClient(r.grpc, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return visionv1.NewVisionServiceClient(conn), inference.NewGRPCInferenceServiceClient(conn)
}

// classifyLoad sends n Classify calls of a photo-sized JPEG from clients
// goroutines while during() runs, and returns how many failed and the
// first error.
func classifyLoad(ctx context.Context, vc visionv1.VisionServiceClient, n, clients int, during func()) (int64, error) {
	img := modeltest.JPEG(&testing.T{}, 1024, 768, 100)
	var sent, failed atomic.Int64
	var first atomic.Value
	var wg sync.WaitGroup
	for range clients {
		wg.Go(func() {
			for sent.Add(1) <= int64(n) {
				_, err := vc.Classify(ctx, &visionv1.ClassifyRequest{Model: "cls", Images: []*visionv1.Image{encodedImage(img)}})
				if err != nil {
					failed.Add(1)
					first.CompareAndSwap(nil, err)
				}
			}
		})
	}
	during()
	wg.Wait()
	err, _ := first.Load().(error)
	return failed.Load(), err
}

func indexOf(t *testing.T, oc inference.GRPCInferenceServiceClient) map[string]*inference.RepositoryIndexResponse_ModelIndex {
	t.Helper()
	resp, err := oc.RepositoryIndex(context.Background(), &inference.RepositoryIndexRequest{})
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]*inference.RepositoryIndexResponse_ModelIndex{}
	for _, m := range resp.GetModels() {
		out[m.GetName()] = m
	}
	return out
}

// TestExplicitModelControl: over gRPC, five reloads (Triton's
// RepositoryModelLoad and the vision API's LoadModel) while clients send
// 1,000 requests fail none of them; a corrupt new version leaves the old
// one serving; unload answers NotFound after.
func TestExplicitModelControl(t *testing.T) {
	root := t.TempDir()
	dir := modeltest.WriteDir(t, root, "cls", 10, "")
	modeltest.WriteDir(t, root, "other", 3, "")
	cfg := config.Default()
	cfg.ModelRepo, cfg.ModelControlMode, cfg.LoadModels = root, modelrepo.ControlExplicit, []string{"cls"}
	vc, oc := startControlRun(t, cfg)
	ctx := context.Background()
	idx := indexOf(t, oc)
	if idx["cls"].GetState() != "READY" || idx["other"].GetState() != "UNAVAILABLE" || idx["other"].GetReason() != "not loaded" {
		t.Errorf("index %v", idx)
	}
	if ready, err := oc.RepositoryIndex(ctx, &inference.RepositoryIndexRequest{Ready: true}); err != nil || len(ready.GetModels()) != 1 {
		t.Errorf("ready index %v %v", ready, err)
	}

	before := fakeEnginesBuilt.Load()
	failed, first := classifyLoad(ctx, vc, 1000, 8, func() {
		for i := range 5 {
			time.Sleep(30 * time.Millisecond)
			var err error
			if i%2 == 0 {
				_, err = oc.RepositoryModelLoad(ctx, &inference.RepositoryModelLoadRequest{ModelName: "cls"})
			} else {
				_, err = vc.LoadModel(ctx, &visionv1.LoadModelRequest{Model: "cls"})
			}
			if err != nil {
				t.Errorf("reload %d: %v", i, err)
			}
		}
	})
	if failed > 0 {
		t.Fatalf("%d of 1000 requests failed across reloads; first: %v", failed, first)
	}
	if n := fakeEnginesBuilt.Load() - before; n != 5 {
		t.Errorf("%d engines built, want 5 reloads", n)
	}

	// A corrupt version 2 fails to load and version 1 keeps serving.
	v2 := filepath.Join(dir, "2")
	if err := os.Mkdir(v2, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(v2, "model.onnx"), []byte("truncated"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := oc.RepositoryModelLoad(ctx, &inference.RepositoryModelLoadRequest{ModelName: "cls"}); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("corrupt version: %v, want FailedPrecondition", err)
	}
	img := modeltest.JPEG(t, 64, 64, 10)
	if _, err := vc.Classify(ctx, &visionv1.ClassifyRequest{Model: "cls", Images: []*visionv1.Image{encodedImage(img)}}); err != nil {
		t.Fatalf("old version stopped serving: %v", err)
	}
	if e := indexOf(t, oc)["cls"]; e.GetState() != "READY" || e.GetVersion() != "1" || !strings.Contains(e.GetReason(), "new one failed") {
		t.Errorf("index after a failed reload: %v", e)
	}

	// Unload: NotFound from then on; the index says why.
	if _, err := oc.RepositoryModelUnload(ctx, &inference.RepositoryModelUnloadRequest{ModelName: "cls"}); err != nil {
		t.Fatal(err)
	}
	if _, err := vc.Classify(ctx, &visionv1.ClassifyRequest{Model: "cls", Images: []*visionv1.Image{encodedImage(img)}}); status.Code(err) != codes.NotFound {
		t.Errorf("classify after unload: %v, want NotFound", err)
	}
	if e := indexOf(t, oc)["cls"]; e.GetState() != "UNAVAILABLE" || e.GetReason() != "unloaded" {
		t.Errorf("index after unload: %v", e)
	}
	if _, err := vc.UnloadModel(ctx, &visionv1.UnloadModelRequest{Model: "cls"}); status.Code(err) != codes.NotFound {
		t.Errorf("second unload: %v", err)
	}

	// Bad requests.
	for name, err := range map[string]error{
		"unknown model": func() error {
			_, err := vc.LoadModel(ctx, &visionv1.LoadModelRequest{Model: "nope"})
			return err
		}(),
		"other repository": func() error {
			_, err := oc.RepositoryModelLoad(ctx, &inference.RepositoryModelLoadRequest{RepositoryName: "x", ModelName: "other"})
			return err
		}(),
		"config override": func() error {
			_, err := oc.RepositoryModelLoad(ctx, &inference.RepositoryModelLoadRequest{ModelName: "other",
				Parameters: map[string]*inference.ModelRepositoryParameter{"config": {ParameterChoice: &inference.ModelRepositoryParameter_StringParam{StringParam: "{}"}}}})
			return err
		}(),
		"path name": func() error {
			_, err := vc.LoadModel(ctx, &visionv1.LoadModelRequest{Model: "../etc"})
			return err
		}(),
	} {
		if c := status.Code(err); c != codes.NotFound && c != codes.InvalidArgument {
			t.Errorf("%s: %v", name, err)
		}
	}
	// Loading the other model serves it.
	resp, err := vc.LoadModel(ctx, &visionv1.LoadModelRequest{Model: "other"})
	if err != nil || resp.GetModel().GetLabelsCount() != 3 || !resp.GetModel().GetReady() {
		t.Errorf("load other: %v %v", resp, err)
	}
}

// TestPollModelControl: in poll mode, changed files reload while clients
// send requests, and none fails; load on request is refused.
func TestPollModelControl(t *testing.T) {
	root := t.TempDir()
	dir := modeltest.WriteDir(t, root, "cls", 10, "")
	cfg := config.Default()
	cfg.ModelRepo, cfg.ModelControlMode, cfg.RepositoryPollInterval = root, modelrepo.ControlPoll, 100*time.Millisecond
	vc, oc := startControlRun(t, cfg)
	ctx := context.Background()
	if _, err := oc.RepositoryModelLoad(ctx, &inference.RepositoryModelLoadRequest{ModelName: "cls"}); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("load in poll mode: %v, want FailedPrecondition", err)
	}
	before := fakeEnginesBuilt.Load()
	failed, first := classifyLoad(ctx, vc, 1000, 8, func() {
		for i := range 5 {
			at := time.Now().Add(time.Duration(i+1) * time.Minute)
			if err := os.Chtimes(filepath.Join(dir, "model.onnx"), at, at); err != nil {
				t.Error(err)
			}
			deadline := time.Now().Add(10 * time.Second)
			for fakeEnginesBuilt.Load()-before < int64(i+1) && time.Now().Before(deadline) {
				time.Sleep(10 * time.Millisecond)
			}
		}
	})
	if failed > 0 {
		t.Fatalf("%d of 1000 requests failed across reloads; first: %v", failed, first)
	}
	if n := fakeEnginesBuilt.Load() - before; n != 5 {
		t.Errorf("%d reloads seen, want 5", n)
	}
	// A folder removed is unloaded.
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := vc.ModelInfo(ctx, &visionv1.ModelInfoRequest{Model: "cls"})
		if status.Code(err) == codes.NotFound {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("removed model still served: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
