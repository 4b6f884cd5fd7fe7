// Package sigstate saves the process's signal dispositions and puts them
// back. Native libraries that install their own handlers while loading (the
// ONNX Runtime CUDA provider does, onnxruntime_go issue #140) would
// otherwise take SIGTERM, SIGINT and the fault signals away from the Go
// runtime: signal.Notify does not reinstall a handler Go believes it still
// owns, so a server could no longer drain on SIGTERM.
package sigstate

/*
#include <signal.h>
#include <string.h>

static int vs_nsig(void) { return NSIG; }

static int vs_save(int sig, struct sigaction *out) {
	return sigaction(sig, NULL, out);
}

// vs_restore reinstalls saved when the current action differs from it;
// it returns 1 when it changed something, 0 when not, -1 on error.
static int vs_restore(int sig, const struct sigaction *saved) {
	struct sigaction cur;
	if (sigaction(sig, NULL, &cur) != 0) return -1;
	if (cur.sa_handler == saved->sa_handler && cur.sa_flags == saved->sa_flags) return 0;
	if (sigaction(sig, saved, NULL) != 0) return -1;
	return 1;
}

static volatile sig_atomic_t vs_foreign_hits;

static void vs_foreign_handler(int sig) { (void)sig; vs_foreign_hits++; }

// vs_install_foreign installs a plain C handler, the way a native library
// does; tests use it to stand in for the CUDA provider.
static int vs_install_foreign(int sig) {
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = vs_foreign_handler;
	sa.sa_flags = SA_ONSTACK | SA_RESTART;
	sigemptyset(&sa.sa_mask);
	return sigaction(sig, &sa, NULL);
}

static int vs_foreign_count(void) { return vs_foreign_hits; }
*/
import "C"

import (
	"fmt"
	"syscall"
)

// State is the saved disposition of every catchable signal.
type State struct {
	saved []C.struct_sigaction
	ok    []bool
}

// Save records the current action of every signal but SIGKILL and SIGSTOP.
func Save() *State {
	n := int(C.vs_nsig())
	s := &State{saved: make([]C.struct_sigaction, n), ok: make([]bool, n)}
	for sig := 1; sig < n; sig++ {
		if sig == int(syscall.SIGKILL) || sig == int(syscall.SIGSTOP) {
			continue
		}
		s.ok[sig] = C.vs_save(C.int(sig), &s.saved[sig]) == 0
	}
	return s
}

// Restore puts back every action that changed since Save and returns the
// signals it restored, so callers can log what a library had replaced.
func (s *State) Restore() ([]syscall.Signal, error) {
	var changed []syscall.Signal
	var firstErr error
	for sig := 1; sig < len(s.saved); sig++ {
		if !s.ok[sig] {
			continue
		}
		switch C.vs_restore(C.int(sig), &s.saved[sig]) {
		case 1:
			changed = append(changed, syscall.Signal(sig))
		case -1:
			if firstErr == nil {
				firstErr = fmt.Errorf("restoring the handler of signal %d", sig)
			}
		}
	}
	return changed, firstErr
}

// installForeignHandler replaces sig's handler with a C one (tests only).
func installForeignHandler(sig syscall.Signal) error {
	if C.vs_install_foreign(C.int(sig)) != 0 {
		return fmt.Errorf("installing a C handler for %v", sig)
	}
	return nil
}

// foreignHits counts signals the C handler caught (tests only).
func foreignHits() int { return int(C.vs_foreign_count()) }
