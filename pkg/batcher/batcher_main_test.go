package batcher

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package's tests when a goroutine outlives them: the
// batcher's workers must all have exited once Close returned.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
