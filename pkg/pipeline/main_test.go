package pipeline

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package's tests when a goroutine outlives them (the
// concurrent preprocessing tests start several).
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
