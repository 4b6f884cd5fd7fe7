package sigstate

import (
	"os"
	"os/signal"
	"slices"
	"syscall"
	"testing"
	"time"
)

// TestRestoreGivesSignalsBackToGo stands a C handler in for the CUDA
// provider's and checks that after Restore a signal.Notify channel gets the
// signals again, which is what lets SIGTERM drain the server.
func TestRestoreGivesSignalsBackToGo(t *testing.T) {
	for _, sig := range []syscall.Signal{syscall.SIGUSR1, syscall.SIGTERM} {
		t.Run(sig.String(), func(t *testing.T) {
			ch := make(chan os.Signal, 4)
			signal.Notify(ch, sig)
			defer signal.Stop(ch)

			saved := Save()
			if err := installForeignHandler(sig); err != nil {
				t.Fatal(err)
			}
			before := foreignHits()
			if err := syscall.Kill(os.Getpid(), sig); err != nil {
				t.Fatal(err)
			}
			waitFor(t, func() bool { return foreignHits() > before }, "the C handler to catch "+sig.String())
			select {
			case got := <-ch:
				t.Fatalf("Go received %v while the C handler was installed; the test does not model the problem", got)
			case <-time.After(50 * time.Millisecond):
			}

			changed, err := saved.Restore()
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Contains(changed, sig) {
				t.Errorf("Restore reported %v, want it to include %v", changed, sig)
			}
			hits := foreignHits()
			if err := syscall.Kill(os.Getpid(), sig); err != nil {
				t.Fatal(err)
			}
			select {
			case got := <-ch:
				if got != sig {
					t.Errorf("got %v, want %v", got, sig)
				}
			case <-time.After(5 * time.Second):
				t.Fatalf("signal.Notify channel did not receive %v after Restore", sig)
			}
			if foreignHits() != hits {
				t.Errorf("the C handler still ran after Restore")
			}
		})
	}
}

func TestRestoreWithoutChangesChangesNothing(t *testing.T) {
	s := Save()
	changed, err := s.Restore()
	if err != nil {
		t.Fatal(err)
	}
	if len(changed) != 0 {
		t.Errorf("Restore changed %v though nothing had replaced a handler", changed)
	}
}

func waitFor(t *testing.T, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}
