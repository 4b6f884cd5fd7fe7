package main

import (
	"bufio"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/visionserve/visionserve/internal/server/servertest"
	"github.com/visionserve/visionserve/internal/testenv"
	visionv1 "github.com/visionserve/visionserve/proto/visionserve/v1"
)

// TestSIGTERMDrainsInFlightRequests builds the real binary, serves the
// real MobileNetV2 on a loopback port, keeps clients busy, sends SIGTERM
// and checks that every call either completed or was refused with
// Unavailable (never lost or failed otherwise), and that the process
// exited 0.
func TestSIGTERMDrainsInFlightRequests(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the server binary")
	}
	repo := servertest.Repo(t, servertest.MobileNetV2)
	lib := testenv.ORTLib(t)
	dog := servertest.Image(t, "dog.jpg")
	bin := filepath.Join(t.TempDir(), "infer-server")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	cmd := exec.Command(bin, "--model-repo", repo, "--backend", "ort-cpu", "--ort-lib", lib, "--ort-threads", "1",
		"--grpc-addr", "127.0.0.1:0", "--http-addr", "", "--grace-period", "20s")
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	addrc := make(chan string, 1)
	var logMu sync.Mutex
	var logs []string
	go func() {
		re := regexp.MustCompile(`msg="gRPC listening" addr=(\S+)`)
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			logMu.Lock()
			logs = append(logs, sc.Text())
			logMu.Unlock()
			if m := re.FindStringSubmatch(sc.Text()); m != nil {
				addrc <- m[1]
			}
		}
		exited <- cmd.Wait()
	}()
	defer func() {
		if t.Failed() {
			logMu.Lock()
			for _, l := range logs {
				t.Log(l)
			}
			logMu.Unlock()
		}
	}()
	var addr string
	select {
	case addr = <-addrc:
	case err := <-exited:
		t.Fatalf("server exited before listening: %v", err)
	case <-time.After(time.Minute):
		cmd.Process.Kill()
		t.Fatal("server did not listen")
	}
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for {
		r, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
		if err == nil && r.Status == healthpb.HealthCheckResponse_SERVING {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("never SERVING: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}

	vision := visionv1.NewVisionServiceClient(conn)
	req := &visionv1.ClassifyRequest{Model: servertest.MobileNetV2, Images: []*visionv1.Image{{Source: &visionv1.Image_Encoded{Encoded: dog}}}}
	var (
		wg                sync.WaitGroup
		mu                sync.Mutex
		ok, refused       int
		failures          []error
		afterSignal       = make(chan struct{})
		okAfterSignalSent int
	)
	for range 8 {
		wg.Go(func() {
			for {
				resp, err := vision.Classify(ctx, req)
				mu.Lock()
				switch {
				case err == nil && len(resp.Results) == 1 && resp.Results[0].Classes[0].Label == "Samoyed":
					ok++
					select {
					case <-afterSignal:
						okAfterSignalSent++
					default:
					}
				case status.Code(err) == codes.Unavailable:
					refused++
				default:
					failures = append(failures, err)
				}
				mu.Unlock()
				if err != nil {
					return
				}
			}
		})
	}
	// Wait until calls complete steadily, so that some are in flight.
	var before int
	for wait := time.Now().Add(time.Minute); time.Now().Before(wait); time.Sleep(20 * time.Millisecond) {
		mu.Lock()
		before = ok
		mu.Unlock()
		if before >= 8 {
			break
		}
	}
	if before == 0 {
		t.Fatalf("no request completed before SIGTERM: refused %d, failures %v", refused, failures)
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	close(afterSignal)
	wg.Wait()
	select {
	case err := <-exited:
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			t.Fatalf("exit code %d after SIGTERM", ee.ExitCode())
		} else if err != nil {
			t.Fatal(err)
		}
	case <-time.After(time.Minute):
		cmd.Process.Kill()
		t.Fatal("server did not exit after SIGTERM")
	}
	if len(failures) > 0 {
		t.Errorf("%d calls failed other than by refusal: %v", len(failures), failures)
	}
	if refused != 8 {
		t.Errorf("%d clients saw the refusal, want all 8", refused)
	}
	t.Logf("%d calls completed (%d of them answered after SIGTERM), %d refused", ok, okAfterSignalSent, refused)
	// The port is closed now.
	if _, err := vision.Classify(ctx, req); status.Code(err) != codes.Unavailable {
		t.Errorf("after exit: %v, want Unavailable", err)
	}
	_ = os.Remove(bin)
}
